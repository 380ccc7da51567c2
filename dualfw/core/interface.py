"""The model interface: what the self-reward loop needs from a unified LMM.

A model family joins dualfw with one file implementing `LMMAdapter`, a YAML overlay in
`conf/models/` and a factory in `tests/test_adapter_contract.py`, which runs the same contract
against every family. The contract:

- `sample_images(prompts, k, sampling, seed)` -> image tokens (B, k, N), the prompt prefix shared
  by its k samples; `decode_images` / `encode_images` between tokens and pixels.
- `image_logprobs(prompts, tokens, guidance_scale, drop_prompt)`: per-token log p(image token |
  prompt), the policy's log-prob of a drawn image (and R_U, the image given a description), also
  under the sampler's classifier-free guidance, or with the prompt dropped as CFG's unconditional
  input (for training that input).
- `text_logprobs(images, texts, instruction, eos)`: per-token log p(text | image), R_G's reading.
  `images` is an `Images` batch: the tokens of sampled images and, only when the adapter reads
  pixels (through a vision encoder), their decoded pixels. A family that reads its own tokens
  scores the sample itself, with no decode and re-encode.
- `sample_texts(pixels, k, instruction, sampling, seed)`: k descriptions per image.
- `save_pretrained(folder)`: a folder the model's own library loads.
- What training needs, declared rather than reached for: `lora_module()` and `lora_targets()`
  (where peft injects adapters: the language model only, never a frozen tokenizer),
  `generation_modules()` (what draws and never reads), `sharding_units()`,
  `checkpointing_units()` and `unsharded_modules()` (FSDP units, activation checkpointing, frozen
  parts kept whole), from which `fully_shard(mesh)` shards with FSDP2.
- An adapter built from a folder ends its `__init__` with `dualfw.core.lora.load_saved_lora(self,
  folder)`, so an export whose LoRA serves one direction loads as it was trained. The drawing calls
  (`sample_images`, `image_logprobs`) and the reading calls (`text_logprobs`, `sample_texts`) are
  wrapped by the base class to run with such adapters off in the other direction (`lora_off_in`).

Conventions shared by every adapter:
- images are float tensors (n, 3, H, W) in [0, 1] at `image_size`;
- image tokens are LongTensors (n, num_image_tokens) of codebook indices;
- log-probs are per token, float32, with gradients whenever grad mode is on;
- prompts are plain strings; the adapter applies the model's own chat templates.
"""

from __future__ import annotations

import contextlib
import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch
from torch import nn

from dualfw.core.errors import ConfigError


@dataclass
class ImageSampling:
    """How images are sampled. guidance_scale 1 disables classifier-free guidance (below 1 is
    refused); 0 temperature means greedy; top_k 0 and top_p 1 disable those filters."""

    guidance_scale: float = 5.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.guidance_scale >= 1:
            raise ConfigError(f"guidance_scale must be >= 1 (1: no classifier-free guidance), got {self.guidance_scale}")
        _check_common(self)
        if not self.top_k >= 0:
            raise ConfigError(f"top_k must be >= 0 (0: no top-k filter), got {self.top_k}")


