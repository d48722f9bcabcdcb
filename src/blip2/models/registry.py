"""The language-model families BLIP-2 checkpoints use: one entry each, holding everything that differs.

Adding a family means a config dataclass in config.py (with its `model_type`, listed in `TEXT_CONFIGS`), a
model file here, and one `LanguageModelFamily` in `FAMILIES`; the loader, the engine and the prompt layout
read what they need from the entry instead of asking which family they hold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from ..config import LlamaConfig, OPTConfig, T5Config, TextConfig
from .llama import LlamaForCausalLM
from .opt import POSITION_OFFSET, OPTForCausalLM
from .t5 import T5ForConditionalGeneration

# A language model of any family (one per entry of FAMILIES below): each has `embed(ids)`, which the engine
# calls; the decoding steppers call the rest.
LanguageModel = OPTForCausalLM | T5ForConditionalGeneration | LlamaForCausalLM


class DecoderOnlyConfig(Protocol):
    """What the prompt budget reads from a decoder-only family's config."""

    max_position_embeddings: int


class EncoderDecoderConfig(Protocol):
    """What decoding reads from an encoder-decoder family's config."""

    decoder_start_token_id: int


class Anchor(NamedTuple):
    """A config field that a tensor's shape states: `shape[axis] == value + offset` for the first of `keys`
    (names of one tensor, aliases included) that the checkpoint holds."""

    field: str
    keys: tuple[str, ...]
    axis: int
    offset: int = 0


@dataclass(frozen=True)
class LanguageModelFamily:
    """What differs between the language models a BLIP-2 checkpoint may carry; see FAMILIES."""

    label: str  # as messages name it
    # its text_config dataclass, read when text_config.model_type is config_class.model_type
    config_class: type[TextConfig]
    model_class: Callable[[Any], LanguageModel]  # built from that config
    # Encoder-decoder (T5): the prompt is encoded once, right-padded, and decoding starts from the decoder
    # start token. Decoder-only (OPT, LLaMA): the prompt is left-padded and decoding continues it.
    is_encoder_decoder: bool
    width_field: str  # the config field that is the width of its input embeddings
    decoder_layers_field: str  # the config field that counts its decoder's layers (one KV cache entry each)
    # The prompt `ask` wraps a question in for BLIP-2 checkpoints (InstructBLIP takes the question as is);
    # None: the question alone.
    ask_template: str | None = None
    # The dtype its weights are kept in when float16 is asked for (Flan-T5 overflows in float16); None: float16.
    float16_substitute: torch.dtype | None = None
    # The input length it was trained on, which bounds the prompt apart from the new tokens (encoder-decoder);
    # None: the prompt and the new tokens share max_position_embeddings.
    trained_input_length: int | None = None
    # The checkpoint's layers, per config field: (field of Blip2Config, pattern whose distinct indices count them).
    layer_keys: tuple[tuple[str, str], ...] = ()
    # Config fields that tensor shapes state (checked before anything is built).
    anchors: tuple[Anchor, ...] = ()

    @property
    def name(self) -> str:
        """text_config.model_type: 'opt', 't5' or 'llama'."""
        return self.config_class.model_type

    @property
    def padding_side(self) -> str:
        return "right" if self.is_encoder_decoder else "left"

    def width(self, config: Any) -> int:
        """The width of the language model's input embeddings: what the Q-Former output is projected to."""
        return getattr(config, self.width_field)

    def decoder_layers(self, config: Any) -> int:
        """Layers of the decoder: one KV cache entry each."""
        return getattr(config, self.decoder_layers_field)

    def weights_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype its weights are loaded in when `dtype` is asked for."""
        if dtype == torch.float16 and self.float16_substitute is not None:
            return self.float16_substitute
        return dtype


PROJECTION = ("language_projection.weight",)  # (D, 768)
OPT_EMBED = ("language_model.model.decoder.embed_tokens.weight", "language_model.lm_head.weight")
LLAMA_EMBED = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
T5_EMBED = (
    "language_model.shared.weight",
    "language_model.encoder.embed_tokens.weight",
    "language_model.decoder.embed_tokens.weight",
)
# Flan-T5 was trained on inputs of 512 tokens; its relative positions do not stop a longer one, but its
# attention memory grows with the square of the input length.
T5_TRAINED_LENGTH = 512

OPT = LanguageModelFamily(
    label="OPT",
    config_class=OPTConfig,
    model_class=OPTForCausalLM,
    is_encoder_decoder=False,
    width_field="hidden_size",
    decoder_layers_field="num_hidden_layers",
    ask_template="Question: {} Answer:",
    layer_keys=(("text.num_hidden_layers", r"^language_model\.model\.decoder\.layers\.(\d+)\."),),
    anchors=(
        Anchor("text.vocab_size", OPT_EMBED, 0),
        Anchor("text.word_embed_proj_dim", OPT_EMBED, 1),
        Anchor("text.hidden_size", PROJECTION, 0),
        Anchor(
            "text.max_position_embeddings",
            ("language_model.model.decoder.embed_positions.weight",),
            0,
            POSITION_OFFSET,
        ),
    ),
)
T5 = LanguageModelFamily(
    label="Flan-T5",
    config_class=T5Config,
    model_class=T5ForConditionalGeneration,
    is_encoder_decoder=True,
    width_field="d_model",
    decoder_layers_field="num_decoder_layers",
    ask_template="Question: {} Short answer:",
    float16_substitute=torch.bfloat16,
    trained_input_length=T5_TRAINED_LENGTH,
    layer_keys=(
        ("text.num_layers", r"^language_model\.encoder\.block\.(\d+)\."),
        ("text.num_decoder_layers", r"^language_model\.decoder\.block\.(\d+)\."),
    ),
    anchors=(
        Anchor("text.vocab_size", T5_EMBED, 0),
        Anchor("text.d_model", T5_EMBED, 1),
        Anchor("text.d_model", PROJECTION, 0),
    ),
)
LLAMA = LanguageModelFamily(
    label="LLaMA",
    config_class=LlamaConfig,
    model_class=LlamaForCausalLM,
    is_encoder_decoder=False,
    width_field="hidden_size",
    decoder_layers_field="num_hidden_layers",
    layer_keys=(("text.num_hidden_layers", r"^language_model\.model\.layers\.(\d+)\."),),
    anchors=(
        Anchor("text.vocab_size", LLAMA_EMBED, 0),
        Anchor("text.hidden_size", LLAMA_EMBED, 1),
        Anchor("text.hidden_size", PROJECTION, 0),
    ),
)
FAMILIES = (OPT, T5, LLAMA)
_BY_CONFIG = {f.config_class: f for f in FAMILIES}


def family(text_config: Any) -> LanguageModelFamily:
    """The family of a language-model config (a `Blip2Config.text`)."""
    return _BY_CONFIG[type(text_config)]
