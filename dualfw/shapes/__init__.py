"""The Shapes world: exact scenes, GenEval-style prompts, captions, POPE questions, exact detector."""

from dualfw.shapes.detector import ShapesDetector, scene_detections
from dualfw.shapes.text import (
    TAGS,
    describe_scene,
    enumerate_geneval_prompts,
    generate_geneval_prompts,
    pope_questions,
    sample_caption,
    true_statements,
)
from dualfw.shapes.world import (
    DEFAULT_WORLD,
    PALETTE,
    Scene,
    ShapeObject,
    WorldConfig,
    relations,
    render,
    render_pil,
    sample_scene,
    satisfies_record,
    scene_for_record,
)

__all__ = [
    "DEFAULT_WORLD",
    "PALETTE",
    "Scene",
    "ShapeObject",
    "ShapesDetector",
    "TAGS",
    "WorldConfig",
    "describe_scene",
    "enumerate_geneval_prompts",
    "generate_geneval_prompts",
    "pope_questions",
    "relations",
    "render",
    "render_pil",
    "sample_caption",
    "sample_scene",
    "satisfies_record",
    "scene_detections",
    "scene_for_record",
    "true_statements",
]
