"""dualfw: unified multimodal models that improve themselves with dual self-rewards."""

from dualfw.data.datamodule import SelfRewardDataModule
from dualfw.losses import DPO, GRPO, IPO, ChosenNLL, SimPO
from dualfw.models.base import ImageSampling, LMMAdapter, TextSampling
from dualfw.models.janus import JanusAdapter
from dualfw.modules.policy import LoraSpec, Policy
from dualfw.modules.reference import Reference
from dualfw.modules.scorer import DualScorer, RandomScorer

__version__ = "0.1.0"

__all__ = [
    "ChosenNLL",
    "DPO",
    "GRPO",
    "IPO",
    "LoraSpec",
    "DualScorer",
    "RandomScorer",
    "ImageSampling",
    "JanusAdapter",
    "LMMAdapter",
    "Policy",
    "Reference",
    "SelfRewardDataModule",
    "SimPO",
    "TextSampling",
]
