"""One config dataclass per tower, filled from a checkpoint's config.json, bounds-checked.

Only the fields a released checkpoint needs. Defaults are those of the matching transformers config
classes, because transformers writes config.json as a diff against them: a field left out means its
default there (tests/test_config.py checks each against transformers).

config.json is untrusted: every value read is checked against `FIELD_RULES` (and the relations between
fields a tower needs) before anything is built from it, so that a crafted file fails with a CheckpointError
naming the field, instead of building a million layers or dividing by zero.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

from .errors import CheckpointError
from .files import read_json

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# The activations the towers implement (blip2.models.layers.ACTIVATIONS; a test keeps the two in step).
ACTIVATION_NAMES = frozenset({"gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu"})


# -- what a value may be ----------------------------------------------------------------------------------------
class Rule(Protocol):
    def problem(self, value: Any) -> str | None:
        """Why `value` cannot be this field's value; None when it can."""
        ...


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int

    def problem(self, value: Any) -> str | None:
        if type(value) is not int:  # JSON true, 2.0 and "2" are not layer counts
            return "is not an integer"
        if not self.low <= value <= self.high:
            return f"is outside [{self.low}, {self.high}]"
        return None


@dataclass(frozen=True)
class PositiveNumber:
    high: float

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "is not a number"
        if not (math.isfinite(value) and 0 < value <= self.high):
            return f"is not a finite number in (0, {self.high:g}]"
        return None


@dataclass(frozen=True)
class Flag:
    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else "is not true or false"


@dataclass(frozen=True)
class Activation:
    def problem(self, value: Any) -> str | None:
        if isinstance(value, str) and value in ACTIVATION_NAMES:
            return None
        return f"is not a supported activation ({', '.join(sorted(ACTIVATION_NAMES))})"


@dataclass(frozen=True)
class TokenIds:
    """An id or (eos) a list of ids; whether it is in the vocabulary is decided with the vocab size."""

    lists: bool = False

    def problem(self, value: Any) -> str | None:
        ids = value if self.lists and isinstance(value, list) else [value]
        if not ids or any(type(i) is not int for i in ids):
            return "is not a token id" + (" or a non-empty list of them" if self.lists else "")
        return None


SIZE = IntRange(1, 65536)
VOCAB = IntRange(1, 10**7)
LAYERS = IntRange(1, 1000)
HEADS = IntRange(1, 65536)
EPS = PositiveNumber(1.0)

# Conversion rules as data: every field of the tower dataclasses that config.json can set, by name.
FIELD_RULES: dict[str, Rule] = {
    **dict.fromkeys(
        ["hidden_size", "intermediate_size", "d_model", "d_kv", "d_ff", "ffn_dim", "word_embed_proj_dim"],
        SIZE,
    ),
    **dict.fromkeys(["head_dim", "encoder_hidden_size", "image_text_hidden_size", "patch_size"], SIZE),
    "image_size": IntRange(1, 4096),  # as the image processor's bound
    "max_position_embeddings": IntRange(1, 1 << 20),
    **dict.fromkeys(
        ["num_hidden_layers", "num_layers", "num_decoder_layers", "cross_attention_frequency"], LAYERS
    ),
    **dict.fromkeys(["num_attention_heads", "num_heads", "num_key_value_heads"], HEADS),
    "vocab_size": VOCAB,
    "num_query_tokens": IntRange(1, 1024),
    "relative_attention_num_buckets": IntRange(4, 65536),
    "relative_attention_max_distance": IntRange(1, 1 << 20),
    **dict.fromkeys(["layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps"], EPS),
    "rope_theta": PositiveNumber(1e12),
    **dict.fromkeys(
        [
            "qkv_bias",
            "use_qformer_text_input",
            "do_layer_norm_before",
            "layer_norm_elementwise_affine",
            "enable_bias",
            "_remove_final_layer_norm",  # OPT's name in config.json for remove_final_layer_norm
            "tie_word_embeddings",
            "scale_decoder_outputs",
            "is_gated_act",
        ],
        Flag(),
    ),
    **dict.fromkeys(["hidden_act", "activation_function", "dense_act_fn"], Activation()),
    **dict.fromkeys(
        ["pad_token_id", "bos_token_id", "decoder_start_token_id", "image_token_index", "image_token_id"],
        TokenIds(),
    ),
    "eos_token_id": TokenIds(lists=True),
}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(where: str, name: str, value: Any, problem: str) -> CheckpointError:
    """`where` is the file and the path so far, e.g. 'config.json: text_config.'."""
    return CheckpointError(f"{where}{name} = {_show(value)} {problem}")


