"""A tiny, self-consistent Janus that runs both directions offline.

Used as the default model before any checkpoint exists, in tests and in benchmarks. Everything is
built locally: the transformers JanusForConditionalGeneration from a config, and a byte-level BPE
tokenizer trained in milliseconds with the `tokenizers` library. `save_tiny_janus` writes a folder
that `JanusAdapter(path=...)` (and plain transformers) load with `local_files_only=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# The same conversation format as the Janus-Pro checkpoints: "<|User|>: ...\n\n<|Assistant|>: ...<eos>",
# an image as "<image_placeholder>\n{question}". Written for the message layout transformers uses
# (content = list of {"type": "image"} / {"type": "text", "text": ...}).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}<|User|>: {% elif message['role'] == 'assistant' -%}<|Assistant|>: "
    "{%- else -%}{{ message['role'] | capitalize }}: {% endif -%}"
    "{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' -%}<image_placeholder>{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{%- else -%}{{ content['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if message['role'] == 'user' -%}{{ '\\n\\n' }}{%- else -%}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|Assistant|>:{%- endif -%}"
)

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<begin_of_image>", "<end_of_image>", "<image_placeholder>"]

# Words the tokenizer is trained on: the Shapes world, GenEval's vocabulary and the chat format.
_CORPUS = """
a an the photo of one two three four five and or left right above below on in is there image
red orange yellow green blue purple pink brown black white grey gray circle square triangle
circles squares triangles object objects shape shapes color colors small large big scene
describe this image describe the image what do you see yes no not User Assistant
Answer: Yes No Is there a photo of an object: at the top bottom middle center on the
bench sports ball clock fire hydrant teddy bear dog wine glass apple person cat car
"""


@dataclass
class TinyJanusSpec:
    """Sizes of a tiny Janus. Defaults: 0.9 M parameters, 32 px images, 8x8 = 64 image tokens.

    hidden_size is shared by the language model, the vision aligner and the generation aligner
    (a Janus constraint); image_size // patch_size must equal the VQ latent side.
    """

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    image_size: int = 32
    patch_size: int = 4
    codebook_size: int = 64
    vq_channel_multiplier: tuple[int, ...] = (1, 1, 2)
    vision_hidden_size: int = 32
    vision_num_layers: int = 1
    vision_num_heads: int = 2
    vocab_size: int = 512
    vq_embed_dim: int = 8
    vq_num_res_blocks: int = 1
    init_std: float = 0.2
    seed: int = 0
    #: rows of the language model's text embedding and head; None: the tokenizer's size. Larger
    #: (e.g. Janus-Pro's 102400) gives a model of a real checkpoint's shape; the tokenizer uses the first rows
    text_vocab_size: int | None = None


def build_tokenizer(vocab_size: int = 512):
    """Byte-level BPE with Janus' special tokens, a BOS post-processor and the Janus chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={
            "image_token": "<image_placeholder>",
            "boi_token": "<begin_of_image>",
            "eoi_token": "<end_of_image>",
        },
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_janus(spec: TinyJanusSpec | None = None):
    """Return (model, processor): a randomly initialised Janus (seeded) and its offline processor."""
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusImageProcessor,
        JanusProcessor,
        JanusVisionConfig,
        JanusVQVAEConfig,
        LlamaConfig,
    )

    spec = spec or TinyJanusSpec()
    tokenizer = build_tokenizer(spec.vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    patches = spec.image_size // spec.patch_size
    h = spec.hidden_size
    text_config = LlamaConfig(
        vocab_size=max(spec.text_vocab_size or 0, len(tokenizer)),
        hidden_size=h,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=4096,
        initializer_range=spec.init_std,
        bos_token_id=ids["<bos>"],
        pad_token_id=ids["<pad>"],
        eos_token_id=ids["<eos>"],
    )
    vision_config = JanusVisionConfig(
        hidden_size=spec.vision_hidden_size,
        num_hidden_layers=spec.vision_num_layers,
        num_attention_heads=spec.vision_num_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        mlp_ratio=2,
        projection_dim=h,
        num_image_tokens=patches**2,
    )
    vq_config = JanusVQVAEConfig(
        embed_dim=spec.vq_embed_dim,
        num_embeddings=spec.codebook_size,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=list(spec.vq_channel_multiplier),
        num_res_blocks=spec.vq_num_res_blocks,
        projection_dim=h,
        image_token_embed_dim=h,
    )
    config = JanusConfig(
        text_config=text_config,
        vision_config=vision_config,
        vq_config=vq_config,
        image_token_id=ids["<image_placeholder>"],
        initializer_range=spec.init_std,
    )
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = JanusForConditionalGeneration(config).eval()
    gc = model.generation_config
    gc.bos_token_id, gc.pad_token_id, gc.eos_token_id = ids["<bos>"], ids["<pad>"], ids["<eos>"]
    gc.guidance_scale = 5.0
    gc.generation_kwargs = {"boi_token_id": ids["<begin_of_image>"]}
    image_processor = JanusImageProcessor(
        size={"height": spec.image_size, "width": spec.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        min_size=4,
    )
    processor = JanusProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        num_image_tokens=patches**2,
    )
    return model, processor


def save_tiny_janus(folder: str | Path, spec: TinyJanusSpec | None = None) -> Path:
    """Build a tiny Janus and save model (safetensors), config, tokenizer and processor to `folder`."""
    folder = Path(folder)
    model, processor = build_tiny_janus(spec)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
