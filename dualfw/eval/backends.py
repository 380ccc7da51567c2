"""Pluggable evaluation backends, all loaded from LOCAL files only (nothing is ever downloaded).

- `OpenClipColorClassifier`: GenEval's zero-shot color classifier (open_clip, official templates),
  a `ColorClassifier`.
- `HFZeroShotDetector`: an open-vocabulary detector from a local transformers folder (OWL-ViT,
  OWLv2; Grounding-DINO-like models through the processor's grounded post-processing), a `Detector`.
- `OpenClipScore` and `make_torchmetrics_clip_score`: CLIPScore (`GenEvalCallback.clip_score`).
- `make_fid`: torchmetrics FrechetInceptionDistance with a user feature extractor or a local
  Inception weights file (`GenEvalCallback.fid_reference`).

Each class is built from plain init arguments so that a config can select it
(`class_path` + `init_args`). A missing weights path raises `MissingWeightsError` naming the
config key to set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dualfw.core.errors import MissingFileError
from dualfw.eval.detection import Detection
from dualfw.eval.geneval import COLORS

# The official GenEval color prompts ({color} is the candidate color, {object} the detected class).
COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {color} {object}",
    "a photo of a {color}-colored {object}",
    "a photo of a {color} object",
)
# The official default ("#999") for pixels outside a detection mask, spelled so that YAML and
# jsonargparse keep it: a "#..." default or config value reaches the class as None (read as a comment).
CROP_BACKGROUND = "rgb(153, 153, 153)"


class MissingWeightsError(MissingFileError):
    """A backend's local weights are missing; the message names the config key to set. A
    `ConfigError` (and a FileNotFoundError), so the CLI reports it as one line."""


def require_local_path(path: str | os.PathLike[str] | None, key: str, kind: str = "file") -> Path:
    """Return `path` as an absolute Path if it exists as a `kind` ("file" or "dir"), else raise
    MissingWeightsError naming the config `key`. Absolute paths also keep open_clip from reading a
    relative name as a pretrained *tag* (which would download)."""
    hint = f"set `{key}` to a local {kind}; dualfw never downloads weights"
    if path is None or str(path) == "":
        raise MissingWeightsError(f"{key} is not set: {hint}")
    p = Path(path).expanduser().absolute()
    ok = p.is_file() if kind == "file" else p.is_dir()
    if not ok:
        raise MissingWeightsError(f"{key}: no such {kind}: {str(path)!r}; {hint}")
    return p


# --------------------------------------------------------------------------------------------------
# open_clip loading
# --------------------------------------------------------------------------------------------------


def load_open_clip(
    model_name: str,
    weights: str | os.PathLike[str] | None,
    *,
    key: str,
    model_config: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor], Callable[[Sequence[str]], torch.Tensor]]:
    """(model, eval preprocess, tokenizer) for an open_clip architecture with weights from a local
    file. `model_config` optionally registers a custom architecture JSON file (its stem is the name)
    first. "hf-hub:" names are refused (they download); "local-dir:" folders are allowed and carry
    their own weights (then `weights` may be None)."""
    import open_clip

    if model_name.startswith("hf-hub:"):
        raise ValueError(f"{key}: model name {model_name!r} would download from the Hugging Face Hub; use a local file")
    if model_config is not None:
        open_clip.add_model_config(require_local_path(model_config, key.rsplit(".", 1)[0] + ".model_config"))
    pretrained = None
    if not model_name.startswith("local-dir:"):
        pretrained = str(require_local_path(weights, key))
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name,
        pretrained=pretrained,
        device=device,
        pretrained_image=False,  # never fetch tower weights
        pretrained_hf=False,  # (alias of pretrained_text) never fetch HF text weights
    )
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


def _to_pil(image: np.ndarray | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


def crop_detection(
    image: np.ndarray | Image.Image, detection: Detection, background: str | None = CROP_BACKGROUND
) -> Image.Image:
    """The crop the official evaluator classifies: where the detection has a mask, pixels outside it
    are replaced by `background` (None keeps them); then the box is cropped (rounded to pixels, at
    least 1 pixel wide and high)."""
    pil = _to_pil(image)
    if detection.mask is not None and background is not None:
        mask = np.asarray(detection.mask, dtype=bool)
        if mask.shape != (pil.height, pil.width):
            raise ValueError(f"mask shape {mask.shape} does not match image {(pil.height, pil.width)}")
        blank = Image.new("RGB", pil.size, color=background)
        pil = Image.composite(pil, blank, Image.fromarray(mask.astype(np.uint8) * 255))
    x1, y1, x2, y2 = (int(round(v)) for v in detection.box[:4])
    x1, y1 = max(0, min(x1, pil.width - 1)), max(0, min(y1, pil.height - 1))
    x2, y2 = max(x1 + 1, min(x2, pil.width)), max(y1 + 1, min(y2, pil.height))
    return pil.crop((x1, y1, x2, y2))


# --------------------------------------------------------------------------------------------------
# (a) Color classifier
# --------------------------------------------------------------------------------------------------


class OpenClipColorClassifier:
    """GenEval's zero-shot color classifier.

    For a detection of class X, each color c gets the text embedding: mean of the L2-normalised
    embeddings of the three official templates ("a photo of a {c} X", "a photo of a {c}-colored X",
    "a photo of a {c} object"), re-normalised. The crop (`crop_detection`) is embedded with the
    model's eval preprocess, normalised, and the color with the largest cosine wins.
    The original uses open_clip ViT-L-14 with OpenAI weights: pass `model_name="ViT-L-14"` and the
    local path of those weights as `weights`.
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        weights: str | None = None,
        model_config: str | None = None,
        device: str = "cpu",
        background: str | None = CROP_BACKGROUND,
        config_key: str = "color_classifier.init_args.weights",
    ) -> None:
        model, preprocess, tokenizer = load_open_clip(
            model_name, weights, key=config_key, model_config=model_config, device=device
        )
        self._setup(model, preprocess, tokenizer, device, background)

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        device: str = "cpu",
        background: str | None = CROP_BACKGROUND,
    ) -> "OpenClipColorClassifier":
        """Wrap an already built open_clip model (tests, or a model shared with CLIPScore)."""
        obj = cls.__new__(cls)
        obj._setup(model, preprocess, tokenizer, device, background)
        return obj

    def _setup(self, model, preprocess, tokenizer, device, background) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.background = background
        self._text_cache: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}

    @torch.no_grad()
    def text_classifier(self, object_name: str, colors: Sequence[str] = COLORS) -> torch.Tensor:
        """(embed_dim, len(colors)) zero-shot weights for `object_name`, cached."""
        cache_key = (object_name, tuple(colors))
        if cache_key not in self._text_cache:
            columns = []
            for color in colors:
                texts = [t.format(color=color, object=object_name) for t in COLOR_TEMPLATES]
                emb = F.normalize(self.model.encode_text(self.tokenizer(texts).to(self.device)).float(), dim=-1)
                columns.append(F.normalize(emb.mean(dim=0), dim=0))
            self._text_cache[cache_key] = torch.stack(columns, dim=1)
        return self._text_cache[cache_key]

    @torch.no_grad()
    def classify(
        self, image: np.ndarray | Image.Image, detections: Sequence[Detection], colors: Sequence[str] = COLORS
    ) -> list[str]:
        """Colors of several detections of one image (batched; all must share one class)."""
        if not detections:
            return []
        labels = {d.label for d in detections}
        if len(labels) != 1:
            raise ValueError(f"classify() expects detections of one class, got {sorted(labels)}")
        batch = torch.stack([self.preprocess(crop_detection(image, d, self.background)) for d in detections])
        feats = F.normalize(self.model.encode_image(batch.to(self.device)).float(), dim=-1)
        logits = feats @ self.text_classifier(detections[0].label, colors)
        return [colors[i] for i in logits.argmax(dim=1).tolist()]

    def __call__(self, image: np.ndarray, detection: Detection, colors: Sequence[str]) -> str:
        return self.classify(image, [detection], colors)[0]