def _checked(where: str, name: str, value: Any) -> Any:
    rule = FIELD_RULES.get(name)
    problem = rule.problem(value) if rule is not None else None
    if problem:
        raise _fail(where, name, value, problem)
    return value


def _require(ok: bool, where: str, name: str, value: Any, problem: str) -> None:
    if not ok:
        raise _fail(where, name, value, problem)


def _object(data: Any, where: str) -> dict[str, Any]:
    """`data` as a dict; a JSON list, string or number where an object belongs is a CheckpointError."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CheckpointError(f"{where.rstrip('.: ')} is not a JSON object (got {type(data).__name__})")
    return data


class _Tower(Protocol):
    """A tower config dataclass: its fields, and the check of the relations between them."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    def check(self, where: str) -> None: ...


TowerT = TypeVar("TowerT", bound=_Tower)


def _from_dict(cls: type[TowerT], data: Any, where: str, **renames: str) -> TowerT:
    """Build dataclass `cls` from `data`, ignoring unknown keys; `renames` maps field -> json key.

    Each value is checked against FIELD_RULES before the dataclass exists (its __post_init__ divides by
    some of them), then the relations between fields with the instance's `check`."""
    data = _object(data, where)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = renames.get(f.name, f.name)
        if data.get(key) is not None:
            kwargs[f.name] = _checked(where, key, data[key])
    config = cls(**kwargs)
    config.check(where)
    return config


def _divides(where: str, heads_name: str, heads: int, size_name: str, size: int) -> None:
    _require(size % heads == 0, where, heads_name, heads, f"does not divide {size_name} ({size})")


# -- token ids ----------------------------------------------------------------------------------------------------
# pad and bos ids outside the vocabulary mean none: instructblip-vicuna's text_config says pad -1 (from an early
# LLaMA conversion), and a finished row filled with -1 would index the embedding out of range. Without a pad id
# finished rows get EOS, as the reference does. eos and the decoder start must be real tokens.
OPTIONAL_IDS = ("pad_token_id", "bos_token_id")
REQUIRED_IDS = ("eos_token_id", "decoder_start_token_id")


def _settle_token_ids(config: TextConfig, where: str) -> None:
    """Drop `config`'s out-of-vocabulary pad/bos ids; raise on an eos/decoder-start id outside it."""
    vocab = config.vocab_size
    for name in OPTIONAL_IDS:
        value = getattr(config, name, None)
        if value is not None and not 0 <= value < vocab:
            setattr(config, name, None)
    for name in REQUIRED_IDS:
        value = getattr(config, name, None)
        if value is None:
            continue
        ids = value if isinstance(value, list) else [value]
        if not all(0 <= i < vocab for i in ids):
            raise _fail(where, name, value, f"is not a token of the vocabulary (vocab_size {vocab})")


