"""The pieces of a KV-cache decode loop that every adapter's image sampler shares: weight dtypes,
the token sampler (greedy or warped multinomial), one decode step through a text model's layers,
a cache layer preallocated for the whole generation, and image resizing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from dualfw.core.interface import ImageSampling

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# text models whose decoder layers `decode_step` calls one by one
_LAYER_LOOP_MODELS = ("LlamaModel", "Emu3TextModel")


def token_sampler(sampling: ImageSampling, seed: int | None, device: torch.device):
    """logits (rows, codebook) -> next token per row: argmax when greedy, else warped multinomial."""
    from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if sampling.temperature == 0:
        return lambda logits: logits.argmax(-1)
    warpers = LogitsProcessorList()
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k > 0:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    def sample(logits):
        probs = F.softmax(warpers(None, logits) if warpers else logits, dim=-1)
        # torch.multinomial's own draw of one sample, argmax(p / E) with E ~ Exp(1): the same tokens
        # from the same generator, without its input checks, which wait for the device every step
        return probs.div_(torch.empty_like(probs).exponential_(generator=gen)).argmax(-1)

    return sample


def decode_step(lm, embeds, bias, positions, rope, cache) -> torch.Tensor:
    """One new token per row through the language model; returns its final hidden states.

    For the text models in `_LAYER_LOOP_MODELS` this is their forward's layer loop without what
    that rebuilds at every call (position ids, mask preprocessing, rotary cos/sin, a sliced
    ModuleList, the output dataclass): the sampler builds `bias` and `rope` once. Same modules,
    same arguments to each decoder layer, so the same numbers. Any other text model goes through
    its own forward.
    """
    if type(lm).__name__ not in _LAYER_LOOP_MODELS:
        return lm(inputs_embeds=embeds, attention_mask=bias, position_ids=positions, cache=cache, use_cache=True).last_hidden_state
    hidden = embeds
    for layer in lm.layers:
        hidden = layer(hidden, attention_mask=bias, position_embeddings=rope, position_ids=positions, cache=cache, use_cache=True)
    return lm.norm(hidden)


class SlotLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in buffers preallocated for the whole generation.

    Each step writes its keys and values into the next slot in place and attention reads views of
    the filled part: no per-step torch.cat of the whole cache (DynamicCache), and no attending over
    the still-empty slots (StaticCache). Starts from a prefix cache of R rows, repeated k times
    (row r becomes rows r*k .. r*k + k - 1).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, k: int, max_len: int) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        rows, heads, filled, _ = keys.shape
        self._keys = keys.new_empty(rows * k, heads, max_len, keys.shape[-1])
        self._values = values.new_empty(rows * k, heads, max_len, values.shape[-1])
        self._keys.unflatten(0, (rows, k))[:, :, :, :filled] = keys[:, None]
        self._values.unflatten(0, (rows, k))[:, :, :, :filled] = values[:, None]
        self.keys, self.values = self._keys[:, :, :filled], self._values[:, :, :filled]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        self._keys[:, :, start:end] = key_states
        self._values[:, :, start:end] = value_states
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values


def resize(pixels: torch.Tensor, side: int) -> torch.Tensor:
    if pixels.shape[-1] == side and pixels.shape[-2] == side:
        return pixels
    return F.interpolate(pixels, size=(side, side), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
