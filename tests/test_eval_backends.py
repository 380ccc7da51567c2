"""Evaluation backends on tiny randomly initialised models built here (nothing is downloaded):
open_clip color classifier and CLIPScore, a transformers OWL-ViT detector, torchmetrics CLIPScore,
FID; and the clear errors when local weights are missing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dualfw.eval.backends import (
    COLOR_TEMPLATES,
    HFZeroShotDetector,
    MissingWeightsError,
    OpenClipColorClassifier,
    OpenClipScore,
    crop_detection,
    make_fid,
    make_torchmetrics_clip_score,
)
from dualfw.eval.detection import ColorClassifier, Detection, Detector
from dualfw.eval.geneval import COLORS, score_image

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """(model name, config JSON path, weights path) of a random tiny open_clip model."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip")
    config = folder / "DualfwTinyCLIP.json"
    config.write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("DualfwTinyCLIP", pretrained=None)
    weights = folder / "tiny.pt"
    torch.save(model.state_dict(), weights)
    return "DualfwTinyCLIP", config, weights


def _byte_vocab() -> dict[str, int]:
    """A minimal CLIP BPE vocabulary (single bytes, no merges) so tokenizers build offline."""
    from open_clip.tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def _tiny_clip_tokenizer(folder: Path):
    """CLIPTokenizer over `_byte_vocab` (transformers 5 takes the vocabulary directly; 4.x reads files)."""
    from transformers import CLIPTokenizer

    vocab = _byte_vocab()
    try:
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    except TypeError:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def _tiny_clip_text_kwargs(vocab: dict[str, int]) -> dict:
    return dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )


@pytest.fixture(scope="module")
def tiny_owlvit(tmp_path_factory) -> Path:
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    folder = tmp_path_factory.mktemp("owlvit")
    vocab = _byte_vocab()
    config = OwlViTConfig(
        text_config=_tiny_clip_text_kwargs(vocab),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    torch.manual_seed(0)
    OwlViTForObjectDetection(config).save_pretrained(folder)
    size = {"height": 32, "width": 32}
    OwlViTProcessor(
        image_processor=OwlViTImageProcessor(size=size, crop_size=size),
        tokenizer=_tiny_clip_tokenizer(folder / "tok"),
    ).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------- color classifier


class RGBStub(torch.nn.Module):
    """Fake CLIP: an image embeds as its mean RGB, a text as the RGB of the first color word in it."""

    PROTOTYPES = {"red": (1.0, 0, 0), "green": (0, 1.0, 0), "blue": (0, 0, 1.0)}

    def __init__(self):
        super().__init__()
        self.texts: list[str] = []

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(2, 3))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.float()

    def tokenizer(self, texts):
        self.texts.extend(texts)
        return torch.tensor([next(self.PROTOTYPES[w] for w in t.replace("-", " ").split() if w in self.PROTOTYPES)
                             for t in texts])


def _to_tensor(pil):
    return torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)


def test_color_classifier_templates_crop_and_mask_background():
    stub = RGBStub()
    clf = OpenClipColorClassifier.from_model(stub, _to_tensor, stub.tokenizer)
    assert isinstance(clf, ColorClassifier)
    image = np.zeros((20, 20, 3), np.uint8)
    image[:, :] = (0, 200, 0)  # green everywhere ...
    image[2:6, 2:6] = (220, 0, 0)  # ... but a red square
    colors = ["red", "green", "blue"]
    assert clf(image, Detection("apple", (2, 2, 6, 6), 0.9), colors) == "red"
    # A box around the square that is mostly green background: green without a mask ...
    box = (0, 0, 16, 16)
    assert clf(image, Detection("apple", box, 0.9), colors) == "green"
    # ... red once a mask greys out (#999999, no hue) everything but the square.
    mask = np.zeros((20, 20), bool)
    mask[2:6, 2:6] = True
    assert clf(image, Detection("apple", box, 0.9, mask=mask), colors) == "red"
    assert "a photo of a red apple" in stub.texts and "a photo of a green-colored apple" in stub.texts
    assert "a photo of a blue object" in stub.texts
    assert len(stub.texts) == len(COLOR_TEMPLATES) * 3  # text weights cached per class