# -- towers -------------------------------------------------------------------------------------------------------
# Derived fields: a few fields default to None, meaning "derived from the others" as in transformers, and
# __post_init__ replaces that None, so a config built by from_dict (which checks its inputs) always holds a value
# there. They are annotated with the type they hold (int, str, bool), the None default carrying
# `type: ignore[assignment]`, so that the models read them without a None check.
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
    def from_dict(cls, data: dict | None, where: str = "config.json: vision_config.") -> VisionConfig:
        return _from_dict(cls, data, where)

    def check(self, where: str) -> None:
        _divides(where, "num_attention_heads", self.num_attention_heads, "hidden_size", self.hidden_size)
        # the patch grid covers the image exactly (224 / 14, 364 / 14), one position embedding per patch
        _require(
            self.image_size % self.patch_size == 0,
            where,
            "patch_size",
            self.patch_size,
            f"does not divide image_size ({self.image_size})",
        )


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
    def from_dict(cls, data: dict | None, where: str = "config.json: qformer_config.") -> QFormerConfig:
        return _from_dict(cls, data, where)

    def check(self, where: str) -> None:
        _divides(where, "num_attention_heads", self.num_attention_heads, "hidden_size", self.hidden_size)
        # the padding row of the word embeddings
        _require(
            0 <= self.pad_token_id < self.vocab_size,
            where,
            "pad_token_id",
            self.pad_token_id,
            f"is not a token of the vocabulary (vocab_size {self.vocab_size})",
        )


@dataclass
class OPTConfig:
    model_type: ClassVar[str] = "opt"  # text_config.model_type
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    ffn_dim: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    do_layer_norm_before: bool = True
    word_embed_proj_dim: int = None  # type: ignore[assignment]  # None: hidden_size (see "Derived fields")
    activation_function: str = "relu"
    layer_norm_elementwise_affine: bool = True
    enable_bias: bool = True
    remove_final_layer_norm: bool = False
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 1
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] = 2

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size

    @classmethod
    def from_dict(cls, data: dict | None, where: str = "config.json: text_config.") -> OPTConfig:
        return _from_dict(cls, data, where, remove_final_layer_norm="_remove_final_layer_norm")

    def check(self, where: str) -> None:
        _divides(where, "num_attention_heads", self.num_attention_heads, "hidden_size", self.hidden_size)
        _settle_token_ids(self, where)


@dataclass
class T5Config:
    model_type: ClassVar[str] = "t5"
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int = None  # type: ignore[assignment]  # None: num_layers (see "Derived fields")
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    # The feed-forward activation and gating. Derived from feed_forward_proj when config.json leaves them out
    # ("gated-gelu" meaning the tanh approximation, gelu_new), but a written value wins, as in transformers:
    # every released Flan-T5 BLIP-2 config says dense_act_fn "gelu" (exact) with feed_forward_proj "gated-gelu".
    dense_act_fn: str = None  # type: ignore[assignment]
    is_gated_act: bool = None  # type: ignore[assignment]
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] = 1
    decoder_start_token_id: int = 0
    # Original T5 scales the decoder output by d_model**-0.5 before the head; T5 v1.1 / Flan-T5 do not.
    # Old configs said so through tie_word_embeddings=False; transformers 5 writes scale_decoder_outputs.
    scale_decoder_outputs: bool = None  # type: ignore[assignment]

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        if self.scale_decoder_outputs is None:
            self.scale_decoder_outputs = self.tie_word_embeddings
        gated, act = feed_forward_activation(self.feed_forward_proj)
        if self.dense_act_fn is None:
            self.dense_act_fn = act
        if self.is_gated_act is None:
            self.is_gated_act = gated

    @classmethod
    def from_dict(cls, data: dict | None, where: str = "config.json: text_config.") -> T5Config:
        data = _object(data, where)
        proj = data.get("feed_forward_proj")
        if proj is not None and feed_forward_activation(proj)[1] not in ACTIVATION_NAMES:
            raise _fail(where, "feed_forward_proj", proj, "is not 'gated-ACT' or 'ACT' with a supported ACT")
        return _from_dict(cls, data, where)

    def check(self, where: str) -> None:
        # relative_position_bucket divides by log(max_distance / max_exact), max_exact = num_buckets // 2
        _require(
            self.relative_attention_max_distance > self.relative_attention_num_buckets // 2,
            where,
            "relative_attention_max_distance",
            self.relative_attention_max_distance,
            f"is not above half of relative_attention_num_buckets ({self.relative_attention_num_buckets})",
        )
        _settle_token_ids(self, where)


