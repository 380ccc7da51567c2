"""Supervised training of the Shapes base model (dualfw/assets/shapes_base) by `dualfw fit` runs.

From scratch, `python -m dualfw.shapes.build` (1a and 1b at once) makes the shipped checkpoint:

    dualfw fit --config conf/shapes/tokenizer.yaml   # 1a: VQ tokenizer, background on one code
    dualfw fit --config conf/shapes/reader.yaml      # 1b: captions + yes/no questions, draws nothing
    dualfw fit --config conf/shapes/base.yaml        # 2:  1b's model with 1a's VQ: read and draw

The earlier bases' longer chains are in docs/shapes-history.md.

Stage "vq" trains the Janus VQ tokenizer (encoder, codebook, decoder) to reconstruct rendered
scenes (a Janus VQ-VAE's own parts: this stage is Janus-specific). Stage "lm" freezes the VQ and
trains everything else on captioning, yes/no questions and text-to-image, through the prompt layouts
inference uses (`image_logprobs` for drawing; `understanding_prefix_ids` / `understanding_pixels`
for reading, batched over rows with different instructions), so training matches sampling; with
`t2i_batch_size: 0` it trains the reader alone, which needs no tokenizer yet.

The data are generated on the fly by `ShapesDataModule`: batch i is a pure function of (seed, i);
the seeds are in the configs.
"""

from __future__ import annotations

from typing import Iterator, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from dualfw.core.errors import ConfigError
from dualfw.core.lora import LoraSpec, apply_lora, save_model
from dualfw.adapters.janus import JanusAdapter
from dualfw.core.pixels import to_pixels, to_uint8
from dualfw.shapes.detector import ShapesDetector, detection_rates
from dualfw.shapes.text import (
    enumerate_geneval_prompts,
    pope_question_text,
    sample_caption,
    scene_entities,
    TAGS,
)
from dualfw.shapes.world import BACKGROUND, WorldConfig, render, sample_scene, scene_for_record

STAGES = ("vq", "lm")
DESCRIBE = "Describe this image."


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def question_example(scene, rng: np.random.Generator, world: WorldConfig, shape_only_prob: float) -> tuple[str, str]:
    """A POPE-style question about `scene` and its answer ("Yes"/"No"), half of them yes.

    Negatives are absent entities, half of them drawn uniformly and half sharing the shape or the
    color of a present object (the adversarial kind POPE's hardest split uses).
    """
    colored = rng.random() >= shape_only_prob
    present = sorted(scene_entities(scene, colored))
    colors = world.colors if colored else ("",)
    absent = [(c, s) for c in colors for s in world.shapes if (c, s) not in present]
    if rng.random() < 0.5 or not absent:
        return pope_question_text(present[int(rng.integers(len(present)))]), "Yes"
    if rng.random() < 0.5:
        anchor = present[int(rng.integers(len(present)))]
        near = [e for e in absent if (e[0] == anchor[0] and e[0]) or e[1] == anchor[1]]
        absent = near or absent
    return pope_question_text(absent[int(rng.integers(len(absent)))]), "No"


class ShapesStream(IterableDataset):
    """Endless batches; batch i depends only on (seed, i), so runs are reproducible bit for bit."""

    def __init__(self, dm: "ShapesDataModule", seed: int, start: int = 0, limit: int | None = None) -> None:
        self.dm, self.seed, self.start, self.limit = dm, seed, start, limit

    def __iter__(self) -> Iterator[dict]:
        i = self.start
        while self.limit is None or i < self.start + self.limit:
            yield self.dm.make_batch(i, self.seed)
            i += 1


