"""One config dataclass per tower, filled from a checkpoint's config.json.

Only the fields a released checkpoint needs. Defaults are those of the matching transformers config
classes, because transformers writes config.json as a diff against them: a field left out means its
default there (tests/test_config.py checks each against transformers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError


def _from_dict(cls, data: dict[str, Any] | None, **renames: str):
    """Build dataclass `cls` from `data`, ignoring unknown keys; `renames` maps field -> json key."""
    data = dict(data or {})
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = renames.get(f.name, f.name)
        if key in data and data[key] is not None:
            kwargs[f.name] = data[key]
    return cls(**kwargs)


@dataclass
class VisionConfig:
    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    hidden_act: str = "gelu"

    @classmethod
    def from_dict(cls, data: dict | None) -> VisionConfig:
        return _from_dict(cls, data)


@dataclass
class QFormerConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    use_qformer_text_input: bool = False
    hidden_act: str = "gelu"

    @classmethod
    def from_dict(cls, data: dict | None) -> QFormerConfig:
        return _from_dict(cls, data)


@dataclass
class OPTConfig:
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int | None = None
    activation_function: str = "relu"
    layer_norm_elementwise_affine: bool = True
    enable_bias: bool = True
    remove_final_layer_norm: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size

    @classmethod
    def from_dict(cls, data: dict | None) -> OPTConfig:
        return _from_dict(cls, data, remove_final_layer_norm="_remove_final_layer_norm")


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    # Original T5 scales the decoder output by d_model**-0.5 before the head; T5 v1.1 / Flan-T5 do not.
    # Old configs said so through tie_word_embeddings=False; transformers 5 writes scale_decoder_outputs.
    scale_decoder_outputs: bool | None = None

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def act(self) -> str:
        """The activation's name: 'gated-gelu' means the tanh approximation (HF's gelu_new)."""
        name = self.feed_forward_proj.split("-")[-1]
        return "gelu_new" if name == "gelu" and self.is_gated else name

    @classmethod
    def from_dict(cls, data: dict | None) -> T5Config:
        return _from_dict(cls, data)


@dataclass
class LlamaConfig:
    """LLaMA / Vicuna v1.1 (InstructBLIP-Vicuna)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: one key/value head per query head (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    # instructblip-vicuna's text_config is said to keep the ids of the LLaMA conversion it came from (bos 0,
    # eos 1, pad -1), which are not its tokenizer's (<s> 1, </s> 2, [PAD] 32000); they are in its config.json.
    pad_token_id: int | None = None
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict | None) -> LlamaConfig:
        data = dict(data or {})
        # transformers 5 writes {"rope_theta": ..., "rope_type": "default"} as rope_parameters; older
        # configs have a top-level rope_theta (or none: 10000) and rope_scaling, null for LLaMA-1.
        rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise CheckpointError(f"rope type {rope_type!r} is not supported (supported: 'default')")
        if rope.get("rope_theta") is not None:
            data["rope_theta"] = rope["rope_theta"]
        return _from_dict(cls, data)


@dataclass
class Blip2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    text: OPTConfig | T5Config | LlamaConfig | None = field(default_factory=OPTConfig)
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    image_token_index: int | None = None
    model_type: str = "blip-2"

    @property
    def text_model_type(self) -> str | None:
        """'opt', 't5' or 'llama'; None for retrieval checkpoints."""
        return None if self.text is None else TEXT_MODEL_TYPES[type(self.text)]

    @property
    def is_encoder_decoder(self) -> bool:
        return isinstance(self.text, T5Config)

    @classmethod
    def from_dict(cls, data: dict) -> Blip2Config:
        model_type = data.get("model_type", "blip-2")
        if model_type not in ("blip-2", "instructblip"):
            raise CheckpointError(
                f"config.json has model_type {model_type!r}; blip2 loads 'blip-2' checkpoints"
            )
        vision = VisionConfig.from_dict(data.get("vision_config"))
        qformer = QFormerConfig.from_dict(data.get("qformer_config"))
        qformer.encoder_hidden_size = vision.hidden_size  # as the reference: always the vision width
        text_data = data.get("text_config")
        text: OPTConfig | T5Config | LlamaConfig | None
        if text_data is None:
            text = None  # retrieval checkpoints have no language model
        else:
            text_type = text_data.get("model_type", "opt")
            parsers = {name: cls for cls, name in TEXT_MODEL_TYPES.items()}
            if text_type not in parsers:
                raise CheckpointError(
                    f"text_config.model_type {text_type!r} is not supported (supported: {', '.join(parsers)})"
                )
            text = parsers[text_type].from_dict(text_data)
        return cls(
            vision=vision,
            qformer=qformer,
            text=text,
            num_query_tokens=data.get("num_query_tokens", 32),
            image_text_hidden_size=data.get("image_text_hidden_size", 256),
            image_token_index=data.get("image_token_index", data.get("image_token_id")),
            model_type=model_type,
        )


TEXT_MODEL_TYPES = {OPTConfig: "opt", T5Config: "t5", LlamaConfig: "llama"}
