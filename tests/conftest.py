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
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data folder {SHARED_DATA} is absent (it sits beside every checkout and in CI)")
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
