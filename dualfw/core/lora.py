"""LoRA through peft: one set for both directions, a set for one direction, or a set for each.

Adapters used by one direction: with `for_direction="t2i"` the LoRA layers are active while the
model draws (`sample_images`, `image_logprobs`) and off while it reads (`text_logprobs`,
`sample_texts`), so understanding, R_G and every answer stay exactly the base's while drawing
learns through the language model itself (its attention to the prompt's words); `"i2t"` the other
way round. Such adapters cannot be merged into shared weights, so an export keeps them apart: the
base weights where the model's own library loads them, the adapters in `<folder>/lora/` (a peft
adapter folder) and `<folder>/dualfw_lora.json` saying which direction uses them.
`load_saved_lora` attaches them again when an adapter is built from that folder.

A set for each direction (`LoraSpec.per_direction`): drawing calls run the "t2i" set and reading
calls the "i2t" set, so in joint training each direction's loss trains its own set and R_G reads
through the set the i2t direction trains. Exported apart too, each set in `<folder>/lora/<direction>`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

from torch import nn

from dualfw.core.errors import ConfigError

# in an exported folder: {"for_direction": "t2i", "path": "lora"} (one direction), or
# {"per_direction": {"t2i": "lora/t2i", "i2t": "lora/i2t"}} (a set for each)
LORA_FILE = "dualfw_lora.json"
DIRECTIONS = ("t2i", "i2t")


@dataclass
class LoraSpec:
    """LoRA through peft. The Reference (and a frozen scorer) then reuse the policy with its
    adapters disabled instead of holding a second copy of the model."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    #: peft target_modules (names, or a regex matched against full module names); None: the
    #: adapter's declared defaults (`LMMAdapter.lora_targets`, the language model's projections)
    target_modules: list[str] | str | None = None
    #: a separate set for each direction (drawing calls use one, reading calls the other), never
    #: merged; needs the policy's `train: all`
    per_direction: bool = False


