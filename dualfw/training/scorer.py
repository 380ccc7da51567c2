"""The DualScorer: the model grading its own samples through the inverse task."""

from __future__ import annotations

import copy
import math
import re
from typing import Literal

import lightning as L
import torch
from torch import Tensor

from dualfw.core.errors import ConfigError
from dualfw.core.interface import FrozenView, Images, LMMAdapter

Reduction = Literal["mean", "sum"]


def reduce_logps(logps: Tensor, mask: Tensor, reduction: str) -> Tensor:
    """Per-sequence reward from per-token log-probs: "mean" (the paper) or "sum" over `mask`."""
    total = (logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if reduction == "mean" else total


class DualScorer(L.LightningModule):
    """The dual self-rewards, computed by the model itself (or a frozen copy of it):

        R_G(y) = (1/|x|) sum_k log pi(x_k | y, x_<k)   prompt x given a sampled image y   (t2i)
        R_U(t) = (1/|v|) sum_k log pi(v_k | t, v_<k)   image tokens v given a description t (i2t)

    With `contrastive` each reward becomes a pointwise mutual information: minus the same
    likelihood without the conditioning sample (R_G: no image in the prompt; R_U: an empty prompt).
    That baseline is the same for every sample of one input, so it shifts a group's rewards
    without reordering them; it matters for the margin filter and for comparing inputs.

    With `batch_contrast` each reward is taken relative to the batch's other inputs, a PMI against
    them (InfoNCE-style):

        R_G(y) - log mean_{x' != x} pi(x' | y)       x' the batch's other prompts
        R_U(t) - log mean_{v' != v} pi(v' | t)       v' the batch's other images

    A weight w in place of `True` subtracts w times that term: the plain reward credits clutter,
    the full contrast credits sparse images (fewer objects support fewer of the other inputs).

    With `near_misses` (groups of interchangeable words) R_G is taken relative to the prompt's near
    misses, the prompts one word away (`near_miss_prompts`):

        R_G(y) - log mean_{x' ~ x} pi(x' | y)        x' "a blue circle", "a red square" for "a red circle"

    so an image earns only what tells its prompt from a prompt it could be confused with; an image
    that hedges (a red and a blue circle) supports both. A prompt without near misses keeps R_G.
    `near_miss_weight` w subtracts w times that term: between plain R_G (w = 0), which credits
    every object that supports the prompt, and the full contrast (w = 1), which credits only what
    tells the prompt apart.

    An image that supports any prompt (clutter: more objects give more words support) or a
    description that fits any image earns nothing by it (`benchmarks/shapes_rewards.py` measures
    the object-count bias of each reward). Costs one more scoring pass per other input; for R_G
    an adapter that reads a repeated image once (JanusAdapter) runs only the other prompts' tokens.

    Args:
        reduction: R_G over the prompt's tokens: "mean" per token (the paper) or "sum".
        i2t_reduction: R_U over the image's tokens: "mean" (the paper) or "sum".
        instruction: the user turn put before the scored prompt for R_G, in the model's
            understanding template ("<|User|>: <image>\\n{instruction}\\n\\n<|Assistant|>: {prompt}").
        contrastive: use the PMI variant of both rewards.
        batch_contrast: take each reward relative to the batch's other inputs (needs >= 2 inputs
            per step); a number >= 0 weighs the subtracted term (true = 1).
        score_eos: include the end-of-sequence token after the prompt in R_G.
        frozen: score with a frozen copy of the initial model instead of the current policy.
        batch_size: candidates scored per forward pass.
        near_misses: groups of interchangeable words or phrases (e.g. colours, object names,
            numbers, relations); empty: no near-miss contrast.
        near_miss_limit: score at most this many near misses per prompt and step (0: all), the
            same ones for each of a prompt's samples, cycling through them from step to step (a
            resumed run starts the cycle again).
        near_miss_weight: the share of the near-miss term subtracted (1: the full contrast).
    """

    def __init__(
        self,
        reduction: Reduction = "mean",
        i2t_reduction: Reduction = "mean",
        instruction: str = "Describe this image.",
        contrastive: bool = False,
        score_eos: bool = False,
        frozen: bool = False,
        batch_size: int = 32,
        batch_contrast: bool | float = False,
        near_misses: list[list[str]] | None = None,
        near_miss_limit: int = 0,
        near_miss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        for key, value in (("reduction", reduction), ("i2t_reduction", i2t_reduction)):
            if value not in ("mean", "sum"):
                raise ConfigError(f"scorer.{key} must be 'mean' or 'sum', got {value!r}")
        self.reduction, self.i2t_reduction, self.instruction = reduction, i2t_reduction, instruction
        self.contrastive, self.score_eos, self.frozen, self.batch_size = contrastive, score_eos, frozen, batch_size
        if float(batch_contrast) < 0:
            raise ConfigError(f"scorer.batch_contrast must be true, false or a weight >= 0, got {batch_contrast!r}")
        self.batch_contrast = float(batch_contrast)  # 0: plain rewards
        self.near_misses = [list(group) for group in near_misses or []]
        for i, group in enumerate(self.near_misses):
            if len(set(group)) < 2 or not all(isinstance(w, str) and w.strip() for w in group):
                raise ConfigError(f"scorer.near_misses[{i}] must hold at least two distinct non-empty words, got {group!r}")
        if near_miss_limit < 0:
            raise ConfigError(f"scorer.near_miss_limit must be >= 0, got {near_miss_limit}")
        self.near_miss_limit = near_miss_limit
        if near_miss_weight < 0:
            raise ConfigError(f"scorer.near_miss_weight must be >= 0, got {near_miss_weight}")
        self.near_miss_weight = float(near_miss_weight)
        self._near_miss_calls = 0
        self._model: list[LMMAdapter | FrozenView] = []  # a list keeps the policy's weights out of this module's state
        self._own_copy = False

    def attach(self, model: LMMAdapter | FrozenView) -> None:
        """Score with `model`: the live policy, or a read-only view of the initial model. When
        `frozen` and given a live adapter, score with a frozen copy of it made here."""
        self._own_copy = self.frozen and not isinstance(model, FrozenView)
        if self._own_copy:
            model = FrozenView(copy.deepcopy(model).eval().requires_grad_(False))
        self._model = [model]

    def move_frozen_to(self, device) -> None:
        """Move a frozen copy made by `attach` (kept outside the module tree) to the policy's device."""
        if self._own_copy:
            self.model.adapter.to(device)

    @property
    def model(self) -> LMMAdapter | FrozenView:
        if not self._model:
            raise RuntimeError("DualScorer has no model: call attach(policy_model) first")
        return self._model[0]

    def _chunks(self, n: int):
        for start in range(0, n, self.batch_size):
            yield slice(start, start + self.batch_size)

    @torch.no_grad()
    def prompt_loglik(
        self, tokens: Tensor | None, prompts: list[str], pixels: Tensor | None = None, rows: Tensor | None = None
    ) -> Tensor:
        """log pi(prompt | image), reduced; tokens None scores the prompts with no image. `pixels`:
        the images already decoded from `tokens`, when they are scored more than once. `rows`:
        prompt i reads image rows[i] (default: image i)."""
        images = None if tokens is None else Images(tokens, pixels, self.model.decode_images)
        out = []
        for part in self._chunks(len(prompts)):
            batch = None if images is None else images[part if rows is None else rows[part]]
            logps, mask = self.model.text_logprobs(batch, prompts[part], self.instruction, eos=self.score_eos)
            out.append(reduce_logps(logps, mask, self.reduction))
        return torch.cat(out)

    @torch.no_grad()
    def image_loglik(self, tokens: Tensor, texts: list[str]) -> Tensor:
        """log pi(image tokens | text) through the generation head, reduced; (n,)."""
        out = []
        for part in self._chunks(len(texts)):
            logps = self.model.image_logprobs(texts[part], tokens[part])
            out.append(reduce_logps(logps, torch.ones_like(logps), self.i2t_reduction))
        return torch.cat(out)

    @torch.no_grad()
    def image_rewards(self, tokens: Tensor, prompts: list[str]) -> Tensor:
        """R_G for each image (image tokens, (n, N)) and the prompt it was sampled for; (n,)."""
        return self._image_rewards(tokens, prompts)

    def _image_rewards(self, tokens: Tensor, prompts: list[str]) -> Tensor:
        unique = sorted(set(prompts))
        near_misses = bool(self.near_misses) and self.near_miss_weight > 0
        pixels = None
        if (self.batch_contrast or near_misses) and self.model.reads_pixels:
            # decoded once (in scoring-sized chunks), read with every prompt
            pixels = torch.cat([self.model.decode_images(tokens[part]) for part in self._chunks(len(tokens))])
        if self.batch_contrast:
            index = [unique.index(p) for p in prompts]
            # each image with its own prompt (shift 0), then every other prompt of the batch once,
            # image-major: a scoring batch holds an image's prompts together, and an adapter that
            # sees an image repeated reads it once for all of them
            shifts = len(unique)
            rows = torch.arange(len(prompts), device=tokens.device).repeat_interleave(shifts)
            read = [unique[(i + s) % shifts] for i in index for s in range(shifts)]
            scores = self.prompt_loglik(tokens, read, pixels, rows).view(len(prompts), shifts)
            rewards, others = scores[:, 0], list(scores[:, 1:].unbind(1))
        else:
            rewards = self.prompt_loglik(tokens, prompts)
        if self.contrastive:
            baseline = dict(zip(unique, self.prompt_loglik(None, unique).tolist()))
            rewards = rewards - torch.tensor([baseline[p] for p in prompts], device=rewards.device)
        if self.batch_contrast:
            rewards = rewards - self.batch_contrast * _log_mean_exp(others, "prompts", len(unique))
        if near_misses:
            rewards = rewards - self.near_miss_weight * self._near_miss_term(tokens, prompts, unique, pixels)
        return rewards

    def _near_miss_term(self, tokens: Tensor, prompts: list[str], unique: list[str], pixels: Tensor | None) -> Tensor:
        """log mean_{x' ~ x} pi(x' | y) per image (0 for a prompt without near misses)."""
        misses = {}
        for p in unique:
            every = near_miss_prompts(p, self.near_misses)
            n = self.near_miss_limit
            if n and len(every) > n:
                start = self._near_miss_calls * n
                every = [every[(start + j) % len(every)] for j in range(n)]
            misses[p] = every
        self._near_miss_calls += 1
        read = [m for p in prompts for m in misses[p]]  # image-major, as for batch_contrast
        if not read:
            return torch.zeros(len(prompts), device=tokens.device)
        rows = torch.tensor([i for i, p in enumerate(prompts) for _ in misses[p]], device=tokens.device)
        scores = self.prompt_loglik(tokens, read, pixels, rows).split([len(misses[p]) for p in prompts])
        return torch.stack([s.logsumexp(0) - math.log(len(s)) if len(s) else s.new_zeros(()) for s in scores])

    @torch.no_grad()
    def text_rewards(self, image_tokens: Tensor, texts: list[list[str]]) -> Tensor:
        """R_U for the K descriptions of each real image (image_tokens (B, N)); (B, K)."""
        return self._text_rewards(image_tokens, texts)

    def _text_rewards(self, image_tokens: Tensor, texts: list[list[str]]) -> Tensor:
        b, k = len(texts), len(texts[0])
        flat = [t for row in texts for t in row]
        rewards = self.image_loglik(image_tokens.repeat_interleave(k, 0), flat).view(b, k)
        if self.contrastive:
            rewards = rewards - self.image_loglik(image_tokens, [""] * b)[:, None]
        if self.batch_contrast:
            others = [
                self.image_loglik(image_tokens.roll(-s, 0).repeat_interleave(k, 0), flat).view(b, k) for s in range(1, b)
            ]
            rewards = rewards - self.batch_contrast * _log_mean_exp(others, "images", b)
        return rewards


def near_miss_prompts(prompt: str, groups: list[list[str]]) -> list[str]:
    """The prompts one word away from `prompt`: each word (or phrase) of a group replaced by every
    other of its group, then each two different words of one group swapped ("a red circle and a
    blue square" -> "a blue circle and a red square"); "a"/"an" follow the new word. Words match
    whole, longest first; the result holds neither `prompt` nor repeats."""
    group_of = {w: g for g in groups for w in g}
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(group_of, key=len, reverse=True)) + r")\b")
    spans = [(m.start(), m.end(), m.group(0)) for m in pattern.finditer(prompt)]
    edits = [[(a, b, other)] for a, b, w in spans for other in group_of[w] if other != w]
    edits += [
        [(a1, b1, w2), (a2, b2, w1)]
        for i, (a1, b1, w1) in enumerate(spans)
        for a2, b2, w2 in spans[i + 1 :]
        if w1 != w2 and group_of[w1] is group_of[w2]
    ]
    out: list[str] = []
    for edit in edits:
        text = prompt
        for a, b, w in sorted(edit, reverse=True):
            text = text[:a] + w + text[b:]
        text = re.sub(r"\b(a|an) (?=(\w))", lambda m: ("an " if m.group(2).lower() in "aeiou" else "a "), text)
        if text != prompt and text not in out:
            out.append(text)
    return out


