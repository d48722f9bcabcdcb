"""Tiny BLIP-2 checkpoints for tests and benchmarks, written by transformers' own `save_pretrained`.

Needs the `test` extra (transformers is our oracle, never a runtime dependency). The weights are random but
widened (transformers' default init gives near-uniform logits, where token choices are near-ties), the
tokenizer is a byte-level BPE (OPT) or a Unigram (T5) trained on a few sentences, and the processor files are
those a real checkpoint has: config.json, model.safetensors (or shards + index), tokenizer.json,
tokenizer_config.json, processor_config.json (transformers 5), generation_config.json.

The config values are the released ones where they matter (Flan-T5's exact GELU; with `vicuna_ids`,
instructblip-vicuna's token ids), and `era` rewrites the files as the 2023 and 2024 Salesforce uploads have them
(`restyle_as_release`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

CORPUS = [
    "a photo of a cat sitting on a red couch\n",
    "two dogs playing with a ball in the park\n",
    "Question: what is in the picture? Answer: a cat\n",
    "Question: how many dogs are there? Short answer: two\n",
    "a man riding a bike down the street next to a bus\n",
    "the kitchen has a white stove and a wooden table\n",
    "a plate of food with broccoli, rice and chicken\n",
    "an airplane flying over the city on a sunny day\n",
    "a group of people standing around a large clock tower\n",
    "Describe the image in detail. The image shows a beach with boats.\n",
]

TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
TINY_QFORMER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    cross_attention_frequency=2,
    max_position_embeddings=64,
    vocab_size=120,
)
TINY_OPT = dict(
    hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128
)
TINY_T5 = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    # as every released blip2-flan-t5 / instructblip-flan-t5 config: gated, but exact GELU (not gelu_new)
    feed_forward_proj="gated-gelu",
    dense_act_fn="gelu",
)
# instructblip-vicuna's text_config keeps the ids of an early LLaMA conversion; its generation_config.json
# has the tokenizer's (<s> 1, </s> 2), and a pad id of 0.
VICUNA_TEXT_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=-1)
VICUNA_GENERATION_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def opt_tokenizer(vocab_size: int = 300):
    """A byte-level BPE with OPT's special tokens (<s>=0, <pad>=1, </s>=2, <unk>=3), BOS '</s>' prepended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    return GPT2Tokenizer(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_prefix_space=False,
    )


def t5_tokenizer(vocab_size: int = 200):
    """A Unigram tokenizer with T5's special tokens (<pad>=0, </s>=1, <unk>=2) and '</s>' appended."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Replace("\n", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def widen_(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> None:
    """Re-draw every parameter so activations and logits are far from uniform (no near-ties)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(std * noise)


def build_checkpoint(
    path: str | Path,
    language_model: str = "opt",
    *,
    sharded: bool = False,
    num_query_tokens: int = 6,
    vision: dict[str, Any] | None = None,
    qformer: dict[str, Any] | None = None,
    text: dict[str, Any] | None = None,
    std: float = 0.3,
    seed: int = 0,
    era: str | None = None,
):
    """Write a random BLIP-2 checkpoint in the Hugging Face layout to `path` and return the path.

    Tests load the oracle from the same files (`transformers.Blip2ForConditionalGeneration.from_pretrained`).
    `era` "2023" or "2024" writes the files as the Salesforce releases of that time have them (see
    `restyle_as_release`); None, as transformers 5.24 writes them.
    """
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    path = Path(path)
    tokenizer = opt_tokenizer() if language_model == "opt" else t5_tokenizer()
    vision = {**TINY_VISION, **(vision or {})}
    image_processor = BlipImageProcessor(size={"height": vision["image_size"], "width": vision["image_size"]})
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    vocab = padded_vocab(len(tokenizer), era)
    if language_model == "opt":
        newline = tokenizer.convert_tokens_to_ids("Ċ")
        text_config = {
            "model_type": "opt",
            **TINY_OPT,
            "vocab_size": vocab,
            "eos_token_id": newline,
            "bos_token_id": 2,
            "pad_token_id": 1,
            **(text or {}),
        }
    else:
        text_config = {
            "model_type": "t5",
            **TINY_T5,
            "vocab_size": vocab,
            "tie_word_embeddings": False,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
            **(text or {}),
        }
    config = Blip2Config(
        vision_config=vision,
        qformer_config={**TINY_QFORMER, **(qformer or {})},
        text_config=text_config,
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_index,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    widen_(model, std=std, seed=seed)
    processor.save_pretrained(path)
    model.save_pretrained(path)
    if language_model == "t5":
        _untie_t5_head(path, std, seed)  # Flan-T5 has its own lm_head (transformers 5 ties it by default)
    if sharded:
        model = Blip2ForConditionalGeneration.from_pretrained(path)
        (path / "model.safetensors").unlink()
        model.save_pretrained(path, max_shard_size="20KB")
    if era is not None:
        restyle_as_release(path, era)
    return path


def _untie_t5_head(path: Path, std: float, seed: int) -> None:
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    state = load_file(file)
    shared = state["language_model.shared.weight"]
    gen = torch.Generator().manual_seed(seed + 1)
    state["language_model.lm_head.weight"] = std * torch.randn(shared.shape, generator=gen)
    save_file(state, file, metadata={"format": "pt"})


def _wordpiece_vocab(specials: list[str], vocab_size: int) -> dict[str, int]:
    """A WordPiece vocabulary of CORPUS, the same on every run (the WordPiece trainer breaks ties between
    merges in hash order, which changes from one process to the next): the specials, each character alone
    and as a continuation, then whole words, most frequent first."""
    import re
    from collections import Counter

    words = Counter(w for line in CORPUS for w in re.findall(r"\w+|[^\w\s]", line.lower()))
    chars = sorted({c for w in words for c in w})
    tokens = [*specials, *chars, *("##" + c for c in chars)]
    tokens += [w for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])) if w not in tokens]
    return {token: i for i, token in enumerate(tokens[:vocab_size])}