# --------------------------------------------------------------------------------------------------
# (b) Open-vocabulary detector from a local transformers folder
# --------------------------------------------------------------------------------------------------


class HFZeroShotDetector:
    """Open-vocabulary detector: AutoProcessor + AutoModelForZeroShotObjectDetection from a local
    folder (`local_files_only=True`).

    OWL-ViT / OWLv2: one text query per class (`query_template`), each predicted box takes its best
    query (sigmoid score), as transformers' own post-processing does; boxes (cx, cy, w, h in [0, 1])
    are scaled to pixels (OWLv2 pads to a square at the bottom/right, so both axes scale by the
    longer side). Other models (e.g. Grounding DINO) go through the processor's
    `post_process_grounded_object_detection` and their text labels are mapped back to classes.
    Detections scoring below `score_threshold` are dropped; keep it below GenEval's 0.3 so the
    GenEval rules do the official thresholding.
    """

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        score_threshold: float = 0.1,
        query_template: str = "a photo of a {}",
        config_key: str = "detector.init_args.path",
    ) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        folder = require_local_path(path, config_key, kind="dir")
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        model = AutoModelForZeroShotObjectDetection.from_pretrained(folder, local_files_only=True)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.score_threshold = score_threshold
        self.query_template = query_template

    @property
    def model_type(self) -> str:
        return str(getattr(self.model.config, "model_type", ""))

    @torch.no_grad()
    def __call__(self, image: np.ndarray, classes: Sequence[str]) -> list[Detection]:
        if not classes:
            return []
        pil = _to_pil(image)
        if self.model_type in ("owlvit", "owlv2"):
            return self._owl(pil, list(classes))
        return self._grounded(pil, list(classes))

    def _owl(self, pil: Image.Image, classes: list[str]) -> list[Detection]:
        queries = [[self.query_template.format(c) for c in classes]]
        inputs = self.processor(text=queries, images=pil, return_tensors="pt", truncation=True).to(self.device)
        out = self.model(**inputs)
        scores, best = torch.sigmoid(out.logits[0].float()).max(dim=-1)  # (num_boxes,)
        cx, cy, w, h = out.pred_boxes[0].float().unbind(-1)
        if self.model_type == "owlv2":
            sx = sy = float(max(pil.width, pil.height))
        else:
            sx, sy = float(pil.width), float(pil.height)
        boxes = torch.stack([(cx - w / 2) * sx, (cy - h / 2) * sy, (cx + w / 2) * sx, (cy + h / 2) * sy], dim=-1)
        # Clip to the image: OWLv2 boxes may reach into the padding.
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, pil.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, pil.height)
        keep = (scores >= self.score_threshold).nonzero().flatten().tolist()
        return [
            Detection(
                label=classes[int(best[i])], box=tuple(float(v) for v in boxes[i].tolist()), score=float(scores[i])
            )
            for i in keep
        ]

    def _grounded(self, pil: Image.Image, classes: list[str]) -> list[Detection]:
        # Grounding-DINO style prompt: lower-case phrases separated by " . ".
        text = " . ".join(c.lower() for c in classes) + " ."
        inputs = self.processor(images=pil, text=text, return_tensors="pt").to(self.device)
        out = self.model(**inputs)
        post = getattr(self.processor, "post_process_grounded_object_detection", None)
        if post is None:
            raise NotImplementedError(f"no grounded post-processing for model type {self.model_type!r}")
        result = post(
            out, inputs.get("input_ids"), threshold=self.score_threshold, target_sizes=[(pil.height, pil.width)]
        )[0]
        names = result.get("text_labels", result.get("labels"))
        dets = []
        for name, score, box in zip(names, result["scores"].tolist(), result["boxes"].tolist()):
            cls = _match_class(str(name), classes)
            if cls is not None:
                dets.append(Detection(label=cls, box=tuple(float(v) for v in box), score=float(score)))
        return dets


