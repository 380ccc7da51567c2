"""The Shapes world: scenes of flat colored shapes on a grey background, rendered exactly.

Everything here is deterministic from a numpy Generator, so scenes, prompts and verdicts can be
reproduced bit for bit. Shapes are rasterised without anti-aliasing so that every object pixel
holds exactly its palette color; the detector relies on that for clean renders and tolerates
drift for images a model draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

# GenEval's color vocabulary with one RGB value per name. Only a well separated subset is used by
# default (see DEFAULT_COLORS); the rest are here so a world can opt into them.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "orange": (255, 140, 0),
    "yellow": (255, 255, 0),
    "green": (0, 190, 0),
    "blue": (0, 0, 255),
    "purple": (150, 0, 210),
    "pink": (255, 130, 200),
    "brown": (140, 70, 20),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}
# Minimum pairwise RGB distance among these six plus the background is 190 (green vs black),
# so colors survive lossy tokenisation and a model's color drift.
DEFAULT_COLORS: tuple[str, ...] = ("red", "yellow", "green", "blue", "black", "white")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (128, 128, 128)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of a Shapes world. Sizes default to values scaled from the 32 px design.

    resolution: image side in pixels (32 or 64 are the intended values).
    min_size / max_size: object bounding-box side in pixels (inclusive range).
    gap: minimum empty pixels between two objects' boxes, so components never touch.
    margin: minimum empty pixels between an object and the image border.
    """

    resolution: int = 32
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = DEFAULT_COLORS
    background: tuple[int, int, int] = BACKGROUND
    min_objects: int = 1
    max_objects: int = 4
    min_size: int | None = None
    max_size: int | None = None
    gap: int | None = None
    margin: int = 1

    def __post_init__(self) -> None:
        scale = self.resolution / 32
        # >= 10 px at 32 px keeps a shape recognisable after 4x4-patch VQ tokenisation.
        if self.min_size is None:
            object.__setattr__(self, "min_size", round(10 * scale))
        if self.max_size is None:
            object.__setattr__(self, "max_size", round(14 * scale))
        if self.gap is None:
            object.__setattr__(self, "gap", max(2, round(2 * scale)))
        unknown = [c for c in self.colors if c not in PALETTE]
        if unknown:
            raise ValueError(f"colors not in PALETTE: {unknown}")
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"shapes not supported: {unknown}")


DEFAULT_WORLD = WorldConfig()


@dataclass(frozen=True)
class ShapeObject:
    """One object: a shape of one palette color inside the box [left, left+size) x [top, top+size)."""

    shape: str
    color: str
    size: int
    left: int
    top: int

    @property
    def center(self) -> tuple[float, float]:
        """(x, y) center of the object's box in pixel-edge coordinates."""
        return (self.left + self.size / 2, self.top + self.size / 2)

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2) in pixel-edge coordinates; equals the exact detector's box."""
        return (float(self.left), float(self.top), float(self.left + self.size), float(self.top + self.size))


@dataclass(frozen=True)
class Scene:
    """A rendered-to-be image: objects on a plain background."""

    objects: tuple[ShapeObject, ...]
    resolution: int = 32
    background: tuple[int, int, int] = BACKGROUND

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        """Number of objects matching the shape and/or color (None matches anything)."""
        return sum(
            1 for o in self.objects if (shape is None or o.shape == shape) and (color is None or o.color == color)
        )