def test_crop_detection_pixels():
    image = np.arange(10 * 10 * 3, dtype=np.uint8).reshape(10, 10, 3)
    mask = np.zeros((10, 10), bool)
    mask[3, 3] = True
    crop = np.asarray(crop_detection(image, Detection("x", (2.4, 2.6, 5.5, 6.0), 1.0, mask=mask)))
    assert crop.shape == (3, 4, 3)  # x 2..6, y 3..6 after rounding
    assert tuple(crop[0, 1]) == tuple(image[3, 3]) and tuple(crop[0, 0]) == (153, 153, 153)


def _hand_cosines(model, preprocess, tokenizer, crop: np.ndarray, object_name: str) -> tuple[np.ndarray, torch.Tensor]:
    """GenEval's color rule computed directly: the cosine between the crop's embedding and each
    color's mean of the normalised embeddings of the three official templates; and those color
    embeddings (colors, embed_dim)."""
    from PIL import Image

    with torch.no_grad():
        feats = model.encode_image(preprocess(Image.fromarray(crop))[None])[0]
        feats = feats / feats.norm()
        columns = []
        for color in COLORS:
            texts = [f"a photo of a {color} {object_name}", f"a photo of a {color}-colored {object_name}",
                     f"a photo of a {color} object"]
            emb = model.encode_text(tokenizer(texts))
            mean = (emb / emb.norm(dim=-1, keepdim=True)).mean(0)
            columns.append(mean / mean.norm())
        text = torch.stack(columns)
    return (text @ feats).numpy(), text


def test_open_clip_color_classifier_from_local_weights(tiny_open_clip):
    from itertools import combinations

    import open_clip

    name, config, weights = tiny_open_clip
    clf = OpenClipColorClassifier(model_name=name, weights=str(weights))
    image = np.zeros((40, 48, 3), np.uint8)
    boxes = [(0, 0, 16, 20), (16, 0, 32, 20), (32, 0, 48, 20), (0, 20, 16, 40), (16, 20, 32, 40), (32, 20, 48, 40)]
    solid = [(220, 20, 20), (20, 200, 40), (30, 40, 230), (240, 240, 240), (10, 10, 10), (250, 200, 0)]
    for (x1, y1, x2, y2), rgb in zip(boxes, solid):
        image[y1:y2, x1:x2] = rgb
    dets = [Detection("car", box, 0.9) for box in boxes]
    # the expectation from the same weights loaded separately, crops sliced from the array
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer(name)
    hand = [_hand_cosines(model.eval(), preprocess, tokenizer, image[y1:y2, x1:x2], "car") for x1, y1, x2, y2 in boxes]
    cosines = np.stack([c for c, _ in hand])  # (crops, colors)
    assert torch.allclose(clf.text_classifier("car"), hand[0][1].T, atol=1e-6)
    assert clf.classify(image, dets, COLORS) == [COLORS[i] for i in cosines.argmax(1)]
    # every choice between two colors, where the crops differ: a classifier that ignored the
    # image (or the crop) would fail some of them
    disagree = 0
    for a, b in combinations(range(len(COLORS)), 2):
        pair = [COLORS[a], COLORS[b]]
        expected = [pair[int(c[b] > c[a])] for c in cosines]
        assert clf.classify(image, dets, pair) == expected, pair
        disagree += len(set(expected)) > 1
    assert disagree > 0
    # Usable by the GenEval rule as is: right for the color it sees, wrong for another one.
    seen = COLORS[int(cosines[0].argmax())]
    other = next(c for c in COLORS if c != seen)
    for color, correct in ((seen, True), (other, False)):
        meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": color}], "prompt": "x"}
        assert score_image(meta, dets[:1], image, clf).correct is correct


def test_open_clip_missing_weights_name_the_config_key(tiny_open_clip, tmp_path):
    name, config, _ = tiny_open_clip
    with pytest.raises(MissingWeightsError, match=r"color_classifier\.init_args\.weights"):
        OpenClipColorClassifier(model_name=name, weights=str(tmp_path / "nope.pt"))
    with pytest.raises(MissingWeightsError, match=r"color_classifier\.init_args\.weights is not set"):
        OpenClipColorClassifier(model_name="ViT-L-14", weights=None)
    with pytest.raises(MissingWeightsError, match=r"clip_score\.init_args\.weights"):
        OpenClipScore(model_name=name, weights="openai")  # a tag, never a download
    with pytest.raises(ValueError, match="download"):
        OpenClipScore(model_name="hf-hub:org/model", weights=None)


# ---------------------------------------------------------------------------- CLIPScore