def apply_lora(adapter, spec: LoraSpec, for_direction: Literal["t2i", "i2t"] | None = None):
    """Inject LoRA layers into `adapter.lora_module()` in place; returns the PeftModel. With
    `for_direction` the layers are off in the other direction's calls; with `spec.per_direction`
    each direction gets its own set (see the module docstring)."""
    from peft import LoraConfig, get_peft_model

    if has_lora(adapter):
        raise ConfigError(
            "model.init_args.lora: the model already carries LoRA adapters (an export trained with "
            "them for one direction); train it without model.init_args.lora, or start from its base"
        )
    targets = adapter.lora_targets() if spec.target_modules is None else spec.target_modules
    targets = targets if isinstance(targets, str) else list(targets)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets)
    if spec.per_direction and for_direction is not None:
        raise ConfigError("model.init_args.lora.per_direction gives each direction a set: it needs model.init_args.train: all")
    module = adapter.lora_module()
    try:
        if spec.per_direction:
            peft_model = get_peft_model(module, config, adapter_name="t2i")
            peft_model.add_adapter("i2t", config)
            for name, p in module.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True)  # peft marks only its active set trainable
            _set_sets(adapter, peft_model)
            return peft_model
        peft_model = get_peft_model(module, config)
    except ValueError as err:
        names = sorted({name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(
            f"model.init_args.lora.target_modules {targets} match no layer of the model "
            f"(linear layers are named e.g. {', '.join(names[:12])}): {str(err).splitlines()[0]}"
        ) from None
    _set_direction(adapter, for_direction, peft_model)
    return peft_model


def _set_direction(adapter, for_direction: str | None, peft_model) -> None:
    if for_direction is not None and for_direction not in DIRECTIONS:
        raise ConfigError(f"LoRA for_direction must be one of {DIRECTIONS} or None, got {for_direction!r}")
    adapter.lora_off_in = frozenset(d for d in DIRECTIONS if for_direction not in (None, d))
    # a list keeps the PeftModel (which wraps the adapter's own weights) out of the module tree
    adapter._split_peft = [peft_model] if adapter.lora_off_in else []


def _set_sets(adapter, peft_model) -> None:
    adapter.lora_per_direction = True
    adapter._split_peft = [peft_model]


def is_split(adapter) -> bool:
    """Whether `adapter` carries LoRA that cannot be merged (for one direction, or a set for each)."""
    return bool(getattr(adapter, "_split_peft", None))


@contextlib.contextmanager
def lora_in_direction(adapter, direction: str) -> Iterator[None]:
    """Run a `direction` call ("t2i" drawing, "i2t" reading) with the adapter's LoRA as that
    direction uses it: off (`lora_off_in`), its own set (`lora_per_direction`), or as it is."""
    if direction in adapter.lora_off_in:
        with adapters_off(adapter.lora_module()):
            yield
    elif adapter.lora_per_direction:
        with _active_set(adapter.lora_module(), direction):
            yield
    else:
        yield


def _active_set(module: nn.Module, name: str):
    """Run with LoRA set `name` active in every layer, then put back each layer's active sets."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    before = {id(m): list(m.active_adapters) for m in layers}
    return _switched(layers, lambda m: m.set_adapter(name), lambda m: m.set_adapter(before[id(m)]))


@contextlib.contextmanager
def _switched(layers: list, switch, restore) -> Iterator[None]:
    """Run with `switch(layer)` done to each LoRA layer, then `restore(layer)`, and put back every
    adapter weight's requires_grad (peft's set_adapter, also behind enable_adapters, freezes the
    inactive sets and unfreezes the active one)."""
    flags = [(p, p.requires_grad) for m in layers for name in m.adapter_layer_names for p in getattr(m, name).parameters()]
    for layer in layers:
        switch(layer)
    try:
        yield
    finally:
        for layer in layers:
            restore(layer)
        for p, flag in flags:
            p.requires_grad_(flag)


def has_lora(adapter) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in adapter.lora_module().modules())


def adapters_off(module: nn.Module):
    """Run with every LoRA layer of `module` off, then restore each layer and its weights'
    requires_grad as they were (peft's own `disable_adapter` does not put back requires_grad):
    nests inside peft's `disable_adapter` and itself."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters]
    return _switched(layers, lambda m: m.enable_adapters(False), lambda m: m.enable_adapters(True))


def save_model(adapter, folder: str | Path) -> Path:
    """Save `adapter` where its library loads it: `save_split` when it carries LoRA that cannot be
    merged (applied or loaded), else `adapter.save_pretrained`."""
    if is_split(adapter):
        return save_split(adapter, folder)
    return adapter.save_pretrained(folder)


def save_split(adapter, folder: str | Path) -> Path:
    """Export a model whose LoRA serves one direction, or has a set for each: the base weights
    through `adapter.save_pretrained` (LoRA layers taken out, then put back), the adapters beside
    them; under FSDP2 the weights are gathered once for both."""
    folder = Path(folder)
    (peft_model,) = adapter._split_peft
    state_dict, writes = adapter._gathered_state_dict()  # under FSDP2 every rank calls it
    if writes:
        lora_state = None
        if state_dict is not None:  # keys relative to the transformers model; peft's are under base_model.model
            lora_state = {f"base_model.model.{k}": v for k, v in state_dict.items()}
        peft_model.save_pretrained(folder / "lora", state_dict=lora_state, safe_serialization=True)
    base_state = None
    if state_dict is not None:  # the base weights under their own names: no LoRA, no peft wrapper level
        base_state = {k.replace(".base_layer.", "."): v for k, v in state_dict.items() if "lora_" not in k}
    lora_layers = _take_out_lora(adapter.lora_module())
    try:
        adapter.save_pretrained(folder, gathered=(base_state, writes))
    finally:
        _put_back(lora_layers)
    if writes:
        if adapter.lora_per_direction:  # peft writes each named set in its own subfolder
            saved = {"per_direction": {d: f"lora/{d}" for d in DIRECTIONS}}
        else:
            (for_direction,) = [d for d in DIRECTIONS if d not in adapter.lora_off_in]
            saved = {"for_direction": for_direction, "path": "lora"}
        (folder / LORA_FILE).write_text(json.dumps(saved) + "\n")
    return folder


def _take_out_lora(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap every LoRA layer for its base layer (in place); returns what `_put_back` needs."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    swapped = []
    for name, child in list(module.named_modules()):
        if isinstance(child, BaseTunerLayer):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            swapped.append((parent, attr, child))
            setattr(parent, attr, child.get_base_layer())
    return swapped


def _put_back(swapped: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, attr, layer in swapped:
        setattr(parent, attr, layer)


def load_saved_lora(adapter, folder: str | Path) -> None:
    """Attach the one-direction LoRA adapters of an exported folder (no-op without them), frozen;
    the base weights keep their requires_grad. Every adapter built from a folder calls this."""
    marker = Path(folder) / LORA_FILE
    if not marker.exists():
        return
    try:
        saved = json.loads(marker.read_text())
        per_direction = "per_direction" in saved
        if per_direction:  # peft set name -> folder
            sets = {d: Path(folder) / saved["per_direction"][d] for d in DIRECTIONS}
        else:
            for_direction, sets = saved["for_direction"], {"default": Path(folder) / saved["path"]}
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"'{marker}' is not a dualfw LoRA description ({err})") from None
    for path in sets.values():
        if not (path / "adapter_config.json").is_file():
            raise ConfigError(f"'{marker}' names LoRA adapters in '{path}', which holds no adapter_config.json")
    from peft import PeftModel

    module = adapter.lora_module()
    flags = [(p, p.requires_grad) for p in module.parameters()]
    (name, path), *others = sets.items()
    peft_model = PeftModel.from_pretrained(module, path, adapter_name=name, is_trainable=False)  # injects in place
    for name, path in others:
        peft_model.load_adapter(path, adapter_name=name, is_trainable=False)
    for p, flag in flags:
        p.requires_grad_(flag)
    if per_direction:
        _set_sets(adapter, peft_model)
    else:
        _set_direction(adapter, for_direction, peft_model)