# ---------------------------------------------------------------------------------------------
# Rasterisation
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean (height, width) mask of `shape` filling a width x height box (pixel-center rule).

    The renderer and the detector's template matching share this function, so a clean render
    matches its template exactly. Non-square boxes give ellipses / stretched triangles, which the
    detector uses to fit imperfect drawings. The result is cached: treat it as read-only.
    """
    ys = np.arange(height)[:, None] + 0.5
    xs = np.arange(width)[None, :] + 0.5
    if shape == "square":
        mask = np.ones((height, width), dtype=bool)
    elif shape == "circle":
        # Ellipse inscribed in the box; for a square box every edge row/column keeps a pixel.
        mask = ((xs - width / 2) / (width / 2)) ** 2 + ((ys - height / 2) / (height / 2)) ** 2 <= 1.0
    elif shape == "triangle":
        # Apex up, base on the bottom row. Row r spans half-width (r+1)/height * width/2, which
        # keeps 1-2 pixels in the top row so the box is exactly width x height.
        rows = np.arange(height)[:, None]
        half = (rows + 1) / height * (width / 2)
        mask = np.abs(xs - width / 2) <= half + 1e-9
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask.setflags(write=False)
    return mask


def render(scene: Scene) -> np.ndarray:
    """Render a scene to a uint8 (H, W, 3) RGB array."""
    res = scene.resolution
    image = np.empty((res, res, 3), dtype=np.uint8)
    image[:] = scene.background
    for obj in scene.objects:
        mask = shape_mask(obj.shape, obj.size, obj.size)
        region = image[obj.top : obj.top + obj.size, obj.left : obj.left + obj.size]
        region[mask] = PALETTE[obj.color]
    return image


def to_pil(image: np.ndarray) -> Image.Image:
    """Wrap a uint8 RGB array as a PIL image."""
    return Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="RGB")


def render_pil(scene: Scene) -> Image.Image:
    """Render a scene as a PIL image."""
    return to_pil(render(scene))


# ---------------------------------------------------------------------------------------------
# Geometry shared with the GenEval rules
# ---------------------------------------------------------------------------------------------


def relations(box_a: Sequence[float], box_b: Sequence[float], margin: float = 0.0) -> set[str]:
    """Relations of A to B under GenEval's rule ("left of" if dx < -0.5, ...; several may hold).

    margin > 0 demands the relation hold more clearly (e.g. dx < -0.5 - margin); the GenEval rule
    itself is margin = 0.
    """
    from dualfw.eval.geneval import relative_position

    return relative_position(box_a, box_b, threshold=0.5 + margin)


# ---------------------------------------------------------------------------------------------
# Sampling scenes
# ---------------------------------------------------------------------------------------------


def _boxes_clear(a: ShapeObject, b: ShapeObject, gap: int) -> bool:
    """True if the two boxes are at least `gap` empty pixels apart on some axis."""
    return (
        a.left + a.size + gap <= b.left
        or b.left + b.size + gap <= a.left
        or a.top + a.size + gap <= b.top
        or b.top + b.size + gap <= a.top
    )


def place_objects(
    specs: Sequence[tuple[str, str]],
    rng: np.random.Generator,
    world: WorldConfig = DEFAULT_WORLD,
    accept: Any = None,
    max_restarts: int = 2000,
) -> Scene:
    """Place objects (shape, color) at random non-overlapping positions and sizes.

    Rejection sampling: each object gets a random size and position; a layout that cannot fit an
    object after a few tries, or that `accept(scene) -> bool` rejects, is restarted from scratch.
    After half the restarts sizes are forced to the minimum so crowded layouts still terminate.
    """
    res, margin, gap = world.resolution, world.margin, world.gap
    for restart in range(max_restarts):
        small = restart >= max_restarts // 2
        placed: list[ShapeObject] = []
        for shape, color in specs:
            for _ in range(50):
                size = world.min_size if small else int(rng.integers(world.min_size, world.max_size, endpoint=True))
                hi = res - margin - size
                if hi < margin:
                    raise ValueError("objects do not fit the resolution")
                left = int(rng.integers(margin, hi, endpoint=True))
                top = int(rng.integers(margin, hi, endpoint=True))
                obj = ShapeObject(shape, color, size, left, top)
                if all(_boxes_clear(obj, other, gap) for other in placed):
                    placed.append(obj)
                    break
            else:
                break  # could not fit this object: restart the layout
        else:
            scene = Scene(tuple(placed), res, world.background)
            if accept is None or accept(scene):
                return scene
    raise RuntimeError(f"could not place {len(specs)} objects satisfying the constraints")


def sample_scene(
    rng: np.random.Generator, world: WorldConfig = DEFAULT_WORLD, n_objects: int | None = None
) -> Scene:
    """A random scene: 1-4 objects (world.min_objects..max_objects) of random shape and color."""
    if n_objects is None:
        n_objects = int(rng.integers(world.min_objects, world.max_objects, endpoint=True))
    specs = [
        (world.shapes[int(rng.integers(len(world.shapes)))], world.colors[int(rng.integers(len(world.colors)))])
        for _ in range(n_objects)
    ]
    return place_objects(specs, rng, world)


def satisfies_record(
    scene: Scene, record: Mapping[str, Any], relation_margin: float = 0.0, strict_counts: bool = True
) -> bool:
    """Whether a scene's ground truth satisfies a GenEval metadata record.

    Mirrors the GenEval rules on exact ground truth (every object is a confident detection). With
    strict_counts, a clause of class X with count n needs exactly n objects of X, so a clause is
    never satisfied by which-of-several ordering luck; the generator's scenes are built that way.
    """
    groups: list[list[ShapeObject] | None] = []
    for clause in record["include"]:
        objs = [o for o in scene.objects if o.shape == clause["class"]]
        ok = len(objs) == clause["count"] if strict_counts else len(objs) >= clause["count"]
        if ok and "color" in clause:
            ok = all(o.color == clause["color"] for o in objs)
        if ok and clause.get("position"):
            rel, j = clause["position"][0], int(clause["position"][1])
            target = groups[j]
            ok = bool(target) and all(
                rel in relations(o.box, t.box, relation_margin) for o in objs for t in target
            )
        groups.append(objs if ok else None)
        if not ok:
            return False
    for clause in record.get("exclude", []):
        if scene.count(clause["class"]) >= clause["count"]:
            return False
    return True


def scene_for_record(
    record: Mapping[str, Any],
    rng: np.random.Generator,
    world: WorldConfig = DEFAULT_WORLD,
    distractor_prob: float = 0.0,
    relation_margin: float = 0.1,
) -> Scene:
    """A random scene that satisfies a GenEval metadata record (for text-to-image training data).

    Each include clause contributes exactly `count` objects of its class, in its color if it names
    one (else a random palette color). Position clauses are met by rejection sampling with a
    margin beyond GenEval's 0.5 threshold so the relation is visually clear. With probability
    `distractor_prob` per free slot (up to world.max_objects), a distractor of a class the prompt
    does not mention is added; it cannot change the GenEval verdict. Default 0: no clutter.
    """
    specs: list[tuple[str, str]] = []
    for clause in record["include"]:
        for _ in range(int(clause["count"])):
            color = clause.get("color") or world.colors[int(rng.integers(len(world.colors)))]
            specs.append((clause["class"], color))
    mentioned = {c["class"] for c in record["include"]} | {c["class"] for c in record.get("exclude", [])}
    free_shapes = [s for s in world.shapes if s not in mentioned]
    if free_shapes and distractor_prob > 0:
        for _ in range(world.max_objects - len(specs)):
            if rng.random() < distractor_prob:
                shape = free_shapes[int(rng.integers(len(free_shapes)))]
                specs.append((shape, world.colors[int(rng.integers(len(world.colors)))]))
    # Shuffle so the first-placed (least constrained) object is not always the prompt's first.
    order = rng.permutation(len(specs))
    specs = [specs[i] for i in order]
    return place_objects(
        specs, rng, world, accept=lambda s: satisfies_record(s, record, relation_margin)
    )

