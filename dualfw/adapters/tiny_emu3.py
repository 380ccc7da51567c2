"""A tiny, self-consistent Emu3 that runs both directions offline.

For tests and laptops, like the tiny Janus: transformers' Emu3ForConditionalGeneration built from a
config with random (seeded) weights, a byte-level BPE tokenizer trained offline whose vocabulary
also holds Emu3's special tokens and one "<|visual token NNNNNN|>" per VQ code, and an Emu3Processor.
`save_tiny_emu3` writes a folder that `Emu3Adapter(path=..., image_size=...)` and plain transformers
load with `local_files_only=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dualfw.adapters.tiny import _CORPUS

# Emu3-Chat's conversation format: "[system ]USER: <image>question ASSISTANT: answer".
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Emu3's special tokens (its tokenizer's names): pad, BOS, EOS, the image frame and placeholders,
# end-of-frame and end-of-line (which closes every row of visual tokens).
PAD, BOS, EOS = "<|endoftext|>", "<|extra_203|>", "<|extra_204|>"
BOI, EOI, IMAGE, WRAPPER = "<|image start|>", "<|image end|>", "<image>", "<|image token|>"
EOF, EOL = "<|extra_201|>", "<|extra_200|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, BOI, EOI, IMAGE, WRAPPER, EOF, EOL]


def visual_token(code: int) -> str:
    """The text-vocabulary name of VQ code `code` (Emu3's convention)."""
    return f"<|visual token {code:06d}|>"


@dataclass
class TinyEmu3Spec:
    """Sizes of a tiny Emu3. Defaults: 64 px images, 8x8 = 64 image codes (72 tokens with the
    end-of-line tokens). The VQ must downsample 8x (Emu3Processor assumes it): four levels."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    image_size: int = 64
    codebook_size: int = 64
    vq_base_channels: int = 32
    vq_channel_multiplier: tuple[int, ...] = (1, 1, 1, 1)
    vq_embed_dim: int = 4
    vq_temporal_downsample: int = 1  # frames per image in the VQ (the published one: 4, for video)
    vq_num_res_blocks: int = 1
    vocab_size: int = 512
    init_std: float = 0.2
    seed: int = 0


def build_tokenizer(codebook_size: int = 64, vocab_size: int = 512):
    """Byte-level BPE with Emu3's special tokens, one token per VQ code and Emu3-Chat's template.
    The visual tokens follow the special tokens, so code c is id `first visual id + c`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + [visual_token(c) for c in range(codebook_size)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=PAD,
        padding_side="left",
        extra_special_tokens={
            "image_token": IMAGE,
            "boi_token": BOI,
            "eoi_token": EOI,
            "image_wrapper_token": WRAPPER,
            "eof_token": EOF,
        },
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_emu3(spec: TinyEmu3Spec | None = None):
    """Return (model, processor): a randomly initialised Emu3 (seeded, eval mode, attention dropout
    off) and its offline processor."""
    from transformers import (
        Emu3Config,
        Emu3ForConditionalGeneration,
        Emu3ImageProcessor,
        Emu3Processor,
        Emu3TextConfig,
        Emu3VQVAEConfig,
    )

    spec = spec or TinyEmu3Spec()
    if len(spec.vq_channel_multiplier) != 4:
        raise ValueError("Emu3Processor assumes 8x downsampling: the VQ needs four levels")
    tokenizer = build_tokenizer(spec.codebook_size, spec.vocab_size)
    vocab = tokenizer.get_vocab()
    ids = {t: vocab[t] for t in SPECIAL_TOKENS}
    vocabulary_map = {t: vocab[t] for t in SPECIAL_TOKENS}
    vocabulary_map.update({visual_token(c): vocab[visual_token(c)] for c in range(spec.codebook_size)})
    text_config = Emu3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=4096,
        initializer_range=spec.init_std,
        attention_dropout=0.0,
        bos_token_id=ids[BOS],
        pad_token_id=ids[PAD],
        eos_token_id=ids[EOS],
    )
    vq_config = Emu3VQVAEConfig(
        codebook_size=spec.codebook_size,
        embed_dim=spec.vq_embed_dim,
        latent_channels=spec.vq_embed_dim,
        base_channels=spec.vq_base_channels,
        channel_multiplier=list(spec.vq_channel_multiplier),
        num_res_blocks=spec.vq_num_res_blocks,
        temporal_downsample_factor=spec.vq_temporal_downsample,
        attn_resolutions=[3],
        hidden_size=spec.vq_base_channels * spec.vq_channel_multiplier[-1],  # the attention block's width
        num_attention_heads=1,
    )
    config = Emu3Config(text_config=text_config, vq_config=vq_config, vocabulary_map=vocabulary_map)
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = Emu3ForConditionalGeneration(config).eval()
    gc = model.generation_config
    gc.bos_token_id, gc.pad_token_id, gc.eos_token_id = ids[BOS], ids[PAD], ids[EOS]
    area = spec.image_size**2
    image_processor = Emu3ImageProcessor(
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], min_pixels=area, max_pixels=area, spatial_factor=8
    )
    processor = Emu3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    return model, processor


def save_tiny_emu3(folder: str | Path, spec: TinyEmu3Spec | None = None) -> Path:
    """Build a tiny Emu3 and save model (safetensors), config, tokenizer and processor to `folder`."""
    folder = Path(folder)
    model, processor = build_tiny_emu3(spec)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