@dataclass
class TextSampling:
    """How descriptions are sampled (understanding direction); 0 temperature means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        _check_common(self)
        if not self.max_new_tokens >= 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def _check_common(sampling) -> None:
    """The temperature and top_p bounds both samplers share (NaN fails every comparison)."""
    if not sampling.temperature >= 0:
        raise ConfigError(f"temperature must be >= 0 (0: greedy), got {sampling.temperature}")
    if not 0 < sampling.top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] (1: no nucleus filter), got {sampling.top_p}")


class Images:
    """A batch of images as a model reads them: image tokens, pixels, or both.

    Pixels are decoded from the tokens (by `decode`) the first time an adapter asks for them, and
    kept: an adapter that reads its own tokens never pays for a decode.
    """

    def __init__(
        self,
        tokens: torch.LongTensor | None = None,
        pixels: torch.Tensor | None = None,
        decode: Callable[[torch.LongTensor], torch.Tensor] | None = None,
    ) -> None:
        if tokens is None and pixels is None:
            raise ValueError("Images needs tokens, pixels or both")
        self.tokens, self._pixels, self._decode = tokens, pixels, decode

    @classmethod
    def of(cls, images: "Images | torch.Tensor | None") -> "Images | None":
        """`images` as an Images batch: a tensor is taken as pixels."""
        return images if images is None or isinstance(images, Images) else cls(pixels=images)

    def __len__(self) -> int:
        return len(self.tokens if self.tokens is not None else self._pixels)

    def __getitem__(self, index) -> "Images":
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Images(pick(self.tokens), pick(self._pixels), self._decode)

    @property
    def pixels(self) -> torch.Tensor:
        """(n, 3, H, W) in [0, 1], decoded from the tokens on first use."""
        if self._pixels is None:
            if self._decode is None:
                raise ValueError("these images carry tokens only and no decoder")
            self._pixels = self._decode(self.tokens)
        return self._pixels


class LMMAdapter(nn.Module, ABC):
    """A unified LMM seen through the two directions the dual self-reward needs.

    Subclasses hold the underlying model as a submodule (so Lightning moves, shards and
    checkpoints it) and implement the abstract methods below.
    """

    #: number of image tokens per generated image
    num_image_tokens: int
    #: side in pixels of generated images
    image_size: int
    #: text_logprobs reads decoded pixels (a vision encoder) rather than the image tokens
    reads_pixels: bool = True
    #: directions ("t2i": drawing calls, "i2t": reading calls) that run with LoRA layers off
    #: (`dualfw.core.lora`, LoRA for one direction only)
    lora_off_in: frozenset[str] = frozenset()
    #: whether each direction's calls run a LoRA set of their own, named after the direction
    #: (`LoraSpec.per_direction`)
    lora_per_direction: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for name, direction in _DIRECTION_OF_CALL.items():
            if name in cls.__dict__:
                setattr(cls, name, _in_direction(cls.__dict__[name], direction))

    @abstractmethod
    def sample_images(
        self,
        prompts: list[str],
        k: int,
        sampling: ImageSampling = ImageSampling(),
        seed: int | None = None,
        progress: bool = False,
    ) -> torch.LongTensor:
        """Sample `k` images per prompt; returns tokens (len(prompts), k, num_image_tokens).

        The prompt prefix is computed once per prompt and shared by its k samples.
        """

    def library_generate(self, prompts: list[str], k: int, sampling: ImageSampling = ImageSampling()) -> torch.LongTensor:
        """The same images drawn by the model library's own `generate` (tokens (len(prompts), k, N);
        temperature 0: greedy, the k samples equal): the reference that parity tests and
        `benchmarks/sampling.py` hold `sample_images` against. Seeded by torch's global generator."""
        raise ConfigError(f"{type(self).__name__} offers no library sampler to compare with")

    @abstractmethod
    def decode_images(self, tokens: torch.LongTensor) -> torch.Tensor:
        """Image tokens (n, N) -> pixels (n, 3, H, W) in [0, 1]."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.LongTensor:
        """Pixels (n, 3, H, W) in [0, 1] -> image tokens (n, N)."""

    @abstractmethod
    def image_logprobs(
        self,
        prompts: list[str],
        tokens: torch.LongTensor,
        guidance_scale: float = 1.0,
        drop_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-token log p(image token | prompt, earlier image tokens), (n, N).

        `prompts[i]` conditions `tokens[i]`. guidance_scale 1: the conditional model alone. s != 1:
        the guided distribution that `sample_images` draws from at temperature 1 with the same
        scale, log softmax(uncond + s * (cond - uncond)). `drop_prompt` (n,) bool: those rows
        conditioned on the unconditional input CFG uses for their prompt instead.
        """

    @abstractmethod
    def text_logprobs(
        self, images: Images | torch.Tensor | None, texts: list[str], instruction: str, eos: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log p(text | image) with `instruction` as the user turn and `texts[i]` as the
        assistant answer about image i (an `Images` batch, or pixels; no image in the prompt when
        None). With `eos` the end-of-sequence token after each text is scored too. Returns
        (logps, mask), both (n, T_max); mask marks the scored tokens, logps is 0 elsewhere."""

    @abstractmethod
    def sample_texts(
        self,
        pixels: torch.Tensor,
        k: int,
        instruction: str,
        sampling: TextSampling = TextSampling(),
        seed: int | None = None,
    ) -> list[list[str]]:
        """Sample `k` descriptions per image (temperature 0: greedy, the k answers equal)."""

    @abstractmethod
    def save_pretrained(self, folder: str | Path, gathered: tuple[dict | None, bool] | None = None) -> Path:
        """Save weights and processing files where the model's own library loads them. Under FSDP2
        every rank calls it and rank 0 writes. `gathered`: `_gathered_state_dict()`'s result when
        the caller holds it already (the weights are then not gathered again)."""

    @abstractmethod
    def lora_targets(self) -> list[str] | str:
        """peft `target_modules` that LoRA adapts by default: the language model's projections,
        never a frozen image tokenizer's layers of the same name."""

    def lora_module(self) -> nn.Module:
        """The module peft injects LoRA layers into (a transformers model)."""
        return self.model

    def generation_modules(self) -> list[nn.Module]:
        """The modules used only to draw images, never to read them (e.g. image-token embeddings
        and the image head). Training only these changes generation and leaves every reading
        computation (R_G, descriptions, answers) exactly the initial model's."""
        raise ConfigError(f"{type(self).__name__} declares no generation-only modules")

    def sharding_units(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one (FSDP2 `fully_shard`, FSDP1 auto-wrap): those the
        adapter calls directly; the rest is the root unit."""
        return []

    def checkpointing_units(self) -> list[nn.Module]:
        """The blocks whose activations are recomputed in backward under activation checkpointing."""
        return []

    def unsharded_modules(self) -> list[nn.Module]:
        """Frozen parts kept whole on every rank under FSDP2 (e.g. the image tokenizer: no gradient,
        and decoding or encoding then needs no collective)."""
        return []

    def fully_shard(self, mesh, mp_policy=None) -> None:
        """Shard the weights over `mesh` with FSDP2 (`torch.distributed.fsdp.fully_shard`): one unit
        per `sharding_units()` block, the rest of `self.model` the root unit (all-gathered by
        `_gather_root` before the adapter's calls, which never go through the root's forward), and
        `unsharded_modules()` replicated."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        units = self.sharding_units()
        if not units:
            raise ConfigError(f"{type(self).__name__} does not support FSDP2 sharding (no sharding_units)")
        options = dict(mesh=mesh, mp_policy=mp_policy or MixedPrecisionPolicy(), reshard_after_forward=True)
        for unit in units:
            fully_shard(unit, **options)
        ignored = {p for module in self.unsharded_modules() for p in module.parameters()}
        fully_shard(self.model, ignored_params=ignored, **options)
        if mesh.get_group().name() == "gloo":
            # pytorch issue 162338: FSDP2's ReduceOp.AVG over gloo was reported to sum the gradients.
            # Plain sums plus FSDP's own division average them either way.
            for unit in [*units, self.model]:
                unit.set_force_sum_reduction_for_comms(True)

    @property
    def _is_sharded(self) -> bool:
        """`self.model` was sharded by `fully_shard` (FSDP2)."""
        from torch.distributed.fsdp import FSDPModule

        return isinstance(self.model, FSDPModule)

    @property
    def _fsdp1_wrapped(self) -> bool:
        """Some part of the model is wrapped by FSDP1 (`FullyShardedDataParallel`), as Lightning's
        FSDPStrategy does with an auto-wrap policy."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        return any(isinstance(m, FullyShardedDataParallel) for m in self.model.modules())

    def _gather_root(self) -> bool:
        """All-gather the root FSDP2 unit's weights (True) if the model is sharded: the adapter's
        calls go to submodules, never to the root's own forward, where FSDP would do it. Every
        rank must get here equally often (a collective)."""
        if self._is_sharded:
            # FSDP picks the root at the first forward it sees; ours never runs, so do it here (all
            # units then share one backward callback that reduce-scatters the root's gradients)
            self.model._get_fsdp_state()._lazy_init()
            self.model.unshard()
            return True
        return False

    def _gathered_state_dict(self) -> tuple[dict | None, bool]:
        """For `save_pretrained`: (the full state dict gathered on rank 0 when sharded, else None;
        whether this rank writes). Under FSDP2 every rank must call it."""
        if not self._is_sharded:
            return None, True
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state_dict = get_model_state_dict(self.model, options=options)
        return state_dict, torch.distributed.get_rank() == 0

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


# Which direction each model call belongs to: LoRA for one direction is off in the other's calls.
_DIRECTION_OF_CALL = {"sample_images": "t2i", "image_logprobs": "t2i", "text_logprobs": "i2t", "sample_texts": "i2t"}


def _in_direction(method: Callable, direction: str) -> Callable:
    """`method` run with LoRA as `direction` uses it: off when `direction` is in the adapter's
    `lora_off_in`, the direction's own set with `lora_per_direction`."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if direction not in self.lora_off_in and not self.lora_per_direction:
            return method(self, *args, **kwargs)
        from dualfw.core.lora import lora_in_direction

        with lora_in_direction(self, direction):
            return method(self, *args, **kwargs)

    return call


class FrozenView:
    """An adapter seen read-only as another model: every call runs without gradients inside
    `context()` (e.g. `dualfw.core.lora.adapters_off`: the initial model under LoRA), or on a frozen copy.

    It offers the adapter's reading and drawing calls, so the Reference, a frozen scorer and
    `rollouts_from: initial` use it wherever they would use the adapter.
    """

    def __init__(self, adapter: LMMAdapter, context: Callable[[], ContextManager] | None = None) -> None:
        self.adapter, self.context = adapter, context or contextlib.nullcontext

    def __getattr__(self, name: str):
        attribute = getattr(self.adapter, name)
        if name not in _VIEWED:
            return attribute

        def call(*args, **kwargs):
            with torch.no_grad(), self.context():
                return attribute(*args, **kwargs)

        return call


# The calls a frozen view runs inside its context (everything else passes through, e.g. image_size).
_VIEWED = {"sample_images", "decode_images", "encode_images", "image_logprobs", "text_logprobs", "sample_texts"}
