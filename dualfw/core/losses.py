"""Preference losses. Each is a small pure function with its formula, wrapped by a tiny config
class that the YAML names (`loss: {class_path: dualfw.core.losses.SimPO, init_args: {beta: 2.5}}`).

Notation: log pi(y|x) is the summed per-token log-prob of a whole sample y (an image's VQ tokens
or a text's tokens) under the policy; |y| its length in tokens; ref is the frozen Reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dualfw.core.errors import ConfigError


def simpo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, chosen_len: Tensor, rejected_len: Tensor, beta: float, gamma: float
) -> Tensor:
    """SimPO (reference-free, length-normalised), per pair:

        L = -log sigmoid( beta/|y_w| * log pi(y_w|x) - beta/|y_l| * log pi(y_l|x) - gamma )
    """
    return -F.logsigmoid(beta * chosen_logps / chosen_len - beta * rejected_logps / rejected_len - gamma)


def dpo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, beta: float
) -> Tensor:
    """DPO (sigmoid), per pair:

        L = -log sigmoid( beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))] )
    """
    return -F.logsigmoid(beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)))


def ipo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, tau: float
) -> Tensor:
    """IPO (Azar et al.), per pair: a squared loss that keeps the log-ratio margin at 1/(2 tau):

        h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))
        L = (h - 1 / (2 tau))^2
    """
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return (h - 1 / (2 * tau)) ** 2


AdvantageScale = Literal["group", "batch", "none"]


def group_advantages(
    rewards: Tensor, scale: AdvantageScale = "group", eps: float = 1e-6, extremes: bool = False
) -> Tensor:
    """GRPO advantages for groups (rows) of K samples: rewards centred within each group, then scaled.

        "group": A_i = (r_i - mean(r)) / (std(r) + eps)          each group's own std (GRPO)
        "batch": A_i = (r_i - mean(r)) / (rms(r - mean(r)) + eps)  one scale, over every group
        "none":  A_i = r_i - mean(r)                               (Dr. GRPO)

    With "group" a group whose rewards barely differ (a reward that cannot tell its samples apart)
    gets advantages as large as one the reward separates clearly; "batch" and "none" keep them small.

    `extremes`: only each group's best and worst sample get an advantage, +-(max(r) - min(r)) / 2
    (centred on the midrange), every other sample 0; "group" then divides by that half-span (+-1),
    "batch" by its rms over the step. The GRPO counterpart of best-vs-worst pairs: the order of the
    middle samples, where a weak reward is least reliable, is not learned.
    """
    if extremes:
        top, bottom = rewards.max(-1, keepdim=True), rewards.min(-1, keepdim=True)
        half = (top.values - bottom.values) / 2
        centred = torch.zeros_like(rewards).scatter(-1, bottom.indices, -half).scatter(-1, top.indices, half)
        group_scale, batch_scale = half, half.square().mean().sqrt()
    else:
        centred = rewards - rewards.mean(-1, keepdim=True)
        group_scale, batch_scale = rewards.std(-1, keepdim=True), centred.square().mean().sqrt()
    if scale == "group":
        return centred / (group_scale + eps)
    if scale == "batch":
        return centred / (batch_scale + eps)
    return centred


def grpo_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, ref_logps: Tensor | None, clip: float, kl_beta: float
) -> Tensor:
    """GRPO, per sample, with per-token-mean log-probs logp = log pi(y|x) / |y|:

        ratio = exp(logp - logp_old)
        L = -min(ratio * A, clip(ratio, 1 - clip, 1 + clip) * A) + kl_beta * KL
        KL = exp(ref - logp) - (ref - logp) - 1        (the k3 estimator, >= 0)
    """
    ratio = torch.exp(logps - old_logps)
    policy_term = -torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)
    if ref_logps is None or kl_beta == 0:
        return policy_term
    delta = ref_logps - logps
    return policy_term + kl_beta * (torch.exp(delta) - delta - 1)


def chosen_nll(chosen_logps: Tensor, chosen_len: Tensor) -> Tensor:
    """A likelihood anchor on the chosen sample (RPO; SimPO's SFT regulariser), per pair:

        L_nll = -log pi(y_w|x) / |y_w|

    Added as `Policy(chosen_nll_weight=w)`: L = L_pref + w * L_nll. It keeps the chosen samples
    likely, so a pair loss cannot win only by pushing both samples down.
    """
    return -chosen_logps / chosen_len


@dataclass
class PairLogps:
    """Summed log-probs and lengths of a batch of (chosen, rejected) pairs; ref_* only when needed."""

    chosen: Tensor
    rejected: Tensor
    chosen_len: Tensor
    rejected_len: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None


class PreferenceLoss:
    """A loss over preference pairs. `needs_reference` tells the Policy to build the Reference."""

    needs_reference: bool = False
    over_groups: bool = False  # True for losses over all K samples (GRPO) instead of pairs

    def __call__(self, pairs: PairLogps) -> Tensor:
        """Per-pair losses (n_pairs,)."""
        raise NotImplementedError

    def implicit_margin(self, pairs: PairLogps) -> Tensor:
        """The quantity inside the sigmoid (or the square, for IPO)."""
        raise NotImplementedError

    def prefers_chosen(self, pairs: PairLogps) -> Tensor:
        """(n_pairs,) bool: the policy's implicit reward ranks chosen above rejected (pair accuracy)."""
        return self.implicit_margin(pairs) > 0


class SimPO(PreferenceLoss):
    """SimPO, the paper's default.

    Args:
        beta: reward scale (SimPO paper: 2-2.5; a Janus-Pro study used 5).
        gamma: target reward margin (SimPO paper: gamma/beta ~ 0.5).
    """

    def __init__(self, beta: float = 2.5, gamma: float = 1.25) -> None:
        self.beta, self.gamma = beta, gamma

    def __call__(self, pairs: PairLogps) -> Tensor:
        return simpo_loss(pairs.chosen, pairs.rejected, pairs.chosen_len, pairs.rejected_len, self.beta, self.gamma)

    def implicit_margin(self, pairs: PairLogps) -> Tensor:
        return self.beta * (pairs.chosen / pairs.chosen_len - pairs.rejected / pairs.rejected_len) - self.gamma

    def prefers_chosen(self, pairs: PairLogps) -> Tensor:
        # the target margin gamma is not part of the implicit reward
        return pairs.chosen / pairs.chosen_len > pairs.rejected / pairs.rejected_len


class DPO(PreferenceLoss):
    """DPO with the frozen Reference model.

    Args:
        beta: strength of the implicit KL anchor to the Reference (typical 0.1).
    """

    needs_reference = True

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = beta

    def __call__(self, pairs: PairLogps) -> Tensor:
        assert pairs.ref_chosen is not None and pairs.ref_rejected is not None, "DPO needs reference log-probs"
        return dpo_loss(pairs.chosen, pairs.rejected, pairs.ref_chosen, pairs.ref_rejected, self.beta)

    def implicit_margin(self, pairs: PairLogps) -> Tensor:
        return self.beta * ((pairs.chosen - pairs.ref_chosen) - (pairs.rejected - pairs.ref_rejected))


class IPO(PreferenceLoss):
    """IPO with the frozen Reference.

    Args:
        tau: regularisation; the target log-ratio margin is 1 / (2 tau).
    """

    needs_reference = True

    def __init__(self, tau: float = 0.1) -> None:
        self.tau = tau

    def __call__(self, pairs: PairLogps) -> Tensor:
        return ipo_loss(pairs.chosen, pairs.rejected, pairs.ref_chosen, pairs.ref_rejected, self.tau)

    def implicit_margin(self, pairs: PairLogps) -> Tensor:
        return (pairs.chosen - pairs.ref_chosen) - (pairs.rejected - pairs.ref_rejected)


class ChosenNLL(PreferenceLoss):
    """Best-of-K fine-tuning (rejection-sampling fine-tuning): only the chosen sample of each pair
    is learned, by its per-token likelihood (`chosen_nll`); the rejected one is ignored. The
    conservative end of the family: it never pushes a sample's likelihood down.
    """

    def __call__(self, pairs: PairLogps) -> Tensor:
        return chosen_nll(pairs.chosen, pairs.chosen_len)

    def implicit_margin(self, pairs: PairLogps) -> Tensor:
        return pairs.chosen / pairs.chosen_len - pairs.rejected / pairs.rejected_len


class GRPO(PreferenceLoss):
    """GRPO over the K samples of each input (group-normalised self-rewards as advantages).

    logp_old is the log-prob under the model that drew the samples. Drawn by the policy (one update
    per rollout) it is the detached current log-prob: the ratio is 1 in value and the clip only
    matters if a rollout is reused. Drawn by the frozen initial model (`Policy(rollouts_from=
    "initial")`) it is the initial model's: the ratio is then the importance weight of an off-policy
    sample, and the clip stops pushing a sample once its per-token likelihood ratio to the initial
    model leaves 1 +- clip: a trust region around the model whose samples the reward was measured on.

    Args:
        clip: ratio clip range epsilon.
        kl_beta: weight of the KL to the Reference (0 drops the Reference).
        scale: what divides the group-centred rewards (`group_advantages`): "group" (each group's
            std, GRPO), "batch" (one scale for the step's groups on this rank) or "none" (Dr. GRPO).
        extremes: advantages for each group's best and worst sample only (`group_advantages`).
    """

    over_groups = True

    def __init__(
        self, clip: float = 0.2, kl_beta: float = 0.04, scale: AdvantageScale = "group", extremes: bool = False
    ) -> None:
        if scale not in ("group", "batch", "none"):
            raise ConfigError(f"loss.init_args.scale must be 'group', 'batch' or 'none', got {scale!r}")
        self.clip, self.kl_beta, self.scale, self.extremes = clip, kl_beta, scale, extremes
        self.needs_reference = kl_beta > 0

    def group_loss(
        self, logps: Tensor, rewards: Tensor, ref_logps: Tensor | None, old_logps: Tensor | None = None
    ) -> Tensor:
        """Per-sample losses for per-token-mean log-probs and rewards, all (B, K); `old_logps` those
        of the model that drew the samples when it is not the policy itself."""
        old = logps.detach() if old_logps is None else old_logps
        advantages = group_advantages(rewards, self.scale, extremes=self.extremes)
        return grpo_loss(logps, old, advantages, ref_logps, self.clip, self.kl_beta)
