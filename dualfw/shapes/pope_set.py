"""A ready-to-use Shapes POPE set on disk: rendered scenes plus POPE question files.

`build_shapes_pope_set(folder)` writes

    folder/images/00000.png ...              rendered scenes (PIL-readable RGB PNGs)
    folder/annotations.jsonl                 {"image": "00000.png", "objects": [{"shape", "color", "box"}]}
    folder/shapes_pope_{split}.jsonl         POPE question files (random, popular, adversarial)
    folder/manifest.json                     the parameters it was built with

and returns the question file per split, the `questions` / `image_folder` inputs of
`dualfw.eval.callbacks.PopeCallback`. Building is deterministic in `seed`; a folder already built
with the same parameters is reused as is, one built with other parameters is an error (never
silently overwritten).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dualfw.core.errors import ConfigError
from dualfw.core.files import resolve_path, write_jsonl
from dualfw.shapes.text import POPE_SPLITS, pope_questions
from dualfw.shapes.world import DEFAULT_WORLD, WorldConfig, render_pil, sample_scene

MANIFEST = "manifest.json"


def question_file(folder: str | Path, split: str) -> Path:
    """Path of a split's question file inside a Shapes POPE folder."""
    return Path(folder) / f"shapes_pope_{split}.jsonl"


def build_shapes_pope_set(
    folder: str | Path,
    num_images: int = 50,
    seed: int = 0,
    splits: Sequence[str] = POPE_SPLITS,
    n_pos: int = 3,
    world: WorldConfig = DEFAULT_WORLD,
) -> dict[str, Path]:
    """Render `num_images` random scenes into `folder/images` and write one POPE question file per
    split (see the module docstring). Questions ask about colored shapes ("Is there a red circle in
    the image?"), exactly half "yes", as `dualfw.shapes.text.pope_questions` builds them.
    Returns {split: question file}."""
    unknown = [s for s in splits if s not in POPE_SPLITS]
    if unknown:
        raise ConfigError(f"unknown POPE split(s) {unknown}; expected some of {', '.join(POPE_SPLITS)}")
    if num_images < 1:
        raise ConfigError(f"num_images must be at least 1, got {num_images}")
    folder = Path(folder)
    params = {
        "num_images": num_images,
        "seed": seed,
        "splits": list(splits),
        "n_pos": n_pos,
        "world": json.loads(json.dumps(asdict(world))),
    }
    files = {s: question_file(folder, s) for s in splits}
    manifest = folder / MANIFEST
    if manifest.is_file():
        built = json.loads(manifest.read_text(encoding="utf-8"))
        if built != params:
            raise ConfigError(
                f"{manifest}: this Shapes POPE folder was built with other parameters ({built}); "
                f"remove the folder or choose another one"
            )
        if all(f.is_file() for f in files.values()):
            return files
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, world) for _ in range(num_images)]
    names = [f"{i:05d}.png" for i in range(num_images)]
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name, scene in zip(names, scenes):
        render_pil(scene).save(images / name)
    write_jsonl(
        (
            {"image": name, "objects": [{"shape": o.shape, "color": o.color, "box": list(o.box)} for o in scene.objects]}
            for name, scene in zip(names, scenes)
        ),
        folder / "annotations.jsonl",
    )
    for split, path in files.items():
        write_jsonl(pope_questions(scenes, split, seed=seed, image_names=names, n_pos=n_pos, world=world), path)
    manifest.write_text(json.dumps(params, indent=1) + "\n", encoding="utf-8")  # last: marks the set complete
    return files


@dataclass
class ShapesPopeSet:
    """A Shapes POPE set built on first use: the `source` of `dualfw.eval.callbacks.PopeCallback`.

    folder: where to build or find it; None: `<run folder>/pope_shapes`.
    num_images: rendered scenes (about 4.7 questions each per split).
    seed: scenes and questions.
    resolution: image side of the rendered scenes (images are resized to the model's anyway).
    """

    folder: str | None = None
    num_images: int = 50
    seed: int = 0
    resolution: int = 32

    def build(self, run_folder: Path) -> tuple[dict[str, Path], Path]:
        folder = resolve_path(self.folder) if self.folder else Path(run_folder) / "pope_shapes"
        files = build_shapes_pope_set(folder, num_images=self.num_images, seed=self.seed, world=WorldConfig(resolution=self.resolution))
        return files, folder / "images"
