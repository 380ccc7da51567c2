"""The percentile bootstrap behind every interval the evaluations report (GenEval's overall and
per-tag scores, POPE's accuracy and F1 per split and averaged over splits)."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def percentile_interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` interval of bootstrap replicates: their (alpha, 1 - alpha) quantiles."""
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [alpha, 1.0 - alpha])
    return (float(low), float(high))


def bootstrap_interval(
    counts: np.ndarray | Sequence[np.ndarray],
    statistic: Callable[..., np.ndarray],
    level: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
    pooled: bool = False,
) -> tuple[float, float] | list[tuple[float, float]]:
    """Percentile bootstrap interval of a statistic of summed counts.

    counts: a (units, columns) array of counts per resampling unit (an image, a prompt), or a list
        of them, the strata, each resampled on its own (stratified bootstrap), in order, from one
        generator seeded by `seed`.
    statistic: maps the replicates' column sums, one (n_boot, columns) array per stratum, to the
        statistic's replicates, shape (n_boot,) or (m, n_boot) for m statistics at once.
    pooled: resample the trials pooled inside each stratum instead of its units: each stratum's
        columns are then (successes, trials) and a replicate's successes are drawn as
        Binomial(trials, successes / trials), the distribution of resampling the stratum's 0/1
        trials with replacement (trials stay fixed).

    Returns (low, high) for a statistic of shape (n_boot,), else one (low, high) per row.
    """
    strata = [counts] if isinstance(counts, np.ndarray) else list(counts)
    rng = np.random.default_rng(seed)
    sums = []
    for stratum in strata:
        stratum = np.asarray(stratum, dtype=np.float64)
        if pooled:
            if stratum.ndim != 2 or stratum.shape[1] != 2:
                raise ValueError(f"pooled resampling needs (successes, trials) columns, got shape {stratum.shape}")
            n, c = int(stratum[:, 1].sum()), stratum[:, 0].sum()
            successes = rng.binomial(n, c / n, size=n_boot)
            sums.append(np.stack([successes, np.full(n_boot, n)], axis=1).astype(np.float64))
            continue
        idx = rng.integers(0, len(stratum), size=(n_boot, len(stratum)))
        sums.append(stratum[idx].sum(axis=1))
    values = np.asarray(statistic(*sums))
    if values.ndim == 1:
        return percentile_interval(values, level)
    return [percentile_interval(row, level) for row in values]