def test_clip_score_definition_with_a_stub():
    class Stub(torch.nn.Module):
        def encode_image(self, x):
            return x.mean(dim=(2, 3))[:, :2]

        def encode_text(self, t):
            return t.float()

    def tok(texts):
        return torch.tensor([[1.0, 1.0] if t == "diag" else [-1.0, 0.0] for t in texts])

    images = [np.full((4, 4, 3), (200, 0, 0), np.uint8)] * 2
    scores = OpenClipScore.from_model(Stub(), _to_tensor, tok)(images, ["diag", "opposite"])
    assert scores.tolist() == pytest.approx([100 / np.sqrt(2), 0.0])  # 100 * cos, clipped at 0


def test_open_clip_score_from_local_weights(tiny_open_clip):
    name, config, weights = tiny_open_clip
    score = OpenClipScore(model_name=name, weights=str(weights), model_config=str(config))
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    s = score(images, ["a photo of a dog", "a cat", "a red car"])
    assert s.shape == (3,) and bool(((s >= 0) & (s <= 100)).all())
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        score(images[:2], ["x"])


def test_torchmetrics_clip_score_from_local_folder(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    vocab = _byte_vocab()
    config = CLIPConfig(
        text_config=_tiny_clip_text_kwargs(vocab),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(tmp_path)
    size = {"shortest_edge": 32}
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size=size, crop_size={"height": 32, "width": 32}),
        tokenizer=_tiny_clip_tokenizer(tmp_path / "tok"),
    ).save_pretrained(tmp_path)
    metric = make_torchmetrics_clip_score(str(tmp_path))
    metric.update(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), ["a dog", "a cat"])
    value = float(metric.compute())
    assert 0.0 <= value <= 100.0
    with pytest.raises(MissingWeightsError, match=r"clip_score\.init_args\.model_name_or_path"):
        make_torchmetrics_clip_score(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------- detector


def test_owlvit_detector_from_local_folder(tiny_owlvit):
    det = HFZeroShotDetector(str(tiny_owlvit), score_threshold=0.0)
    assert isinstance(det, Detector)
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    out = det(image, ["cat", "dog"])
    assert len(out) == (32 // 8) ** 2  # one best class per predicted box, threshold 0
    for d in out:
        assert isinstance(d, Detection) and d.label in ("cat", "dog")
        assert len(d.box) == 4 and all(isinstance(v, float) for v in d.box)
        assert 0 <= d.box[0] <= d.box[2] <= 64 and 0 <= d.box[1] <= d.box[3] <= 48
        assert 0.0 <= d.score <= 1.0
    strict = HFZeroShotDetector(str(tiny_owlvit), score_threshold=0.5)
    assert all(d.score >= 0.5 for d in strict(image, ["cat", "dog"]))
    assert det(image, []) == []


def test_detector_missing_folder_names_the_config_key(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"detector\.init_args\.path: no such dir"):
        HFZeroShotDetector(str(tmp_path / "owlvit-missing"))


# ---------------------------------------------------------------------------- FID


class MeanColor(torch.nn.Module):
    """Feature extractor: per-channel means of 2x2 quadrants (12 features) of float images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.float(), 2).flatten(1)


def test_fid_with_user_feature_extractor():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(64, 3, 8, 8, generator=g)
    fid = make_fid(feature_extractor=MeanColor())
    fid.update(real, real=True)
    fid.update(real, real=False)
    assert float(fid.compute()) == pytest.approx(0.0, abs=1e-3)
    fid.reset()
    fid.update(real, real=True)
    fid.update(real + 0.5, real=False)  # a pure mean shift of 0.5 on 12 features
    assert float(fid.compute()) == pytest.approx(12 * 0.25, rel=1e-3)


def test_fid_inception_from_local_weights_without_download(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with pytest.raises(MissingWeightsError, match=r"fid\.init_args\.feature_extractor_weights_path"):
        make_fid(feature_extractor_weights_path=str(tmp_path / "pt_inception.pth"))
    with pytest.raises(MissingWeightsError, match="is not set"):
        make_fid()

    # Random InceptionV3 weights in the torch-fidelity layout, made without any download.
    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        state = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    weights = tmp_path / "pt_inception.pth"
    torch.save(state, weights)

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download Inception weights")

    monkeypatch.setattr(fe, "load_state_dict_from_url", no_download)
    fid = make_fid(feature_extractor_weights_path=str(weights), feature=64)
    imgs = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    fid.update(imgs, real=True)
    fid.update(imgs, real=False)
    assert float(fid.compute()) == pytest.approx(0.0, abs=1e-2)