def _match_class(phrase: str, classes: Sequence[str]) -> str | None:
    """Map a grounded phrase back to a class: exact (case-insensitive), else the longest class name
    contained in the phrase, else None."""
    p = phrase.strip().lower()
    for c in classes:
        if c.lower() == p:
            return c
    contained = [c for c in classes if c.lower() in p]
    return max(contained, key=len) if contained else None


# --------------------------------------------------------------------------------------------------
# (c) CLIPScore and FID
# --------------------------------------------------------------------------------------------------


class OpenClipScore:
    """CLIPScore with open_clip: 100 * max(cos(image embedding, text embedding), 0) per image,
    the same definition as torchmetrics' CLIPScore (w = 100)."""

    def __init__(
        self,
        model_name: str = "ViT-L-14",
        weights: str | None = None,
        model_config: str | None = None,
        device: str = "cpu",
        config_key: str = "clip_score.init_args.weights",
    ) -> None:
        model, preprocess, tokenizer = load_open_clip(
            model_name, weights, key=config_key, model_config=model_config, device=device
        )
        self._setup(model, preprocess, tokenizer, device)

    @classmethod
    def from_model(cls, model, preprocess, tokenizer, device: str = "cpu") -> "OpenClipScore":
        """Wrap an already built open_clip model."""
        obj = cls.__new__(cls)
        obj._setup(model, preprocess, tokenizer, device)
        return obj

    def _setup(self, model, preprocess, tokenizer, device) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray | Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """Per-image scores, shape (len(images),); image i is scored against prompts[i]."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return torch.zeros(0)
        pixels = torch.stack([self.preprocess(_to_pil(im)) for im in images]).to(self.device)
        img = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float(), dim=-1)
        return (100.0 * (img * txt).sum(dim=-1)).clamp(min=0.0).cpu()


def make_torchmetrics_clip_score(
    model_name_or_path: str, config_key: str = "clip_score.init_args.model_name_or_path"
):
    """torchmetrics CLIPScore from a LOCAL transformers CLIP folder (model + processor saved with
    `save_pretrained`), loaded with local_files_only=True (torchmetrics would otherwise fetch a
    Hub name)."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    folder = require_local_path(model_name_or_path, config_key, kind="dir")

    def load():
        return (
            _TensorFeatures(CLIPModel.from_pretrained(folder, local_files_only=True)),
            CLIPProcessor.from_pretrained(folder, local_files_only=True),
        )

    return CLIPScore(model_name_or_path=load)