def bert_tokenizer(vocab_size: int = 150):
    """A lowercasing WordPiece tokenizer with BERT's special tokens ([PAD]=0, [UNK], [CLS], [SEP], [MASK]),
    '[CLS] text [SEP]', and the '[DEC]' BOS token the BLIP-2 retrieval checkpoints add (unused by ITC/ITM)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(_wordpiece_vocab(specials, vocab_size), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tokenizer = BertTokenizer(
        tokenizer_object=tok,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def build_retrieval_checkpoint(
    path: str | Path,
    *,
    image_token_index: bool = False,
    num_query_tokens: int = 6,
    vision: dict[str, Any] | None = None,
    qformer: dict[str, Any] | None = None,
    std: float = 0.3,
    seed: int = 0,
) -> Path:
    """Write a random `Blip2ForImageTextRetrieval` checkpoint (as Salesforce/blip2-itm-vit-g) to `path`.

    With `image_token_index`, the config names the '<image>' token and the processor puts `num_query_tokens`
    of them before the text when given images, as newer Hugging Face checkpoints do; the reference model then
    drops the first `num_query_tokens` ids. Without, neither. There is no language model.
    """
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor, BlipImageProcessor

    path = Path(path)
    tokenizer = bert_tokenizer()
    vision = {**TINY_VISION, **(vision or {})}
    image_processor = BlipImageProcessor(size={"height": vision["image_size"], "width": vision["image_size"]})
    processor = Blip2Processor(
        image_processor, tokenizer, num_query_tokens=num_query_tokens if image_token_index else None
    )
    qformer_config = {
        **TINY_QFORMER,
        "vocab_size": len(tokenizer) + 8,
        "use_qformer_text_input": True,
        **(qformer or {}),
    }
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer_config,
        num_query_tokens=num_query_tokens,
        image_text_hidden_size=16,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>") if image_token_index else None,
    )
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(config).eval()
    widen_(model, std=std, seed=seed)
    processor.save_pretrained(path)
    model.save_pretrained(path)
    return path


def llama_tokenizer(vocab_size: int = 300):
    """A byte-fallback-free BPE with LLaMA's special tokens (<unk>=0, <s>=1, </s>=2), '<s>' prepended, and the
    '<pad>' token Vicuna's InstructBLIP tokenizer adds at the end of the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def build_instructblip_checkpoint(
    path: str | Path,
    language_model: str = "opt",
    *,
    num_query_tokens: int = 6,
    std: float = 0.3,
    seed: int = 0,
    vicuna_ids: bool = False,
    era: str | None = None,
) -> Path:
    """Write a random InstructBLIP checkpoint (OPT, Flan-T5 or LLaMA/Vicuna language model) to `path`, with the
    Q-Former's own BERT tokenizer in `qformer_tokenizer/`, as the released ones have.

    `vicuna_ids` (LLaMA): the token ids of instructblip-vicuna, VICUNA_TEXT_IDS in config.json and
    VICUNA_GENERATION_IDS in generation_config.json. `era`: as in `build_checkpoint`."""
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
    )

    path = Path(path)
    tokenizer = {"opt": opt_tokenizer, "t5": t5_tokenizer, "llama": llama_tokenizer}[language_model]()
    qformer_tokenizer = bert_tokenizer()
    image_processor = BlipImageProcessor(
        size={"height": TINY_VISION["image_size"], "width": TINY_VISION["image_size"]}
    )
    processor = InstructBlipProcessor(
        image_processor, tokenizer, qformer_tokenizer, num_query_tokens=num_query_tokens
    )
    vocab = padded_vocab(len(tokenizer), era)
    if language_model == "opt":
        text = {
            "model_type": "opt",
            **TINY_OPT,
            "eos_token_id": tokenizer.convert_tokens_to_ids("Ċ"),
            "bos_token_id": 2,
            "pad_token_id": 1,
        }
    elif language_model == "t5":
        text = {
            "model_type": "t5",
            **TINY_T5,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
        }
    else:
        text = {
            "model_type": "llama",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": False,
            **(VICUNA_TEXT_IDS if vicuna_ids else {}),
        }
    config = InstructBlipConfig(
        vision_config=TINY_VISION,
        qformer_config={**TINY_QFORMER, "vocab_size": len(qformer_tokenizer) + 8},
        text_config={**text, "vocab_size": vocab},
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    widen_(model, std=std, seed=seed)
    if vicuna_ids:
        # Random weights rarely choose an end token: make <s> (1, text_config's eos) and </s> (2) likely, so
        # that rows end early and at different steps, where the two ids and the pad id matter.
        with torch.no_grad():
            model.language_model.lm_head.weight[[1, 2]] *= 2.0
    processor.save_pretrained(path)
    model.save_pretrained(path)
    if language_model == "t5":
        _untie_t5_head(path, std, seed)
    if vicuna_ids:
        _update_json(path / "generation_config.json", VICUNA_GENERATION_IDS)
    if era is not None:
        restyle_as_release(path, era)
    return path


# -- the files of the released checkpoints --------------------------------------------------------------------------
# The Salesforce repos were first uploaded in 2023 (transformers 4.27-4.31: complete configs, every field written;
# preprocessor_config.json; no image token) and rewritten in Nov 2024 by transformers 4.47 (configs as a diff
# against the class defaults; processor_config.json with num_query_tokens beside preprocessor_config.json; an
# <image> token after the tokenizer's vocabulary, the vocabulary padded to a multiple of 64: OPT's 50265 / 50304).
ERAS = ("2023", "2024")
ERA_VERSIONS = {"2023": "4.27.0.dev0", "2024": "4.47.0.dev0"}

# What every transformers 4.2x config wrote besides its own fields (PretrainedConfig's generation settings and
# bookkeeping), with the values the 2023 uploads have. blip2 must ignore them: the task defaults stay.
LEGACY_COMMON_FIELDS = {
    "_name_or_path": "",
    "add_cross_attention": False,
    "bad_words_ids": None,
    "begin_suppress_tokens": None,
    "chunk_size_feed_forward": 0,
    "cross_attention_hidden_size": None,
    "diversity_penalty": 0.0,
    "do_sample": False,
    "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0,
    "exponential_decay_length_penalty": None,
    "finetuning_task": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "length_penalty": 1.0,
    "max_length": 20,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "num_beam_groups": 1,
    "num_beams": 1,
    "num_return_sequences": 1,
    "output_scores": False,
    "prefix": None,
    "remove_invalid_values": False,
    "repetition_penalty": 1.0,
    "return_dict_in_generate": False,
    "sep_token_id": None,
    "suppress_tokens": None,
    "task_specific_params": None,
    "temperature": 1.0,
    "tf_legacy_loss": False,
    "tie_encoder_decoder": False,
    "tokenizer_class": None,
    "top_k": 50,
    "top_p": 1.0,
    "torch_dtype": None,
    "torchscript": False,
    "typical_p": 1.0,
    "use_bfloat16": False,
}
SUB_CONFIGS = ("vision_config", "qformer_config", "text_config")


def padded_vocab(tokenizer_size: int, era: str | None) -> int:
    """The language model's vocabulary: 2024 files pad it to a multiple of 64 past the <image> token (OPT:
    <image> 50265, vocab 50304); the others a few ids past the tokenizer, as the first uploads are (50272)."""
    if era == "2024":
        return -(-tokenizer_size // 64) * 64
    return tokenizer_size + 8


def _read_json(file: Path) -> dict:
    import json

    return json.loads(file.read_text())


def _write_json(file: Path, data: dict) -> None:
    import json

    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _update_json(file: Path, changes: dict) -> None:
    _write_json(file, {**_read_json(file), **changes})


def _default_sub_config(sub: dict) -> dict:
    """The transformers class defaults of one sub-config of config.json, as a dict."""
    from transformers import AutoConfig

    return AutoConfig.for_model(sub["model_type"]).to_dict()


def _as_transformers_4(config: dict) -> dict:
    """A config (or sub-config) in the names transformers 4.x wrote: torch_dtype; Flan-T5's unscaled output
    said as tie_word_embeddings false (transformers 5 writes scale_decoder_outputs); LLaMA's rope_theta at the
    top and rope_scaling null (transformers 5 writes rope_parameters)."""
    out = dict(config)
    if "dtype" in out:
        out["torch_dtype"] = out.pop("dtype")
    if "scale_decoder_outputs" in out:
        out["tie_word_embeddings"] = out.pop("scale_decoder_outputs")
    rope = out.pop("rope_parameters", None)
    if rope is not None:
        out.update(rope_theta=rope["rope_theta"], rope_scaling=None)
    return out


def _diff(config: dict) -> dict:
    """config.json as transformers 4.47 wrote it: each sub-config as a diff against its class defaults."""
    out = _as_transformers_4(config)
    for key in SUB_CONFIGS:
        if isinstance(config.get(key), dict):
            sub = _as_transformers_4(config[key])
            defaults = _as_transformers_4(_default_sub_config(sub))
            kept = {k: v for k, v in sub.items() if k not in defaults or defaults[k] != v}
            out[key] = {**kept, "model_type": sub["model_type"]}
    return out


def _complete(config: dict) -> dict:
    """config.json as the 2023 uploads have it: every field in every sub-config, legacy ones included, and
    no image token (those configs predate it)."""
    out = {
        **_as_transformers_4(config),
        "initializer_factor": 1.0,
        "use_decoder_only_language_model": config.get("text_config", {}).get("model_type") != "t5",
    }
    out.pop("image_token_index", None)
    for key in SUB_CONFIGS:
        if isinstance(config.get(key), dict):
            sub = config[key]
            full = {**LEGACY_COMMON_FIELDS, **_default_sub_config(sub), **sub}
            out[key] = _as_transformers_4(full)
            out[key]["transformers_version"] = ERA_VERSIONS["2023"]
    return out


def restyle_as_release(path: str | Path, era: str) -> Path:
    """Rewrite the config and processor files of a checkpoint written by transformers 5.24 (the builders above)
    as the Salesforce release of `era` ("2023" or "2024", see ERAS) has them. Weights and tokenizer stay."""
    if era not in ERAS:
        raise ValueError(f"era {era!r} is not one of {ERAS}")
    path = Path(path)
    config = _read_json(path / "config.json")
    config = _diff(config) if era == "2024" else _complete(config)
    _write_json(path / "config.json", {**config, "transformers_version": ERA_VERSIONS[era]})
    # transformers 5 writes the image processor's settings inside processor_config.json; 4.x wrote them to
    # preprocessor_config.json, and (4.47) the processor's own num_query_tokens to processor_config.json.
    processor = _read_json(path / "processor_config.json")
    image_processor = processor.pop("image_processor")
    _write_json(path / "preprocessor_config.json", image_processor)
    if era == "2024":
        own = {k: v for k, v in processor.items() if not isinstance(v, dict)}  # not the qformer tokenizer's
        _write_json(path / "processor_config.json", own)
    else:
        (path / "processor_config.json").unlink()
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m blip2.testing DIR [--kind KIND]`: write a tiny random checkpoint, e.g. to try the CLI offline."""
    import argparse

    kinds: dict[str, Callable[[Path], Any]] = {
        "opt": lambda d: build_checkpoint(d, "opt"),
        "t5": lambda d: build_checkpoint(d, "t5"),
        "retrieval": build_retrieval_checkpoint,
        **{
            f"instructblip-{lm}": partial(build_instructblip_checkpoint, language_model=lm)
            for lm in ("opt", "t5", "llama")
        },
    }
    parser = argparse.ArgumentParser(prog="python -m blip2.testing", description=main.__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--kind", choices=sorted(kinds), default="opt")
    args = parser.parse_args(argv)
    path = kinds[args.kind](args.directory)
    print(f"wrote a tiny random {args.kind} checkpoint to {path} (its outputs are random text)")


if __name__ == "__main__":
    main()
