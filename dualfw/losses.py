"""Preference losses. Each is a small pure function with its formula, wrapped by a tiny config
class that the YAML names (`loss: {class_path: dualfw.losses.SimPO, init_args: {beta: 2.5}}`).

Notation: log pi(y|x) is the summed per-token log-prob of a whole sample y (an image's VQ tokens
or a text's tokens) under the policy; |y| its length in tokens; ref is the frozen Reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


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

    def __call__(self, pairs: PairLogps) -> Tensor:
        """Per-pair losses (n_pairs,)."""
        raise NotImplementedError

    def implicit_margin(self, pairs: PairLogps) -> Tensor:
        """The quantity inside the sigmoid: > 0 means the policy prefers the chosen sample."""
        raise NotImplementedError


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
