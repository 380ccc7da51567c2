import os
from pathlib import Path

import pytest
import torch

# never reach a hub from tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The reference data beside the checkout (official GenEval prompts, POPE questions). In CI it
    is always there, so its absence fails; elsewhere (a clone without it) the tests skip, saying why."""
    if not SHARED_DATA.is_dir():
        message = f"reference data folder {SHARED_DATA} is absent (it sits beside every checkout and in CI)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny Janus saved to a local folder, as a user's checkpoint would be."""
    from dualfw.adapters.tiny import save_tiny_janus

    return save_tiny_janus(tmp_path_factory.mktemp("tiny_janus"))


@pytest.fixture(scope="session")
def tiny_adapter(tiny_folder):
    from dualfw.adapters.janus import JanusAdapter

    return JanusAdapter(path=str(tiny_folder)).eval()


def _stepwise_logprobs(adapter, prompt, tokens, ids=None):
    """log_softmax of the generation head at each image position, one full forward per position
    (no cache, no batching): an independent reference for image_logprobs. `ids` replaces the
    prompt's own ids (e.g. an unconditional prompt)."""
    if ids is None:
        ids, _ = adapter.generation_inputs([prompt])
    embed = adapter.model.get_input_embeddings()(ids)
    rows = []
    with torch.no_grad():
        for t in range(tokens.shape[0]):
            img = adapter.model.prepare_embeddings_for_image_generation(tokens[None, :t])
            hidden = adapter.model.model.language_model(inputs_embeds=torch.cat([embed, img], 1)).last_hidden_state
            rows.append(adapter.model.model.generation_head(hidden[0, -1]).float().log_softmax(-1))
    return torch.stack(rows)


@pytest.fixture(scope="session")
def stepwise_logprobs():
    """`_stepwise_logprobs`: per-position image log-probs of a Janus adapter, computed without cache."""
    return _stepwise_logprobs


@pytest.fixture(scope="session")
def tiny_emu3_folder(tmp_path_factory) -> Path:
    """A tiny Emu3 saved to a local folder (64 px images, 8 x 8 codes), as a user's checkpoint would be."""
    from dualfw.adapters.tiny_emu3 import save_tiny_emu3

    return save_tiny_emu3(tmp_path_factory.mktemp("tiny_emu3"))


@pytest.fixture(scope="session")
def tiny_emu3(tiny_emu3_folder):
    """An Emu3Adapter on `tiny_emu3_folder`, with a negative prompt for CFG."""
    from dualfw.adapters.emu3 import Emu3Adapter

    return Emu3Adapter(path=str(tiny_emu3_folder), image_size=64, negative_prompt="blurry, low quality").eval()


def fit_args(tmp_path, tiny_folder, *extra, recipe: str = "t2i"):
    """`dualfw fit` arguments for a 2-step conf/<recipe>.yaml run of the tiny Janus into
    <tmp_path>/<recipe>/run (later arguments win: `extra` overrides any of these)."""
    return [
        "fit",
        "--config", str(Path(__file__).resolve().parents[1] / "conf" / f"{recipe}.yaml"),
        f"--model.init_args.model.init_args.path={tiny_folder}",
        "--data.init_args.inputs_per_step=2",
        "--data.init_args.k=3",
        "--data.init_args.progress=false",
        "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
        f"--trainer.logger.name={recipe}",
        "--trainer.logger.version=run",
        *extra,
    ]


def weights_by_base_name(model) -> dict:
    """`model`'s parameters under the base model's names (peft's `base_layer` level removed), LoRA
    weights included: compares a model that carries LoRA with one that does not."""
    return {name.replace(".base_layer.", "."): p for name, p in model.named_parameters()}
