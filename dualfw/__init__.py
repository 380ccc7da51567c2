"""dualfw: unified multimodal models that improve themselves with dual self-rewards."""

from dualfw.adapters.emu3 import Emu3Adapter
from dualfw.adapters.janus import JanusAdapter
from dualfw.core.interface import ImageSampling, LMMAdapter, TextSampling
from dualfw.core.lora import LoraSpec
from dualfw.core.losses import DPO, GRPO, IPO, ChosenNLL, SimPO
from dualfw.training.callbacks import ExportPretrained, PairImageGrid, TimeSplit
from dualfw.training.datamodule import SelfRewardDataModule
from dualfw.training.policy import Policy
from dualfw.training.predict import BestOfKWriter
from dualfw.training.reference import Reference
from dualfw.training.scorer import DualScorer, RandomScorer
from dualfw.training.strategy import FSDP2Strategy

__version__ = "0.1.0"

__all__ = [
    "BestOfKWriter",
    "ChosenNLL",
    "DPO",
    "ExportPretrained",
    "GRPO",
    "IPO",
    "LoraSpec",
    "DualScorer",
    "Emu3Adapter",
    "FSDP2Strategy",
    "RandomScorer",
    "ImageSampling",
    "JanusAdapter",
    "LMMAdapter",
    "PairImageGrid",
    "Policy",
    "Reference",
    "SelfRewardDataModule",
    "SimPO",
    "TextSampling",
    "TimeSplit",
]