def _log_mean_exp(values: list[Tensor], what: str, n: int) -> Tensor:
    if not values:
        raise ConfigError(
            f"scorer.batch_contrast needs at least 2 distinct {what} per step, got {n} "
            f"(raise data.init_args.inputs_per_step)"
        )
    return torch.stack(values).logsumexp(0) - math.log(len(values))


class RandomScorer(DualScorer):
    """The random-pair control: every sample gets an independent uniform reward, so "best" and
    "worst" are two random samples. A run with it changes the model through the loss and the
    sampling alone; a self-reward run has to beat it by more than the evaluation's noise.

    Args:
        seed: seed of the reward stream. The stream's position is part of the module's state dict,
            so a run resumed from a checkpoint continues it instead of replaying its first pairs.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self._generator = torch.Generator().manual_seed(seed)

    def get_extra_state(self) -> dict:
        return {"generator": self._generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self._generator.set_state(state["generator"])

    def _image_rewards(self, tokens: Tensor, prompts: list[str]) -> Tensor:
        return torch.rand(len(prompts), generator=self._generator).to(tokens.device)

    def _text_rewards(self, image_tokens: Tensor, texts: list[list[str]]) -> Tensor:
        return torch.rand(len(texts), len(texts[0]), generator=self._generator).to(image_tokens.device)
