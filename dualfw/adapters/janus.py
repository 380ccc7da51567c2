"""Janus / Janus-Pro through transformers' JanusForConditionalGeneration.

Generation uses our own KV-cache loop instead of `generate(generation_mode="image")`: the prompt
prefix is run once per prompt and its cache shared by the K samples, guidance scale 1 means no
CFG (transformers crashes on it), and the row layout (all conditional rows, then all
unconditional rows, each prompt's K samples together) and CFG rule are the same as transformers',
so greedy decoding gives the same tokens (tests/test_janus_parity.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from dualfw.core.errors import ConfigError
from dualfw.core.files import check_model_weights, read_model_config
from dualfw.core.lora import load_saved_lora
from dualfw.core.interface import Images, ImageSampling, LMMAdapter, TextSampling
from dualfw.adapters.decoding import DTYPES, SlotLayer, decode_step, resize, token_sampler
from dualfw.adapters.tiny import TinyJanusSpec, build_tiny_janus



def repeated_rows(tokens: torch.LongTensor) -> tuple[torch.LongTensor, torch.LongTensor] | None:
    """(a row index of each distinct row, each row's distinct-row number) of image tokens (n, N),
    or None when every row is distinct."""
    unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)
    if len(unique) == len(tokens):
        return None
    rows = torch.arange(len(tokens), device=tokens.device)
    first = torch.full((len(unique),), len(tokens), device=tokens.device).scatter_reduce(0, inverse, rows, "amin")
    return first, inverse


def check_janus_folder(path: str | Path) -> Path:
    """Fail early, naming the folder, when it does not hold a transformers Janus checkpoint."""
    folder, config = read_model_config(path)
    config_file = folder / "config.json"
    model_type = config.get("model_type")
    if model_type == "multi_modality":
        raise ConfigError(
            f"'{config_file}' is DeepSeek's original Janus format (model_type 'multi_modality'); use the "
            "transformers conversion (e.g. deepseek-community/Janus-Pro-7B) or convert_janus_weights_to_hf.py"
        )
    if model_type != "janus":
        raise ConfigError(
            f"'{config_file}' has model_type {model_type!r}, not a unified LMM: JanusAdapter needs model_type 'janus'"
        )
    check_model_weights(folder)
    return folder


class JanusAdapter(LMMAdapter):
    """Janus-Pro (or any transformers `JanusForConditionalGeneration`) as a dualfw model.

    Args:
        path: local folder with a transformers Janus checkpoint (config.json, safetensors weights,
            tokenizer and processor files). None builds a random tiny Janus from `tiny`.
        tiny: sizes of the tiny Janus built when `path` is None.
        dtype: weight dtype: float32, bfloat16 or float16. Log-probs are always float32.
    """

    def __init__(
        self,
        path: str | None = None,
        tiny: TinyJanusSpec | None = None,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if path is None:
            model, processor = build_tiny_janus(tiny)
            model = model.to(DTYPES[dtype])
        else:
            from transformers import JanusForConditionalGeneration, JanusProcessor

            folder = check_janus_folder(path)
            model = JanusForConditionalGeneration.from_pretrained(
                folder, dtype=DTYPES[dtype], local_files_only=True
            )
            processor = JanusProcessor.from_pretrained(folder, local_files_only=True)
        model.model.vqmodel.requires_grad_(False)  # Janus' VQ tokenizer is frozen; only the SFT stage trains it
        self.model = model
        self.processor = processor
        tok = processor.tokenizer
        self.bos_id, self.pad_id, self.eos_id = tok.bos_token_id, tok.pad_token_id, tok.eos_token_id
        self.boi_id = tok.convert_tokens_to_ids(tok.boi_token)
        cfg = model.config
        self.num_image_tokens = cfg.vision_config.num_image_tokens
        self.image_size = cfg.vq_config.num_patches * 2 ** (len(cfg.vq_config.channel_multiplier) - 1)
        if processor.num_image_tokens != self.num_image_tokens:
            # JanusProcessor defaults to 576 placeholders; a mismatch breaks every understanding prompt.
            processor.num_image_tokens = self.num_image_tokens
        if path is not None:
            load_saved_lora(self, folder)

    # ---- sharding (FSDP2, Lightning's ModelParallelStrategy) ----------------------------------------
    def unsharded_modules(self) -> list[torch.nn.Module]:
        """The frozen VQ tokenizer."""
        return [self.model.model.vqmodel]

    def sharding_units(self) -> list[torch.nn.Module]:
        """Every decoder layer (the sampler runs them one by one), the vision tower, and the
        generation embeddings, aligner and head; the frozen VQ tokenizer is never a unit."""
        janus = self.model.model
        return [*janus.language_model.layers, janus.vision_model, janus.generation_embeddings,
                janus.generation_aligner, janus.generation_head]

    def checkpointing_units(self) -> list[torch.nn.Module]:
        """The decoder layers."""
        return list(self.model.model.language_model.layers)

    def lora_targets(self) -> str:
        """The language model's attention projections (the vision tower and the VQ tokenizer have
        layers of the same names)."""
        return r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"

    def generation_modules(self) -> list[torch.nn.Module]:
        """Janus draws through its own image-token embeddings, aligner and head; reading goes
        through the vision tower, its aligner and the text head instead."""
        janus = self.model.model
        return [janus.generation_embeddings, janus.generation_aligner, janus.generation_head]

    def train(self, mode: bool = True) -> "JanusAdapter":
        super().train(mode)
        self.model.model.vqmodel.eval()  # frozen tokenizer: always in eval mode
        return self

    def save_pretrained(self, folder: str | Path, gathered: tuple[dict | None, bool] | None = None) -> Path:
        """Weights (safetensors), config, tokenizer and processor: a folder that
        JanusForConditionalGeneration / JanusProcessor.from_pretrained and JanusAdapter(path=...) load."""
        folder = Path(folder)
        # under FSDP2 every rank calls this
        state_dict, writes = gathered if gathered is not None else self._gathered_state_dict()
        if not writes:
            return folder
        self.model.save_pretrained(folder, state_dict=state_dict)
        self.processor.save_pretrained(folder)
        return folder

    def library_generate(self, prompts: list[str], k: int, sampling: ImageSampling = ImageSampling()) -> torch.LongTensor:
        """transformers' `generate(generation_mode="image")` at the same settings (it needs CFG)."""
        from transformers import GenerationConfig

        if sampling.guidance_scale == 1:
            raise ConfigError("transformers' Janus image generate fails without CFG: use guidance_scale > 1")
        ids, mask = self.generation_inputs(prompts)
        greedy = sampling.temperature == 0
        options = {} if greedy else dict(do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k,
                                         top_p=sampling.top_p, num_return_sequences=k)
        config = GenerationConfig(bos_token_id=self.bos_id, pad_token_id=self.pad_id, guidance_scale=sampling.guidance_scale,
                                  generation_kwargs={"boi_token_id": self.boi_id}, **options)
        if greedy:  # greedy generate refuses num_return_sequences > 1: repeat the inputs instead
            ids, mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
        out = self.model.generate(input_ids=ids, attention_mask=mask, generation_mode="image", generation_config=config)
        return out.view(len(prompts), k, -1)

    # ---- prompts -------------------------------------------------------------------------------
    def generation_inputs(self, prompts: list[str]) -> tuple[torch.LongTensor, torch.LongTensor]:
        """Left-padded ids and attention mask of the generation prompts (chat template + <begin_of_image>)."""
        texts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "text", "text": p}]}], add_generation_prompt=True
            )
            for p in prompts
        ]
        enc = self.processor(text=texts, generation_mode="image", padding=True, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def understanding_prefix_ids(self, instruction: str, image: bool = True) -> list[int]:
        """Token ids of the user turn holding the image (unless `image` is False) and `instruction`,
        up to "<|Assistant|>:"."""
        from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

        content = [{"type": "image"}] if image else []
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": content + [{"type": "text", "text": instruction}]}],
            add_generation_prompt=True,
        )
        if self.processor.use_default_system_prompt:
            text = DEFAULT_SYSTEM_PROMPT + text
        tok = self.processor.tokenizer
        text = text.replace(tok.image_token, self.processor.replace_image_token({}, 0))
        return tok(text).input_ids

    # ---- generation direction --------------------------------------------------------------------
    def _embed_image_tokens(self, tokens: torch.LongTensor) -> torch.Tensor:
        return self.model.prepare_embeddings_for_image_generation(tokens)

    def sample_images(
        self,
        prompts: list[str],
        k: int,
        sampling: ImageSampling = ImageSampling(),
        seed: int | None = None,
        progress: bool = False,
    ) -> torch.LongTensor:
        sharded = self._gather_root()
        # inference_mode is cheaper per op than no_grad (no version counters or view tracking), but
        # FSDP's buffers (FSDP2's all-gathered weights, FSDP1's low-precision shards) made here would
        # become inference tensors that training can no longer write into ("Inplace update to
        # inference tensor outside InferenceMode"; FSDP1 + bf16-mixed hits it)
        with torch.no_grad() if sharded or self._fsdp1_wrapped else torch.inference_mode():
            tokens = self._sample_tokens(prompts, k, sampling, seed, progress)
        return tokens.clone()  # a normal tensor: inference tensors cannot enter autograd later

    def _sample_tokens(
        self, prompts: list[str], k: int, sampling: ImageSampling, seed: int | None, progress: bool
    ) -> torch.LongTensor:
        from transformers import Cache, DynamicCache

        ids, mask = self.generation_inputs(prompts)
        n_prompts, n_tokens = len(prompts), self.num_image_tokens
        cfg = sampling.guidance_scale != 1.0
        if cfg:
            ids, mask = self._with_unconditional(ids, mask)
        lm, head = self.model.model.language_model, self.model.model.generation_head
        prefix, length = ids.shape[1], ids.shape[1] + n_tokens - 1  # the last image token is never fed back

        # The prefix runs once per row (2B rows with CFG); its keys and values are then repeated k
        # times, prompt-major, into buffers preallocated for the whole generation (SlotLayer).
        prefill = DynamicCache(config=self.model.config.text_config)
        out = lm(inputs_embeds=self.model.get_input_embeddings()(ids), attention_mask=mask, cache=prefill, use_cache=True)
        hidden = out.last_hidden_state[:, -1].repeat_interleave(k, 0)
        cache = Cache(layers=[SlotLayer(layer.keys, layer.values, k, length) for layer in prefill.layers])
        del prefill
        # Built once instead of at every step: the additive attention mask (0 where a row may look:
        # its non-pad prompt tokens, then one more slot opened per step; -inf elsewhere: what
        # attention turns a boolean mask into), and rotary cos/sin for every decoding position
        # (as in transformers, positions count the left padding).
        bias = torch.full((hidden.shape[0], 1, 1, length), float("-inf"), dtype=hidden.dtype, device=ids.device)
        bias[:, 0, 0, :prefix].masked_fill_(mask.bool().repeat_interleave(k, 0), 0.0)
        positions = torch.arange(prefix, length, device=ids.device)[None]
        cos, sin = lm.rotary_emb(hidden, position_ids=positions)

        sample = token_sampler(sampling, seed, ids.device)
        tokens = torch.empty(n_prompts * k, n_tokens, dtype=torch.long, device=ids.device)
        for i in tqdm(range(n_tokens), desc=f"sampling {n_prompts}x{k} images", leave=False, disable=not progress, delay=2.0):
            logits = head(hidden).float()
            if cfg:  # rows [all conditional; all unconditional], transformers' CFG rule
                cond, uncond = logits.chunk(2)
                logits = uncond + sampling.guidance_scale * (cond - uncond)
            tokens[:, i] = next_token = sample(logits)
            if i == n_tokens - 1:
                break  # transformers runs the model once more here, for nothing
            bias[..., prefix + i] = 0.0
            embeds = self._embed_image_tokens(next_token[:, None])
            hidden = decode_step(
                lm,
                embeds.repeat(2, 1, 1) if cfg else embeds,  # both CFG rows feed the same token: embedded once
                bias[..., : prefix + i + 1],
                positions[:, i : i + 1],
                (cos[:, i : i + 1], sin[:, i : i + 1]),
                cache,
            )[:, -1]
        return tokens.view(n_prompts, k, n_tokens)

    def _with_unconditional(self, ids: torch.LongTensor, mask: torch.LongTensor):
        """Rows [conditional; unconditional] for CFG: the unconditional rows keep BOS and
        <begin_of_image>, the prompt in between becomes pad (Janus' convention)."""
        uncond = ids.masked_fill((ids != self.bos_id) & (ids != self.boi_id), self.pad_id)
        return torch.cat([ids, uncond]), torch.cat([mask, mask])

    def image_logprobs(
        self, prompts: list[str], tokens: torch.LongTensor, guidance_scale: float = 1.0,
        drop_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._gather_root()
        ids, mask = self.generation_inputs(prompts)
        if drop_prompt is not None:  # those rows as CFG's unconditional input
            ids = torch.where(drop_prompt.to(ids.device)[:, None], self._with_unconditional(ids, mask)[0][len(ids) :], ids)
        tokens = tokens.to(ids.device)
        n_tokens = tokens.shape[1]
        cfg = guidance_scale != 1.0
        if cfg:
            ids, mask = self._with_unconditional(ids, mask)
        fed = tokens[:, :-1].repeat(2, 1) if cfg else tokens[:, :-1]
        embeds = torch.cat([self.model.get_input_embeddings()(ids), self._embed_image_tokens(fed)], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], n_tokens - 1)], dim=1)
        # use_cache=False in every scoring forward: a cache made here would be filled again when an
        # activation-checkpointed layer recomputes in backward (keys twice as long under FSDP1)
        hidden = self.model.model.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        logits = self.model.model.generation_head(hidden[:, -n_tokens:]).float()
        if cfg:  # the sampler's rule
            cond, uncond = logits.chunk(2)
            logits = uncond + guidance_scale * (cond - uncond)
        return logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)

    # ---- pixels <-> tokens ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode_images(self, tokens: torch.LongTensor) -> torch.Tensor:
        pixels = self.model.decode_image_tokens(tokens.to(self.device)).permute(0, 3, 1, 2)
        return ((pixels.float() + 1) / 2).clamp(0, 1)  # Janus' VQ works in [-1, 1]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.LongTensor:
        pixels = resize(pixels.to(self.device), self.image_size)
        vq = self.model.model.vqmodel
        out = vq.encode((pixels * 2 - 1).to(vq.dtype), return_dict=True)
        return out.image_tokens.view(pixels.shape[0], -1)

    def understanding_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the vision encoder's input: 8-bit levels (as a saved image would be),
        the processor's size and normalisation."""
        ip = self.processor.image_processor
        side = self.model.config.vision_config.image_size
        pixels = (resize(pixels.to(self.device).float(), side) * 255).round() / 255
        mean = torch.tensor(ip.image_mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(ip.image_std, device=pixels.device).view(1, 3, 1, 1)
        return ((pixels - mean) / std).to(self.model.dtype)

    # ---- understanding direction -----------------------------------------------------------------
    def text_logprobs(
        self, images: Images | torch.Tensor | None, texts: list[str], instruction: str, eos: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Janus reads pixels through its vision encoder: sampled tokens are decoded first."""
        images = Images.of(images)
        tok = self.processor.tokenizer
        prefix = self.understanding_prefix_ids(instruction, image=images is not None)
        answers = [tok(" " + t.strip(), add_special_tokens=False).input_ids if t.strip() else [] for t in texts]
        if eos:
            answers = [a + [self.eos_id] for a in answers]
        if any(len(a) == 0 for a in answers):
            raise ValueError("cannot score an empty text")
        longest = max(len(a) for a in answers)
        ids = torch.full((len(texts), len(prefix) + longest), self.pad_id, dtype=torch.long)
        answer_mask = torch.zeros(len(texts), longest, dtype=torch.bool)
        for i, a in enumerate(answers):  # right padding: every answer starts at len(prefix)
            ids[i, : len(prefix) + len(a)] = torch.tensor(prefix + a)
            answer_mask[i, : len(a)] = True
        ids, answer_mask = ids.to(self.device), answer_mask.to(self.device)
        self._gather_root()
        shared = None
        if images is not None and images.tokens is not None and not torch.is_grad_enabled():
            shared = repeated_rows(images.tokens)
        if shared is not None:
            hidden = self._read_each_image_once(ids, len(prefix), images, *shared)
        else:
            pixel_values = None if images is None else self.understanding_pixels(images.pixels)
            # no attention mask: the padding is on the right, where causal attention never looks
            # from a scored token (and without a mask SDPA runs its causal kernel)
            hidden = self.model.model(input_ids=ids, pixel_values=pixel_values, use_cache=False).last_hidden_state
            # position t predicts token t + 1: the answer is predicted from len(prefix) - 1 on
            hidden = hidden[:, len(prefix) - 1 : len(prefix) - 1 + longest]
        logits = self.model.lm_head(hidden).float()
        logps = logits.log_softmax(-1).gather(-1, ids[:, len(prefix) :, None]).squeeze(-1)
        return logps * answer_mask, answer_mask

    def _read_each_image_once(
        self, ids: torch.LongTensor, n_prefix: int, images: Images, first: torch.LongTensor, inverse: torch.LongTensor
    ) -> torch.Tensor:
        """Hidden states predicting the answers `ids[:, n_prefix:]` when several rows read the same
        image (`first`: a row of each distinct image, `inverse`: each row's image): the prefix
        (instruction and image) runs once per image and its cache serves that image's answers, as
        batch-contrasted R_G reads each image with every prompt of the batch. No grad (scoring)."""
        from transformers import DynamicCache

        janus = self.model.model
        cache = DynamicCache(config=self.model.config.text_config)
        read = janus(
            input_ids=ids[:1, :n_prefix].expand(len(first), -1),  # every row's prefix is the same
            pixel_values=self.understanding_pixels(images[first].pixels), cache=cache, use_cache=True,
        ).last_hidden_state[:, -1:]
        inverse = inverse.to(ids.device)
        hidden = [read[inverse]]  # the prefix's last position predicts every answer's first token
        if ids.shape[1] - n_prefix > 1:
            cache.batch_select_indices(inverse)
            answers = janus.language_model(
                inputs_embeds=self.model.get_input_embeddings()(ids[:, n_prefix:-1]), cache=cache, use_cache=True
            )
            hidden.append(answers.last_hidden_state)
        return torch.cat(hidden, 1)

    @torch.no_grad()
    def sample_texts(
        self,
        pixels: torch.Tensor,
        k: int,
        instruction: str,
        sampling: TextSampling = TextSampling(),
        seed: int | None = None,
    ) -> list[list[str]]:
        """K descriptions per image through transformers' text generate (KV cache, batched,
        stops at end-of-sequence). Temperature 0 is greedy (the K answers are then equal)."""
        from transformers import GenerationConfig

        prefix = self.understanding_prefix_ids(instruction)
        n = pixels.shape[0]
        greedy = sampling.temperature == 0
        rows = 1 if greedy else k
        ids = torch.tensor([prefix], device=self.device).repeat(n * rows, 1)
        pixel_values = self.understanding_pixels(pixels).repeat_interleave(rows, 0)
        if greedy:
            options = dict(do_sample=False)
        else:
            options = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            # a fresh config: the checkpoint's carries image-generation settings (guidance_scale)
            self._gather_root()  # Janus' generate reaches the root unit's weights before its first forward
            config = GenerationConfig(
                max_length=len(prefix) + sampling.max_new_tokens,  # max_new_tokens too would warn at every call
                eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                bos_token_id=self.bos_id, **options,
            )
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                generation_config=config, generation_mode="text",
                # sharded: every forward is a collective, so ranks keep stepping until all are done
                synced_gpus=self._is_sharded and torch.distributed.get_world_size() > 1,
            )
        texts = self.processor.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        return [texts[i * rows : (i + 1) * rows] * (k if greedy else 1) for i in range(n)]