class ShapesDataModule(L.LightningDataModule):
    """Shapes-world training data, generated on the fly from a seed.

    Args:
        stage: "vq" (images only) or "lm" (understanding and text-to-image examples).
        batch_size: images per batch ("vq"), understanding examples per batch ("lm").
        t2i_batch_size: text-to-image examples per batch ("lm"); None = batch_size; 0 = an
            understanding-only stage (it needs no trained VQ, so it can run beside the VQ stage).
        seed: the data seed; batch i is a function of (seed, i) only.
        resolution: image side in pixels (the model's image size).
        question_prob: share of understanding examples that are yes/no questions (rest: captions).
        full_caption_prob: share of captions that are full scene descriptions (rest: short true
            statements, so short GenEval-style prompts stay in distribution).
        shape_only_prob: share of questions about a shape without its color.
        val_batches: fixed validation batches (drawn from another seed stream).
        t2i_tags: the GenEval tags that text-to-image prompts are drawn from, each equally often
            (None: all six), e.g. [colors, color_attr] for a stage that teaches colour.
    """

    def __init__(
        self,
        stage: str = "lm",
        batch_size: int = 32,
        t2i_batch_size: int | None = None,
        seed: int = 0,
        resolution: int = 32,
        question_prob: float = 0.5,
        full_caption_prob: float = 0.5,
        shape_only_prob: float = 0.3,
        val_batches: int = 2,
        t2i_tags: list[str] | None = None,
    ) -> None:
        super().__init__()
        if stage not in STAGES:
            raise ConfigError(f"data.init_args.stage must be one of {STAGES}, got {stage!r}")
        if batch_size < 1:
            raise ConfigError(f"data.init_args.batch_size must be >= 1, got {batch_size}")
        if t2i_batch_size is not None and t2i_batch_size < 0:
            raise ConfigError(f"data.init_args.t2i_batch_size must be >= 0, got {t2i_batch_size}")
        for name, p in (("question_prob", question_prob), ("full_caption_prob", full_caption_prob),
                        ("shape_only_prob", shape_only_prob)):
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"data.init_args.{name} must be in [0, 1], got {p}")
        self.stage, self.batch_size = stage, batch_size
        self.t2i_batch_size = batch_size if t2i_batch_size is None else t2i_batch_size
        self.seed, self.question_prob = seed, question_prob
        self.full_caption_prob, self.shape_only_prob = full_caption_prob, shape_only_prob
        self.val_batches = val_batches
        self.world = WorldConfig(resolution=resolution)
        records = enumerate_geneval_prompts(self.world)
        # t2i prompts: a tag uniformly, then a record of that tag uniformly (tags are equally weighted
        # in GenEval's overall score, while color_attr alone has 180 of the 240 distinct records)
        self.t2i_tags = list(TAGS if t2i_tags is None else t2i_tags)
        if not self.t2i_tags or any(tag not in TAGS for tag in self.t2i_tags):
            raise ConfigError(f"data.init_args.t2i_tags must be a non-empty list of {list(TAGS)}, got {t2i_tags!r}")
        self.records_by_tag = {tag: [r for r in records if r["tag"] == tag] for tag in self.t2i_tags}

    def make_batch(self, index: int, seed: int) -> dict:
        """Batch `index` of the stream `seed`."""
        rng = np.random.default_rng([seed, index])
        if self.stage == "vq":
            scenes = [sample_scene(rng, self.world) for _ in range(self.batch_size)]
            return {"pixels": to_pixels([render(s) for s in scenes])}
        u_images, instructions, answers = [], [], []
        for _ in range(self.batch_size):
            scene = sample_scene(rng, self.world)
            u_images.append(render(scene))
            if rng.random() < self.question_prob:
                question, answer = question_example(scene, rng, self.world, self.shape_only_prob)
            else:
                question, answer = DESCRIBE, sample_caption(scene, rng, self.full_caption_prob)
            instructions.append(question)
            answers.append(answer)
        g_images, prompts = [], []
        for _ in range(self.t2i_batch_size):
            tagged = self.records_by_tag[self.t2i_tags[int(rng.integers(len(self.t2i_tags)))]]
            record = tagged[int(rng.integers(len(tagged)))]
            g_images.append(render(scene_for_record(record, rng, self.world)))
            prompts.append(record["prompt"])
        return {
            "u_pixels": to_pixels(u_images),
            "instructions": instructions,
            "answers": answers,
            "g_pixels": to_pixels(g_images) if g_images else torch.zeros(0, 3, self.world.resolution, self.world.resolution),
            "prompts": prompts,
        }

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ShapesStream(self, self.seed), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ShapesStream(self, self.seed + 10_000, limit=self.val_batches), batch_size=None, num_workers=0)


def background_patches(
    pixels: torch.Tensor, grid: tuple[int, int], background=BACKGROUND, tolerance: float = 1.5
) -> torch.Tensor:
    """(n, 3, H, W) images in [0, 1] -> (n, h, w) bool: the patches of a `grid` whose pixels are all
    the background color, every channel within `tolerance` 8-bit levels (default: exact, as
    rendered; decoded images need more)."""
    color = torch.tensor(background, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1) / 255
    off = ((pixels - color).abs() > tolerance / 255).any(1, keepdim=True).float()
    return F.adaptive_max_pool2d(off, grid)[:, 0] == 0


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


def _vq(adapter: JanusAdapter):
    return adapter.model.model.vqmodel


