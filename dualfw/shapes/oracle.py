"""The oracle reward of the Shapes world: the exact detector's GenEval verdict on each sampled image.

It is the upper bound a self-reward run is measured against: same prompts, sampling, pairing and
loss, but the pairs are chosen by the ground truth instead of by the model's own understanding.

    model:
      init_args:
        scorer:
          class_path: dualfw.shapes.oracle.OracleScorer
          init_args: {judge: both}
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from dualfw.core.errors import ConfigError
from dualfw.training.scorer import DualScorer
from dualfw.eval.geneval import parse_metadata
from dualfw.core.pixels import to_uint8
from dualfw.eval.runners import judge_images
from dualfw.shapes.detector import ShapesDetector
from dualfw.shapes.text import enumerate_geneval_prompts
from dualfw.shapes.world import WorldConfig

Judge = Literal["lenient", "strict", "both"]
JUDGES = ("lenient", "strict", "both")


class OracleScorer(DualScorer):
    """Rewards each sampled image by the GenEval rules applied to the exact Shapes detector:

        lenient: 1 if the image satisfies the prompt's record (GenEval's rules), else 0
        strict:  1 if it does and holds no object the prompt does not ask for, else 0
        both:    lenient + strict (0, 1 or 2): strictly right > right with extras > wrong

    Every training prompt must be one of the world's GenEval-style prompts
    (`dualfw.shapes.text.enumerate_geneval_prompts`, e.g. `dualfw:assets/shapes_prompts.jsonl`).
    Images only: the i2t direction has no oracle here.

    Args:
        judge: which verdict is the reward (see above).
        batch_size: images decoded per call.
    """

    def __init__(self, judge: Judge = "both", batch_size: int = 32) -> None:
        super().__init__(batch_size=batch_size)
        if judge not in JUDGES:
            raise ConfigError(f"scorer.judge must be one of {JUDGES}, got {judge!r}")
        self.judge = judge
        self._world: WorldConfig | None = None

    def _setup_world(self) -> None:
        if self._world is None:
            self._world = WorldConfig(resolution=self.model.image_size)
            self._detector = ShapesDetector(self._world)
            self._records = {r["prompt"]: parse_metadata(r) for r in enumerate_geneval_prompts(self._world)}

    def _image_rewards(self, tokens: Tensor, prompts: list[str]) -> Tensor:
        self._setup_world()
        unknown = sorted({p for p in prompts if p not in self._records})
        if unknown:
            raise ConfigError(
                f"OracleScorer: prompt {unknown[0]!r} is not a Shapes-world GenEval prompt "
                "(train on dualfw:assets/shapes_prompts.jsonl or prompts from enumerate_geneval_prompts)"
            )
        use_lenient, use_strict = self.judge != "strict", self.judge != "lenient"
        rewards = []
        for part in self._chunks(len(prompts)):
            images = to_uint8(self.model.decode_images(tokens[part]))
            lenient, strict = judge_images([self._records[p] for p in prompts[part]], images, self._detector)
            for right, strictly in zip(lenient, strict):
                rewards.append(float(use_lenient and right.correct) + float(use_strict and strictly.correct))
        return torch.tensor(rewards, device=tokens.device)

    def _text_rewards(self, image_tokens: Tensor, texts: list[list[str]]) -> Tensor:
        raise ConfigError("OracleScorer grades images only: use it with data.init_args.schedule: t2i")
