"""Emu3 through transformers' Emu3ForConditionalGeneration: one transformer, one vocabulary, one head.

Emu3 is the opposite design to Janus: a VQ-VAE turns an image into codes, each code is a token of
the text vocabulary ("<|visual token NNNNNN|>"), and the same embeddings, decoder and LM head read
and write them. An image is h rows of w visual tokens, each row closed by an end-of-line token.

In dualfw, image tokens are the codes only (codebook indices, N = h * w, like Janus'); this adapter
inserts the end-of-line tokens itself. Generation uses our own KV-cache loop (the prompt prefix run
once per prompt and shared by its K samples, the negative prompt once for all rows) with
transformers' CFG rule for Emu3 (`UnbatchedClassifierFreeGuidanceLogitsProcessor`: log-softmaxes
mixed, the unconditional branch a negative prompt), restricted to the visual tokens as the
`prefix_allowed_tokens_fn` of Emu3's generation recipe restricts them, so greedy decoding gives the
same tokens as `generate` (tests/test_emu3_parity.py). Reading scores an image's own tokens: no
decode and re-encode.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dualfw.adapters.decoding import DTYPES, SlotLayer, decode_step, resize, token_sampler
from dualfw.adapters.tiny_emu3 import TinyEmu3Spec, build_tiny_emu3
from dualfw.core.errors import ConfigError
from dualfw.core.files import check_model_weights, read_model_config
from dualfw.core.lora import load_saved_lora
from dualfw.core.interface import Images, ImageSampling, LMMAdapter, TextSampling

#: Emu3's VQ-VAE downsamples 8x in each direction (Emu3Processor assumes it)
DOWNSAMPLE = 8


def check_emu3_folder(path: str | Path) -> Path:
    """Fail early, naming the folder, when it does not hold a transformers Emu3 checkpoint."""
    folder, config = read_model_config(path)
    config_file = folder / "config.json"
    model_type = config.get("model_type")
    if model_type == "Emu3":
        raise ConfigError(
            f"'{config_file}' is BAAI's original Emu3 format (remote code); use a transformers conversion "
            "(e.g. Emu3-community/Emu3-Chat-hf, Emu3-community/Emu3-Gen-hf) or convert_emu3_weights_to_hf.py"
        )
    if model_type != "emu3":
        raise ConfigError(f"'{config_file}' has model_type {model_type!r}: Emu3Adapter needs model_type 'emu3'")
    check_model_weights(folder)
    return folder


class Emu3Adapter(LMMAdapter):
    """Emu3 (any transformers `Emu3ForConditionalGeneration`) as a dualfw model.

    Args:
        path: local folder with a transformers Emu3 checkpoint (config.json, safetensors weights,
            tokenizer and processor files). None builds a random tiny Emu3 from `tiny`.
        tiny: sizes of the tiny Emu3 built when `path` is None.
        dtype: weight dtype: float32, bfloat16 or float16. Log-probs are always float32.
        image_size: side in pixels of generated (and read) images, a multiple of 8; (image_size / 8)^2
            codes per image. The processor does not save its generation area, so it is set here:
            None means the tiny spec's size, or 720 (Emu3's published 720 x 720) for a checkpoint.
        negative_prompt: the text of CFG's unconditional branch (Emu3's recipe uses a list of
            defects); "" leaves only the image header.
        prompt_suffix: appended to every generation prompt (Emu3's recipe appends quality words).
        system_prompt: the system turn of understanding prompts ("" for none).
    """

    reads_pixels = False

    def __init__(
        self,
        path: str | None = None,
        tiny: TinyEmu3Spec | None = None,
        dtype: str = "float32",
        image_size: int | None = None,
        negative_prompt: str = "",
        prompt_suffix: str = "",
        system_prompt: str = "",
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        tiny = tiny or TinyEmu3Spec()
        image_size = image_size or (tiny.image_size if path is None else 720)
        if image_size <= 0 or image_size % DOWNSAMPLE:
            raise ConfigError(f"image_size {image_size} is not a multiple of {DOWNSAMPLE} (Emu3's VQ downsampling)")
        if path is None:
            model, processor = build_tiny_emu3(tiny)
            model = model.to(DTYPES[dtype])
        else:
            from transformers import Emu3ForConditionalGeneration, Emu3Processor

            folder = check_emu3_folder(path)
            model = Emu3ForConditionalGeneration.from_pretrained(folder, dtype=DTYPES[dtype], local_files_only=True)
            processor = Emu3Processor.from_pretrained(folder, local_files_only=True)
        # Emu3TextConfig defaults to attention dropout 0.1: log-probs of one sample would differ
        # between two train-mode calls. from_pretrained(attention_dropout=0) is refused; the config is not.
        model.config.text_config.attention_dropout = 0.0
        for layer in model.model.text_model.layers:
            layer.self_attn.attention_dropout = 0.0
        model.model.vqmodel.requires_grad_(False)  # Emu3's VQ tokenizer is frozen
        self.model, self.processor = model, processor
        self.negative_prompt, self.prompt_suffix, self.system_prompt = negative_prompt, prompt_suffix, system_prompt
        tok = processor.tokenizer
        self.bos_id, self.pad_id, self.eos_id = tok.bos_token_id, tok.pad_token_id, tok.eos_token_id
        mapping = model.vocabulary_mapping
        self.eol_id, self.placeholder_id = mapping.eol_token_id, mapping.image_token_id
        codebook = model.config.vq_config.codebook_size
        missing = [c for c in range(codebook) if c not in mapping.img2bpe]
        if missing:
            raise ConfigError(f"the vocabulary has no visual token for {len(missing)} of the {codebook} VQ codes")
        # code -> text-vocabulary id; the visual-token rows of the head, in code order
        self.register_buffer("visual_ids", torch.tensor([mapping.img2bpe[c] for c in range(codebook)]), persistent=False)
        self.image_size = image_size
        self.grid = image_size // DOWNSAMPLE
        self.num_image_tokens = self.grid * self.grid
        # everything reading never writes: visual tokens and the image frame's special tokens
        frame = [tok.convert_tokens_to_ids(t) for t in (tok.boi_token, tok.eoi_token, tok.image_wrapper_token, tok.eof_token)]
        self._suppressed = sorted({*self.visual_ids.tolist(), self.eol_id, self.placeholder_id, *frame})
        if path is not None:
            load_saved_lora(self, folder)

    # ---- sharding (FSDP2, Lightning's ModelParallelStrategy) ----------------------------------------
    def unsharded_modules(self) -> list[torch.nn.Module]:
        """The frozen VQ tokenizer."""
        return [self.model.model.vqmodel]

    def sharding_units(self) -> list[torch.nn.Module]:
        """Every decoder layer; the frozen VQ-VAE is never a unit."""
        return list(self.model.model.text_model.layers)

    def checkpointing_units(self) -> list[torch.nn.Module]:
        """The decoder layers."""
        return list(self.model.model.text_model.layers)

    def lora_targets(self) -> str:
        """The language model's attention projections (the VQ-VAE's attention has q/k/v_proj too)."""
        return r"model\.text_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"

    def generation_modules(self) -> list[torch.nn.Module]:
        """None: Emu3 draws and reads through the same embeddings, decoder and head (even the
        visual-token rows of the head enter every text log-prob's normalisation)."""
        raise ConfigError(
            "Emu3Adapter has no generation-only modules: Emu3 draws and reads images through the same "
            "embeddings, decoder layers and LM head; train it with LoRA or in full instead"
        )

    def train(self, mode: bool = True) -> "Emu3Adapter":
        super().train(mode)
        self.model.model.vqmodel.eval()  # frozen tokenizer: always in eval mode
        return self

    def save_pretrained(self, folder: str | Path, gathered: tuple[dict | None, bool] | None = None) -> Path:
        """Weights (safetensors), config, tokenizer and processor: a folder that
        Emu3ForConditionalGeneration / Emu3Processor.from_pretrained and Emu3Adapter(path=...) load.
        The config is saved with attention dropout 0 (what dualfw trains with)."""
        folder = Path(folder)
        # under FSDP2 every rank calls this
        state_dict, writes = gathered if gathered is not None else self._gathered_state_dict()
        if not writes:
            return folder
        self.model.save_pretrained(folder, state_dict=state_dict)
        self.processor.save_pretrained(folder)
        return folder

    # ---- prompts and image sequences ------------------------------------------------------------
    def generation_ids(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each generation prompt: BOS, the prompt (+ suffix), the image header
        ("<|image start|>h*w<|image token|>"), as Emu3Processor writes them for image generation."""
        texts = [p + self.prompt_suffix for p in prompts]
        enc = self.processor(text=texts, return_for_image_generation=True, image_area=self.image_size**2)
        return [list(ids) for ids in enc["input_ids"]]

    def negative_ids(self) -> list[int]:
        """Token ids of CFG's unconditional input: the negative prompt with the image header."""
        enc = self.processor(text=[self.negative_prompt], return_for_image_generation=True, image_area=self.image_size**2)
        return list(enc["input_ids"][0])

    def generation_inputs(self, prompts: list[str]) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Left-padded ids and attention mask of the generation prompts."""
        return self._left_pad(self.generation_ids(prompts))

    def _left_pad(self, rows: list[list[int]]) -> tuple[torch.LongTensor, torch.LongTensor]:
        longest = max(len(r) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, longest - len(r) :] = torch.tensor(r)
            mask[i, longest - len(r) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def image_sequence(self, tokens: torch.LongTensor) -> torch.LongTensor:
        """Codes (n, h * w) -> the text-vocabulary ids Emu3 reads and writes, (n, h * (w + 1)):
        each row of visual tokens closed by an end-of-line token."""
        rows = self.visual_ids[tokens.to(self.visual_ids.device)].view(-1, self.grid, self.grid)
        eol = rows.new_full((rows.shape[0], self.grid, 1), self.eol_id)
        return torch.cat([rows, eol], dim=-1).flatten(1)

    def library_generate(self, prompts: list[str], k: int, sampling: ImageSampling = ImageSampling()) -> torch.LongTensor:
        """transformers' `generate` with Emu3's recipe at the same settings: visual tokens only, an
        end-of-line token closing each row (`prefix_allowed_tokens_fn`), CFG against the negative
        prompt expanded to every row."""
        from transformers import GenerationConfig

        greedy = sampling.temperature == 0
        rows = [p for p in prompts for _ in range(k)] if greedy else prompts
        ids, mask = self.generation_inputs(rows)
        wrapper = self.processor.tokenizer.convert_tokens_to_ids(self.processor.tokenizer.image_wrapper_token)
        width, visual = self.grid, self.visual_ids.tolist()

        def allowed(batch_id, input_ids):
            offset = input_ids.shape[0] - torch.nonzero(input_ids == wrapper)[0, 0]
            return [self.eol_id] if offset % (width + 1) == 0 else visual

        negative = {}
        if sampling.guidance_scale != 1:
            neg = torch.tensor([self.negative_ids()] * len(rows) * (1 if greedy else k), device=self.device)
            negative = dict(negative_prompt_ids=neg, negative_prompt_attention_mask=torch.ones_like(neg))
        options = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=sampling.temperature,
                                                            top_k=sampling.top_k, top_p=sampling.top_p, num_return_sequences=k)
        config = GenerationConfig(max_new_tokens=self.grid * (width + 1), guidance_scale=sampling.guidance_scale,
                                  pad_token_id=self.pad_id, eos_token_id=self.eos_id, bos_token_id=self.bos_id, **options)
        out = self.model.generate(input_ids=ids, attention_mask=mask, prefix_allowed_tokens_fn=allowed,
                                  generation_config=config, **negative)
        image = out[:, ids.shape[1]:].view(-1, self.grid, width + 1)[:, :, :width].reshape(len(prompts) * k, -1)
        code_of = torch.full((int(self.visual_ids.max()) + 1,), -1, dtype=torch.long, device=image.device)
        code_of[self.visual_ids] = torch.arange(len(self.visual_ids), device=image.device)
        return code_of[image].view(len(prompts), k, -1)

    def _image_placeholder_text(self) -> str:
        """The understanding prompt's image block, with one placeholder per image-sequence token."""
        side = self.grid * self.processor.downsample_ratio
        return self.processor.replace_image_token({"image_sizes": [[side, side]]}, 0)

    def understanding_prefix_ids(self, instruction: str, image: bool = True) -> list[int]:
        """Token ids of the user turn holding the image block (image-sequence tokens as placeholders,
        unless `image` is False) and `instruction`, up to "ASSISTANT:"."""
        messages = [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]}] if self.system_prompt else []
        content = [{"type": "image"}] if image else []
        messages.append({"role": "user", "content": content + [{"type": "text", "text": instruction}]})
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        tok = self.processor.tokenizer
        if image:
            text = text.replace(tok.image_token, self._image_placeholder_text(), 1)
        return [self.bos_id] + tok(text, add_special_tokens=False).input_ids

    def _understanding_ids(self, instruction: str, tokens: torch.LongTensor | None, rows: int) -> torch.LongTensor:
        """(rows, P) ids of the understanding prompt holding each image's own tokens."""
        prefix = torch.tensor(self.understanding_prefix_ids(instruction, image=tokens is not None), device=self.device)
        ids = prefix[None].repeat(rows, 1)
        if tokens is not None:
            ids[:, prefix == self.placeholder_id] = self.image_sequence(tokens.to(self.device))
        return ids

    # ---- generation direction --------------------------------------------------------------------
    def sample_images(
        self,
        prompts: list[str],
        k: int,
        sampling: ImageSampling = ImageSampling(),
        seed: int | None = None,
        progress: bool = False,
    ) -> torch.LongTensor:
        sharded = self._gather_root()
        # no_grad rather than inference_mode under FSDP: its buffers must stay writable (see Janus)
        with torch.no_grad() if sharded or self._fsdp1_wrapped else torch.inference_mode():
            tokens = self._sample_tokens(prompts, k, sampling, seed, progress)
        return tokens.clone()

    def _sample_tokens(
        self, prompts: list[str], k: int, sampling: ImageSampling, seed: int | None, progress: bool
    ) -> torch.LongTensor:
        from transformers import Cache, DynamicCache

        lm = self.model.model.text_model
        n_prompts, n_tokens, width = len(prompts), self.num_image_tokens, self.grid
        rows = n_prompts * k
        cfg = sampling.guidance_scale != 1.0
        ids, mask = self.generation_inputs(prompts)

        def prefill(ids, mask, repeat):
            """Run a prefix once per row; its cache and last hidden state repeated `repeat` times."""
            cache = DynamicCache(config=self.model.config.text_config)
            out = lm(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), cache=cache, use_cache=True)
            return out.last_hidden_state[:, -1], cache, repeat

        parts = [prefill(ids, mask, k)]
        masks = [mask.repeat_interleave(k, 0)]
        if cfg:  # one negative prompt for all rows, as transformers' CFG takes it (positions from 0)
            neg = torch.tensor([self.negative_ids()], device=ids.device)
            parts.append(prefill(neg, torch.ones_like(neg), rows))
            masks.append(torch.ones_like(neg).repeat(rows, 1))
        prefix = max(m.shape[1] for m in masks)
        fed_total = n_tokens + self.grid - 2  # codes and end-of-line tokens fed back (not the last code)
        length = prefix + fed_total
        # one cache for all rows (conditional rows, then unconditional rows), prefixes left-aligned to
        # `prefix` with zero keys/values that the attention bias masks out
        layers = []
        for i in range(len(parts[0][1].layers)):
            keys = [_left_pad_states(p[1].layers[i].keys, prefix).repeat_interleave(p[2], 0) for p in parts]
            values = [_left_pad_states(p[1].layers[i].values, prefix).repeat_interleave(p[2], 0) for p in parts]
            layers.append(SlotLayer(torch.cat(keys), torch.cat(values), 1, length))
        cache = Cache(layers=layers)
        hidden = torch.cat([p[0].repeat_interleave(p[2], 0) for p in parts])
        del parts
        full_mask = torch.cat([F.pad(m, (prefix - m.shape[1], 0)) for m in masks])
        bias = torch.full((hidden.shape[0], 1, 1, length), float("-inf"), dtype=hidden.dtype, device=ids.device)
        bias[:, 0, 0, :prefix].masked_fill_(full_mask.bool(), 0.0)
        # each row's positions continue from its own prefix (transformers: from the attention mask)
        start = full_mask.sum(-1, keepdim=True)
        positions = start + torch.arange(fed_total, device=ids.device)[None]
        cos, sin = lm.rotary_emb(hidden, position_ids=positions)
        head = self.model.lm_head.weight[self.visual_ids]  # the visual-token rows of the head

        sample = token_sampler(sampling, seed, ids.device)
        tokens = torch.empty(rows, n_tokens, dtype=torch.long, device=ids.device)
        fed = 0

        def feed(step_ids):
            nonlocal hidden, fed
            bias[..., prefix + fed] = 0.0
            embeds = lm.embed_tokens(step_ids[:, None])
            hidden = decode_step(lm, embeds, bias[..., : prefix + fed + 1], positions[:, fed : fed + 1],
                                  (cos[:, fed : fed + 1], sin[:, fed : fed + 1]), cache)[:, -1]
            fed += 1

        for i in tqdm(range(n_tokens), desc=f"sampling {n_prompts}x{k} images", leave=False, disable=not progress, delay=2.0):
            logps = F.linear(hidden, head).float().log_softmax(-1)
            if cfg:  # transformers' rule for Emu3: uncond + s * (cond - uncond) on log-softmaxes
                cond, uncond = logps.chunk(2)
                logps = uncond + sampling.guidance_scale * (cond - uncond)
            tokens[:, i] = code = sample(logps)
            if i == n_tokens - 1:
                break
            step = self.visual_ids[code]
            feed(step.repeat(2) if cfg else step)
            if (i + 1) % width == 0:  # a row is complete: its end-of-line token
                feed(torch.full_like(step, self.eol_id).repeat(2 if cfg else 1))
        return tokens.view(n_prompts, k, n_tokens)

    def image_logprobs(
        self, prompts: list[str], tokens: torch.LongTensor, guidance_scale: float = 1.0,
        drop_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-code log-probs over the visual tokens (what the sampler draws from): the head's
        visual-token rows only, never a full-vocabulary softmax per image token."""
        self._gather_root()
        rows = self.generation_ids(prompts)
        negative = self.negative_ids()
        if drop_prompt is not None:
            rows = [negative if drop else r for r, drop in zip(rows, drop_prompt.tolist())]
        cfg = guidance_scale != 1.0
        if cfg:
            rows = rows + [negative] * len(prompts)
        ids, mask = self._left_pad(rows)
        sequence = self.image_sequence(tokens.to(self.device))
        fed = sequence[:, :-2]  # the last code and the closing end-of-line token are never fed back
        if cfg:
            fed = fed.repeat(2, 1)
        ids = torch.cat([ids, fed], dim=1)
        mask = torch.cat([mask, torch.ones_like(fed)], dim=1)
        # use_cache=False: a cache would be filled again when a checkpointed layer recomputes in backward
        hidden = self.model.model.text_model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False).last_hidden_state
        # position P - 1 + j predicts sequence[j]; keep those that predict a visual token
        predictors = hidden[:, -(sequence.shape[1] - 1) :]
        is_code = (torch.arange(sequence.shape[1] - 1, device=ids.device) + 1) % (self.grid + 1) != 0
        logps = F.linear(predictors[:, is_code], self.model.lm_head.weight[self.visual_ids]).float().log_softmax(-1)
        if cfg:
            cond, uncond = logps.chunk(2)
            logps = (uncond + guidance_scale * (cond - uncond)).log_softmax(-1)
        return logps.gather(-1, tokens.to(self.device)[..., None]).squeeze(-1)

    # ---- pixels <-> tokens ---------------------------------------------------------------------------
    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        ip = self.processor.image_processor
        mean = torch.tensor(ip.image_mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(ip.image_std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    @torch.no_grad()
    def decode_images(self, tokens: torch.LongTensor) -> torch.Tensor:
        vq = self.model.model.vqmodel
        pixels = vq.decode(tokens.to(self.device).view(-1, self.grid, self.grid)).float()
        ip = self.processor.image_processor  # the processor's normalisation, undone
        mean = torch.tensor(ip.image_mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(ip.image_std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels * std + mean).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.LongTensor:
        pixels = self._normalise(resize(pixels.to(self.device).float(), self.image_size))
        vq = self.model.model.vqmodel
        sizes = torch.tensor([[self.image_size, self.image_size]] * pixels.shape[0])
        out = vq.encode(pixels.to(vq.dtype), sizes, return_dict=True)
        return torch.stack(out.image_tokens).view(pixels.shape[0], -1)

    # ---- understanding direction -----------------------------------------------------------------
    def _image_tokens(self, images: Images | torch.Tensor | None) -> torch.LongTensor | None:
        """The codes Emu3 reads: an image's own tokens when it has them, else its pixels encoded."""
        images = Images.of(images)
        if images is None:
            return None
        return images.tokens if images.tokens is not None else self.encode_images(images.pixels)

    def text_logprobs(
        self, images: Images | torch.Tensor | None, texts: list[str], instruction: str, eos: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Emu3 reads the image's own tokens (sampled images are scored as drawn, never decoded)."""
        tokens = self._image_tokens(images)
        tok = self.processor.tokenizer
        answers = [tok(" " + t.strip(), add_special_tokens=False).input_ids if t.strip() else [] for t in texts]
        if eos:
            answers = [a + [self.eos_id] for a in answers]
        if any(len(a) == 0 for a in answers):
            raise ValueError("cannot score an empty text")
        prefix = self._understanding_ids(instruction, tokens, len(texts))
        n_prefix, longest = prefix.shape[1], max(len(a) for a in answers)
        answer_ids = torch.full((len(texts), longest), self.pad_id, dtype=torch.long)
        answer_mask = torch.zeros(len(texts), longest, dtype=torch.bool)
        for i, a in enumerate(answers):  # right padding: every answer starts at n_prefix
            answer_ids[i, : len(a)] = torch.tensor(a)
            answer_mask[i, : len(a)] = True
        answer_ids, answer_mask = answer_ids.to(self.device), answer_mask.to(self.device)
        ids = torch.cat([prefix, answer_ids], dim=1)
        attn = torch.cat([torch.ones_like(prefix), answer_mask.long()], dim=1)
        self._gather_root()
        hidden = self.model.model.text_model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        logits = self.model.lm_head(hidden[:, n_prefix - 1 : n_prefix - 1 + longest]).float()
        logps = logits.log_softmax(-1).gather(-1, answer_ids[..., None]).squeeze(-1)
        return logps * answer_mask, answer_mask

    @torch.no_grad()
    def sample_texts(
        self,
        pixels: torch.Tensor,
        k: int,
        instruction: str,
        sampling: TextSampling = TextSampling(),
        seed: int | None = None,
    ) -> list[list[str]]:
        """K descriptions per image through transformers' text generate, the image read as its
        tokens, visual and image-frame tokens suppressed. Temperature 0 is greedy (K equal answers)."""
        from transformers import GenerationConfig

        n = pixels.shape[0]
        greedy = sampling.temperature == 0
        rows = 1 if greedy else k
        ids = self._understanding_ids(instruction, self._image_tokens(pixels), n).repeat_interleave(rows, 0)
        if greedy:
            options = dict(do_sample=False)
        else:
            options = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            self._gather_root()
            config = GenerationConfig(
                max_length=ids.shape[1] + sampling.max_new_tokens,
                eos_token_id=self.eos_id, pad_token_id=self.pad_id, bos_token_id=self.bos_id,
                suppress_tokens=self._suppressed, **options,
            )
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                synced_gpus=self._is_sharded and torch.distributed.get_world_size() > 1,
            )
        texts = [t.strip() for t in self.processor.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)]
        return [texts[i * rows : (i + 1) * rows] * (k if greedy else 1) for i in range(n)]


def _positions(mask: torch.LongTensor) -> torch.LongTensor:
    """Position ids counted from the attention mask (transformers' generate): 0 at each row's first
    real token, pads 0 (they are masked)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _left_pad_states(states: torch.Tensor, length: int) -> torch.Tensor:
    """Keys or values (rows, heads, t, d) left-padded with zeros to `length` positions."""
    return F.pad(states, (0, 0, length - states.shape[2], 0))