class ShapesSFT(L.LightningModule):
    """Supervised training of a Janus adapter on the Shapes world.

    Args:
        model: the adapter to train (dualfw.JanusAdapter; `tiny` sizes for stage "vq", the
            stage-"vq" export folder as `path` for stage "lm").
        stage: "vq": train the VQ tokenizer (reconstruction, cosine codebook with dead-code
            restarts); "lm": freeze the VQ and train the rest (captions, yes/no answers, t2i).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay to 10% over
            trainer.max_steps.
        vq_beta: commitment weight. restart_every: steps between dead-code restarts (0: never).
        background_code: stage "vq": the code every pure-background patch must use (None: no rule).
            Without it the encoder (GroupNorm and attention see the whole image) spells plain
            background with hundreds of interchangeable codes, which then carry most of an image's
            log-likelihood; with it background is one token and a sample's likelihood is about its
            objects. Other patches are assigned among the remaining codes; a two-way cross-entropy
            (background code vs the best other code, temperature 0.1) keeps inference's nearest-code
            lookup on the right side for every patch.
        understanding_weight, t2i_weight: weights of the two stage-"lm" losses.
        understanding_mean: how answer tokens are averaged. "token": over every answer token of the
            batch, so a 16-token caption weighs 16 times a one-token "No", and the yes/no token
            that needs the image gets ~8% of the gradient; "example": within each answer, then
            over answers, so a question weighs as much as a caption.
        cfg_drop: probability that a t2i example's prompt is replaced by pad (the unconditional
            row of classifier-free guidance: BOS and <begin_of_image> are kept).
        export_dir: folder the trained model is saved to (save_pretrained, safetensors) when fit ends.
        vq_from: a model folder (or "dualfw:..." asset) whose VQ tokenizer weights replace `model`'s
            at start (same VQ config required), so stage "lm" can train a freshly built model
            (e.g. other vision-encoder sizes) on an already trained tokenizer. None: keep `model`'s.
        reading_lora: stage "lm": train LoRA adapters that are active only while the model reads
            instead of its weights, so the reader learns further while drawing stays exactly the
            model's (`dualfw.core.lora`; the export keeps them apart). Pair it with an
            understanding-only stage (data `t2i_batch_size: 0`): a drawing loss would train nothing.
    """

    def __init__(
        self,
        model: JanusAdapter,
        stage: str = "lm",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 50,
        vq_beta: float = 0.25,
        restart_every: int = 50,
        background_code: int | None = None,
        understanding_weight: float = 1.0,
        t2i_weight: float = 1.0,
        understanding_mean: Literal["token", "example"] = "token",
        cfg_drop: float = 0.1,
        export_dir: str | None = None,
        vq_from: str | None = None,
        reading_lora: LoraSpec | None = None,
    ) -> None:
        super().__init__()
        if stage not in STAGES:
            raise ConfigError(f"model.init_args.stage must be one of {STAGES}, got {stage!r}")
        if not 0.0 <= cfg_drop < 1.0:
            raise ConfigError(f"model.init_args.cfg_drop must be in [0, 1), got {cfg_drop}")
        if lr <= 0:
            raise ConfigError(f"model.init_args.lr must be > 0, got {lr}")
        if understanding_mean not in ("token", "example"):
            raise ConfigError(f"model.init_args.understanding_mean must be 'token' or 'example', got {understanding_mean!r}")
        self.understanding_mean = understanding_mean
        self.model, self.stage = model, stage
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.vq_beta, self.restart_every = vq_beta, restart_every
        vq = _vq(model)
        n_codes = vq.quantize.num_embeddings
        if background_code is not None and not 0 <= background_code < n_codes:
            raise ConfigError(f"model.init_args.background_code must be in [0, {n_codes}), got {background_code}")
        self.background_code = background_code
        self.understanding_weight, self.t2i_weight, self.cfg_drop = understanding_weight, t2i_weight, cfg_drop
        self.export_dir = export_dir
        if vq_from is not None:
            source = _vq(JanusAdapter(path=vq_from)).state_dict()
            target = vq.state_dict()
            if source.keys() != target.keys() or any(source[k].shape != target[k].shape for k in source):
                raise ConfigError(f"model.init_args.vq_from={vq_from!r}: its VQ config differs from the model's")
            vq.load_state_dict(source)
        for p in model.parameters():
            p.requires_grad_(False)
        trainable = vq.parameters() if stage == "vq" else (
            p for n, p in model.model.named_parameters() if not n.startswith("model.vqmodel.")
        )
        for p in trainable:
            p.requires_grad_(True)
        if reading_lora is not None:
            if stage != "lm":
                raise ConfigError("model.init_args.reading_lora trains the reader: it needs stage 'lm'")
            model.requires_grad_(False)
            apply_lora(model, reading_lora, for_direction="i2t")  # only the LoRA layers learn
        self._usage = torch.zeros(vq.quantize.num_embeddings, dtype=torch.long)
        if stage == "vq":
            self._normalise_codebook()

    # ---- stage vq ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _normalise_codebook(self) -> None:
        """Unit-norm codes: the encoder's Euclidean nearest code is then its cosine nearest code,
        and the decoder (which L2-normalises codes) sees exactly the codes training used."""
        w = _vq(self.model).quantize.embedding.weight
        w.copy_(F.normalize(w, dim=-1))

    def vq_forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Reconstruction through the VQ with a straight-through estimator; returns (loss, stats)."""
        vq = _vq(self.model)
        x = pixels * 2 - 1
        z = vq.quant_conv(vq.encoder(x))  # (n, D, h, w)
        n, d, h, w = z.shape
        zf = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=-1)
        codes = F.normalize(vq.quantize.embedding.weight, dim=-1)
        sim = zf @ codes.T
        stats = {}
        if self.background_code is None:
            idx = sim.argmax(-1)
            assign = sim.new_zeros(())
        else:
            bg = background_patches(pixels, (h, w)).reshape(-1)
            c = self.background_code
            others = sim.clone()
            others[:, c] = -2.0  # only background may use the background code
            best = others.argmax(-1)
            idx = torch.where(bg, c, best)
            # background code vs the best other code, each patch on its side of that margin
            pair = torch.stack([sim[:, c], others.gather(1, best[:, None])[:, 0]], dim=1)
            assign = F.cross_entropy(pair / 0.1, (~bg).long())
            stats["vq/assign"] = assign.detach()
        q = codes[idx]
        codebook = F.mse_loss(q, zf.detach())
        commit = F.mse_loss(zf, q.detach())
        q_st = zf + (q - zf).detach()
        rec = vq.decoder(vq.post_quant_conv(q_st.view(n, h, w, d).permute(0, 3, 1, 2)))
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = rec_loss + codebook + self.vq_beta * commit + assign
        if self.training:
            self._usage += torch.bincount(idx.detach().cpu(), minlength=len(self._usage))
            self._last_z = zf.detach()
        used = int((self._usage > 0).sum())
        return loss, {"vq/rec": rec_loss.detach(), "vq/codebook": codebook.detach(), "vq/used_codes": float(used), **stats}

    @torch.no_grad()
    def _restart_dead_codes(self, zf: torch.Tensor) -> None:
        """Codes unused since the last restart jump to random encoder outputs of this batch."""
        usage = self._usage.clone()
        if self.background_code is not None:
            usage[self.background_code] = 1  # reserved, never moved
        dead = (usage == 0).nonzero().squeeze(-1)
        if len(dead):
            w = _vq(self.model).quantize.embedding.weight
            pick = torch.randint(len(zf), (len(dead),), device=zf.device)
            w[dead.to(w.device)] = F.normalize(zf[pick] + 0.01 * torch.randn_like(zf[pick]), dim=-1)
        self._usage.zero_()

    # ---- stage lm ----------------------------------------------------------------------------------
    def understanding_loss(
        self, pixels: torch.Tensor, instructions: list[str], answers: list[str]
    ) -> tuple[torch.Tensor, dict]:
        """Cross-entropy of answer + <eos> given the image and the instruction (the prompt layout
        of `JanusAdapter.text_logprobs` / `sample_texts`), averaged as `understanding_mean` says;
        returns (loss, stats). Stats: "lm/yes_no_acc", how often the first answer token of the
        batch's yes/no questions ranks the right one of " Yes" / " No" higher (a cheap view of
        whether the reader grounds its answers on the image; absent without questions)."""
        ad, tok = self.model, self.model.processor.tokenizer
        rows = []
        for instruction, answer in zip(instructions, answers):
            prefix = ad.understanding_prefix_ids(instruction)
            target = tok(" " + answer.strip(), add_special_tokens=False).input_ids + [ad.eos_id]
            rows.append((prefix, target))
        width = max(len(p) + len(t) for p, t in rows)
        ids = torch.full((len(rows), width), ad.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (prefix, target) in enumerate(rows):  # right padding, as text_logprobs
            seq = prefix + target
            ids[i, : len(seq)] = torch.tensor(seq)
            attn[i, : len(seq)] = 1
            labels[i, len(prefix) : len(seq)] = torch.tensor(target)
        ids, attn, labels = ids.to(self.device), attn.to(self.device), labels.to(self.device)
        hidden = ad.model.model(
            input_ids=ids, pixel_values=ad.understanding_pixels(pixels), attention_mask=attn
        ).last_hidden_state
        logits = ad.model.lm_head(hidden[:, :-1]).float()
        targets = labels[:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        counted = (targets != -100).float()
        if self.understanding_mean == "token":
            loss = nll.sum() / counted.sum()
        else:
            loss = (nll.sum(1) / counted.sum(1)).mean()
        stats = {}
        questions = [i for i, a in enumerate(answers) if a.strip() in ("Yes", "No")]
        if questions:
            yes, no = (tok(" " + w, add_special_tokens=False).input_ids[0] for w in ("Yes", "No"))
            at = torch.tensor([len(rows[i][0]) - 1 for i in questions], device=logits.device)
            first = logits[torch.tensor(questions, device=logits.device), at]
            said_yes = first[:, yes] > first[:, no]
            truth = torch.tensor([answers[i].strip() == "Yes" for i in questions], device=logits.device)
            stats["lm/yes_no_acc"] = (said_yes == truth).float().mean()
        return loss, stats

    def t2i_loss(self, pixels: torch.Tensor, prompts: list[str], generator: torch.Generator | None = None) -> torch.Tensor:
        """`t2i_token_loss` of the images' VQ tokens."""
        with torch.no_grad():
            tokens = self.model.encode_images(pixels)
        return self.t2i_token_loss(tokens, prompts, generator)

    def t2i_token_loss(self, tokens: torch.Tensor, prompts: list[str], generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean negative log-likelihood of image tokens (n, N) given the prompt
        (`LMMAdapter.image_logprobs`), with the prompt dropped, as CFG's unconditional input, for a
        `cfg_drop` share (so guided sampling has an unconditional model to contrast)."""
        drop = None
        if self.cfg_drop > 0:
            drop = torch.rand(len(prompts), generator=generator) < self.cfg_drop
        return -self.model.image_logprobs(prompts, tokens, drop_prompt=drop).mean()

    # ---- Lightning ---------------------------------------------------------------------------------
    def _losses(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        if self.stage == "vq":
            if "pixels" not in batch:
                raise ConfigError("stage 'vq' needs image batches: set data.init_args.stage: vq")
            return self.vq_forward(batch["pixels"])
        if "prompts" not in batch:
            raise ConfigError("stage 'lm' needs text batches: set data.init_args.stage: lm")
        u, stats = self.understanding_loss(batch["u_pixels"], batch["instructions"], batch["answers"])
        if batch["prompts"]:
            g = self.t2i_loss(batch["g_pixels"], batch["prompts"], generator)
        else:  # an understanding-only stage
            g = u.new_zeros(())
        loss = self.understanding_weight * u + self.t2i_weight * g
        return loss, {"lm/understanding": u.detach(), "lm/t2i": g.detach(), **stats}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(10_000 + self.global_step)
        loss, stats = self._losses(batch, gen)
        n = len(batch.get("pixels", batch.get("u_pixels")))
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=n)
        self.log("loss", loss, batch_size=n, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, stats = self._losses(batch, torch.Generator().manual_seed(batch_idx))
        n = len(batch.get("pixels", batch.get("u_pixels")))
        self.log_dict({f"val/{k}": v for k, v in stats.items() if k != "vq/used_codes"}, batch_size=n)
        self.log("val/loss", loss, batch_size=n, prog_bar=True)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.stage == "vq":  # after the optimizer step: in-place edits would break backward
            # no restart after the last step: restarted codes sit on random encoder outputs
            # (half of them background) and nothing would train them away before export
            last = 0 < self.trainer.max_steps <= self.global_step  # max_steps -1: no step limit
            if self.restart_every and self.global_step % self.restart_every == 0 and not last:
                self._restart_dead_codes(self._last_z)
            self._normalise_codebook()

    def on_train_end(self) -> None:
        if self.export_dir and self.trainer.is_global_zero:
            save_model(self.model, self.export_dir)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = max(int(self.trainer.max_steps or 0), self.warmup_steps + 1)

        def schedule(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            t = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(t, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruction_rates(
    adapter: JanusAdapter, n: int = 300, seed: int = 1234, batch: int = 50, threshold: float = 0.9
) -> tuple[float, float]:
    """`detection_rates` on VQ reconstructions (encode -> decode) of `n` seeded random scenes;
    `threshold` 0.9 is GenEval's counting threshold, 0.3 its detection threshold."""
    world = WorldConfig(resolution=adapter.image_size)
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, world) for _ in range(n)]
    images = []
    for i in range(0, n, batch):
        pixels = to_pixels([render(s) for s in scenes[i : i + batch]])
        images.extend(to_uint8(adapter.decode_images(adapter.encode_images(pixels))))
    return detection_rates(scenes, images, ShapesDetector(world), threshold)
