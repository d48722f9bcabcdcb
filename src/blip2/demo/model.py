"""The demo model's shape and its tokenizers: a tiny BLIP-2 whose words are the scenes' words.

Vision tower: a ViT on 48x48 images in 16x16 patches, one per cell of the scenes' 3x3 grid (9 patches + CLS),
hidden 96, 3 layers. Q-Former: hidden 96, 2 layers, cross-attention in every layer, 8 query tokens. Language
model: OPT-style, hidden 128, 2 layers. Sized to train on a 2-core CPU in under half an hour (`build`: 26
minutes). The vision tower is big enough to tell the six shapes apart: with a linear head on its cells' tokens
and the shapes as labels, it learns them to 0.99 on held-out scenes in 800 steps (patches of 8 learned no
faster). What it lacks is a training signal that gets through: hence the build's warm-up run on shape
questions alone (warmup.yaml).
The language model ends its texts with "\\n" as the released OPT BLIP-2 checkpoints do (their eos_token_id is
"\\n"'s id). The tokenizers are trained on the scenes' own texts, so every word of a caption, question or
answer is one token: a byte-level BPE with OPT's special tokens for the language model and a lowercasing
WordPiece with BERT's (and LAVIS's "[DEC]") for the Q-Former, written with `tokenizers` alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from . import scenes, texts

NUM_QUERY_TOKENS = 8
VISION: dict[str, Any] = dict(
    hidden_size=96,
    intermediate_size=384,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=scenes.IMAGE_SIZE,
    patch_size=scenes.IMAGE_SIZE // scenes.GRID,  # one patch per grid cell: 9 patches + CLS
)
QFORMER: dict[str, Any] = dict(
    hidden_size=96,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    cross_attention_frequency=1,
    encoder_hidden_size=VISION["hidden_size"],
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
OPT: dict[str, Any] = dict(
    hidden_size=128,
    ffn_dim=512,
    word_embed_proj_dim=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    dropout=0.0,
    attention_dropout=0.0,
)
# transformers' default is 0.02: from it, the image's share of the query outputs is ~5% and the language
# model learned to ignore the image (loss flat at the text prior's ~0.9 for 450 steps); with 0.1 it was
# 0.6 by step 400 and falling.
INITIALIZER_RANGE = 0.1
IMAGE_TEXT_HIDDEN_SIZE = 64  # the ITC projection (256 in the released checkpoints)
# What BlipImageProcessor writes for the released checkpoints, at the demo's image size.
IMAGE_PROCESSOR: dict[str, Any] = {
    "image_processor_type": "BlipImageProcessor",
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"height": scenes.IMAGE_SIZE, "width": scenes.IMAGE_SIZE},
}
OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ASK_TEMPLATE = "Question: {} Answer:"  # the OPT family's, as blip2's `ask` uses it


def corpus(count: int = 3000) -> list[str]:
    """Every caption phrasing, question (in the ask template) and answer of `count` training scenes, one line
    each: the texts the tokenizers are trained on."""
    lines = []
    for i in range(count):
        s = scenes.scene("train", i)
        lines += [c + "\n" for c in texts.captions(s)]
        lines += [ASK_TEMPLATE.format(q.question) + " " + q.answer + "\n" for q in texts.questions(s)]
    return lines


def opt_tokenizer(lines: list[str], vocab_size: int = 400):
    """A byte-level BPE with OPT's special tokens (<s>=0, <pad>=1, </s>=2, <unk>=3) and '</s>' prepended as
    BOS, as the OPT tokenizer does; every byte is in the vocabulary, so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=OPT_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)]
    )
    return tok


def qformer_tokenizer(lines: list[str]):
    """A lowercasing WordPiece: BERT's special tokens ([PAD]=0, [UNK], [CLS], [SEP], [MASK]), the letters
    (alone and as '##' continuations, so unknown words still encode), every word of `lines`, and '[DEC]', the
    BOS token of the Q-Former's text generation (ITG) that LAVIS adds; '[CLS] text [SEP]'."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    words = sorted({w for line in lines for w in re.findall(r"\w+|[^\w\s]", line.lower())})
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    tokens = [*BERT_SPECIALS, *chars, *("##" + c for c in chars)]
    tokens += [w for w in words if w not in tokens]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens([*BERT_SPECIALS, "[DEC]"])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return tok


OPT_TOKENIZER_CONFIG = {
    "tokenizer_class": "GPT2Tokenizer",
    "add_prefix_space": False,
    "bos_token": "</s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "errors": "replace",
}
BERT_TOKENIZER_CONFIG = {
    "tokenizer_class": "BertTokenizer",
    "do_lower_case": True,
    "bos_token": "[DEC]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "mask_token": "[MASK]",
    "strip_accents": None,
    "tokenize_chinese_chars": True,
}


def write_tokenizer(directory: Path, tokenizer, settings: dict[str, Any]) -> Path:
    """tokenizer.json and tokenizer_config.json into `directory` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return directory


def caption_config(opt_vocab: int, eos_token_id: int) -> dict[str, Any]:
    """config.json of the stage-2 model (Blip2ForConditionalGeneration, OPT), as transformers writes it."""
    return {
        "architectures": ["Blip2ForConditionalGeneration"],
        "model_type": "blip-2",
        "initializer_range": INITIALIZER_RANGE,
        "num_query_tokens": NUM_QUERY_TOKENS,
        "image_text_hidden_size": IMAGE_TEXT_HIDDEN_SIZE,
        "use_decoder_only_language_model": True,
        "vision_config": {"model_type": "blip_2_vision_model", **VISION},
        "qformer_config": {"model_type": "blip_2_qformer", **QFORMER, "vocab_size": 64},
        "text_config": {
            "model_type": "opt",
            **OPT,
            "vocab_size": opt_vocab,
            "bos_token_id": 2,
            "pad_token_id": 1,
            "eos_token_id": eos_token_id,
        },
    }


def retrieval_config(qformer_vocab: int) -> dict[str, Any]:
    """config.json of the stage-1 model (Blip2ForImageTextRetrieval): a Q-Former that reads text, no LM."""
    return {
        "architectures": ["Blip2ForImageTextRetrieval"],
        "model_type": "blip-2",
        "initializer_range": INITIALIZER_RANGE,
        "num_query_tokens": NUM_QUERY_TOKENS,
        "image_text_hidden_size": IMAGE_TEXT_HIDDEN_SIZE,
        "vision_config": {"model_type": "blip_2_vision_model", **VISION},
        "qformer_config": {
            "model_type": "blip_2_qformer",
            **QFORMER,
            "vocab_size": qformer_vocab,
            "use_qformer_text_input": True,
        },
    }