class _TensorFeatures(torch.nn.Module):
    """Wraps a transformers CLIPModel so `get_image_features` / `get_text_features` return tensors.
    transformers 5 returns an output object (projected features in `pooler_output`), which
    torchmetrics 1.9's CLIPScore cannot normalise."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def make_fid(
    feature_extractor: torch.nn.Module | None = None,
    feature_extractor_weights_path: str | None = None,
    feature: int = 2048,
    normalize: bool = False,
    config_key: str = "fid.init_args.feature_extractor_weights_path",
    reset_real_features: bool = True,
):
    """torchmetrics FrechetInceptionDistance.

    With `feature_extractor` (an nn.Module mapping a batch of images to (N, D) features) that module
    is used as is. Otherwise the torch-fidelity InceptionV3 is built from the LOCAL weights file
    `feature_extractor_weights_path` (the `pt_inception-2015-12-05` state dict); a missing path
    raises MissingWeightsError naming `config_key` instead of letting torch-fidelity download.
    `normalize=True`: images are floats in [0, 1] (else uint8). `reset_real_features=False`: the
    reference (real) features survive `reset()`, so one reference serves many evaluations."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature_extractor is not None:
        return FrechetInceptionDistance(
            feature=feature_extractor, normalize=normalize, reset_real_features=reset_real_features
        )
    path = require_local_path(feature_extractor_weights_path, config_key)
    return FrechetInceptionDistance(
        feature=feature, normalize=normalize, reset_real_features=reset_real_features,
        feature_extractor_weights_path=str(path),
    )