def feed_forward_activation(feed_forward_proj: Any) -> tuple[bool, str | None]:
    """T5's feed_forward_proj -> (gated, activation): 'gated-gelu' is (True, 'gelu_new') for backward
    compatibility, as transformers resolves it; 'relu' is (False, 'relu'); anything else (False, None)."""
    if not isinstance(feed_forward_proj, str):
        return False, None
    parts = feed_forward_proj.split("-")
    if len(parts) > 2 or len(parts) == 2 and parts[0] != "gated":
        return False, None
    gated = len(parts) == 2
    return gated, "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]


@dataclass
class LlamaConfig:
    """LLaMA / Vicuna v1.1 (InstructBLIP-Vicuna)."""

    model_type: ClassVar[str] = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = None  # type: ignore[assignment]  # None: num_attention_heads (no GQA)
    head_dim: int = None  # type: ignore[assignment]  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    # instructblip-vicuna's text_config keeps the ids of the LLaMA conversion it came from (bos 0, eos 1,
    # pad -1), which are not its tokenizer's (<s> 1, </s> 2); its generation_config.json has the right ones
    # (see apply_generation_config). The pad -1 reads as no pad id (see _settle_token_ids).
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] = 2

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, data: dict | None, where: str = "config.json: text_config.") -> LlamaConfig:
        data = dict(_object(data, where))
        # transformers 5 writes {"rope_theta": ..., "rope_type": "default"} as rope_parameters; older
        # configs have a top-level rope_theta (or none: 10000) and rope_scaling, null for LLaMA-1.
        key = "rope_parameters" if data.get("rope_parameters") is not None else "rope_scaling"
        rope = _object(data.get(key), f"{where}{key}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise _fail(f"{where}{key}.", "rope_type", rope_type, "is not supported (supported: 'default')")
        if rope.get("rope_theta") is not None:
            data["rope_theta"] = rope["rope_theta"]
        if data.get("head_dim") is None:
            heads, hidden = data.get("num_attention_heads"), data.get("hidden_size")
            _checked(where, "num_attention_heads", heads if heads is not None else cls.num_attention_heads)
            _checked(where, "hidden_size", hidden if hidden is not None else cls.hidden_size)
        return _from_dict(cls, data, where)

    def check(self, where: str) -> None:
        _divides(
            where,
            "num_key_value_heads",
            self.num_key_value_heads,
            "num_attention_heads",
            self.num_attention_heads,
        )
        # rotary embeddings turn pairs of dimensions: (i, i + head_dim / 2)
        _require(
            self.head_dim >= 2 and self.head_dim % 2 == 0, where, "head_dim", self.head_dim, "is not even"
        )
        _settle_token_ids(self, where)


# A language model's config, of any family.
TextConfig = OPTConfig | T5Config | LlamaConfig

# The language-model configs by text_config.model_type; what else differs per family is in models/registry.py.
TEXT_CONFIGS = {cls.model_type: cls for cls in (OPTConfig, T5Config, LlamaConfig)}


@dataclass
class Blip2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    text: TextConfig | None = field(default_factory=OPTConfig)
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    image_token_index: int | None = None
    model_type: str = "blip-2"

    @property
    def text_model_type(self) -> str | None:
        """'opt', 't5' or 'llama'; None for retrieval checkpoints."""
        return None if self.text is None else self.text.model_type

    @classmethod
    def from_dict(cls, data: dict) -> Blip2Config:
        """The config of a checkpoint's config.json (already parsed); every value bounds-checked."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{CONFIG_FILE} is not a JSON object (got {type(data).__name__})")
        where = f"{CONFIG_FILE}: "
        model_type = data.get("model_type", "blip-2")
        if model_type not in ("blip-2", "instructblip"):
            raise CheckpointError(
                f"config.json has model_type {_show(model_type)}; blip2 loads 'blip-2' checkpoints"
            )
        vision = VisionConfig.from_dict(data.get("vision_config"), f"{where}vision_config.")
        qformer = QFormerConfig.from_dict(data.get("qformer_config"), f"{where}qformer_config.")
        qformer.encoder_hidden_size = vision.hidden_size  # as the reference: always the vision width
        text = _text_config(data.get("text_config"), f"{where}text_config.")
        top = {
            name: _checked(where, name, data[name])
            for name in ("num_query_tokens", "image_text_hidden_size")
            if data.get(name) is not None
        }
        image_token_key = "image_token_index" if "image_token_index" in data else "image_token_id"
        image_token_index = data.get(image_token_key)
        if image_token_index is not None:
            _checked(where, image_token_key, image_token_index)
            # the language model embeds the placeholders, and the logits processors index with them; a
            # retrieval checkpoint only drops them
            vocab = text.vocab_size if text is not None else VOCAB.high
            _require(
                0 <= image_token_index < vocab, where, image_token_key, image_token_index, "is out of vocab"
            )
        return cls(
            vision=vision,
            qformer=qformer,
            text=text,
            image_token_index=image_token_index,
            model_type=model_type,
            **top,
        )


def _text_config(data: Any, where: str) -> TextConfig | None:
    """The language model's config, by text_config.model_type; None when there is none (retrieval)."""
    if data is None:
        return None
    data = _object(data, where)
    text_type = data.get("model_type", "opt")
    if not isinstance(text_type, str) or text_type not in TEXT_CONFIGS:
        raise CheckpointError(
            f"{where}model_type {_show(text_type)} is not supported (supported: {', '.join(TEXT_CONFIGS)})"
        )
    return TEXT_CONFIGS[text_type].from_dict(data, where)


# -- files ---------------------------------------------------------------------------------------------------------
def read_config(directory: Path) -> tuple[Blip2Config, dict[str, Any]]:
    """A checkpoint directory's config: config.json, bounds-checked, with the token ids of its
    generation_config.json when there is one (as transformers' from_pretrained reads them). Also returns
    config.json as parsed, for what it says beyond the model (e.g. its `architectures`). Errors name the
    file with its directory."""
    directory = Path(directory)
    raw = read_json(directory / CONFIG_FILE)
    try:
        config = Blip2Config.from_dict(raw)
        generation_file = directory / GENERATION_CONFIG_FILE
        if generation_file.exists() or generation_file.is_symlink():
            config = apply_generation_config(config, read_json(generation_file))
    except CheckpointError as e:
        message = str(e)
        if not message.startswith(str(directory)):  # from_dict names the file alone
            message = f"{directory}{os.sep}{message}"
        raise CheckpointError(message) from None
    return config, raw


# The token ids transformers' GenerationConfig takes from generation_config.json; sampling and search settings
# there are not read: blip2's task defaults (beams, lengths) stay as documented.
GENERATION_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def apply_generation_config(config: Blip2Config, data: dict[str, Any]) -> Blip2Config:
    """`config` with the language model's token ids replaced by those generation_config.json (`data`) sets.

    instructblip-vicuna needs it: its text_config says eos 1 and pad -1, its generation_config.json says
    eos 2 (`</s>`, where LAVIS stops) and pad 0. A field the file leaves out keeps the config's value; one it
    sets to null means none (pad, bos). Ids are checked as config.json's are (pad/bos out of vocabulary mean none).
    """
    data = _object(data, GENERATION_CONFIG_FILE)
    if config.text is None:
        return config
    where = f"{GENERATION_CONFIG_FILE}: "
    names = {f.name for f in dataclasses.fields(config.text)}
    # null means none for pad and bos; eos and the decoder start cannot be none, so null keeps the config's
    ids = {
        name: data[name]
        for name in GENERATION_IDS
        if name in names and name in data and (data[name] is not None or name in OPTIONAL_IDS)
    }
    for name, value in ids.items():
        if value is not None:
            _checked(where, name, value)
    text = dataclasses.replace(config.text, **ids)
    _settle_token_ids(text, where)
    return dataclasses.replace(config, text=text)
