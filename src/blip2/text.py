"""Tokenizer wrapper and prompt construction, built exactly as the reference processor builds them.

Decoder-only (OPT): `[image]*Q  [pad]*k  </s> prompt...` — the query placeholders first, then the left
padding the tokenizer put before the BOS, so a batch of prompts of different lengths gives the same output
as each alone. Encoder-decoder (Flan-T5): `[image]*Q  prompt... </s>  [pad]*k` (right padding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import CheckpointError

PROMPT_TEMPLATES = {
    "opt": "Question: {} Answer:",
    "t5": "Question: {} Short answer:",
}


@dataclass
class Prompts:
    """A batch of tokenized prompts, laid out for the language model (query placeholders excluded)."""

    ids: Tensor  # (N, T) text ids, padded
    mask: Tensor  # (N, T) 1 for tokens, 0 for padding


class TextProcessor:
    def __init__(self, tokenizer, *, bos_token: str | None, pad_token: str | None, add_bos: bool):
        self.tokenizer = tokenizer
        self.bos_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.pad_id = tokenizer.token_to_id(pad_token) if pad_token else None
        self.add_bos = add_bos

    @classmethod
    def from_dir(cls, directory: Path) -> TextProcessor:
        """The tokenizer of a checkpoint directory: tokenizer.json, or for BERT tokenizers (the Q-Former's)
        a WordPiece vocab.txt as older exports have."""
        from tokenizers import Tokenizer

        settings = _read_json(directory / "tokenizer_config.json")
        settings.update(
            {k: v for k, v in _read_json(directory / "special_tokens_map.json").items() if k not in settings}
        )
        if (directory / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        elif (directory / "vocab.txt").is_file():
            tokenizer = bert_from_vocab(directory, settings)
        else:
            raise CheckpointError(
                f"{directory} has no tokenizer.json (nor a BERT vocab.txt). To write one from another format, "
                "run once, where transformers is installed: "
                f"AutoTokenizer.from_pretrained('{directory}').save_pretrained('{directory}')"
            )
        return cls(
            tokenizer,
            bos_token=_token(settings.get("bos_token")),
            pad_token=_token(settings.get("pad_token")),
            add_bos=bool(settings.get("add_bos_token", False)),
        )

    def encode(self, text: str) -> list[int]:
        """Token ids with the special tokens the reference tokenizer adds (OPT: a leading </s>; T5: a final </s>)."""
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def batch(self, texts: list[str], padding_side: str, max_length: int | None = None) -> Prompts:
        """Tokenize and pad `texts`; padding on the left for decoder-only models, on the right otherwise.
        With `max_length`, longer texts are truncated, keeping a final special token ([SEP], </s>)."""
        encoded = [self.truncate(self.encode(t), max_length) for t in texts]
        width = max(len(e) for e in encoded)
        pad = self.pad_id if self.pad_id is not None else 0
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            span = slice(width - len(e), width) if padding_side == "left" else slice(0, len(e))
            ids[row, span] = torch.tensor(e, dtype=torch.long)
            mask[row, span] = 1
        return Prompts(ids, mask)

    def truncate(self, ids: list[int], max_length: int | None) -> list[int]:
        if max_length is None or len(ids) <= max_length:
            return ids
        if ids[-1] in self.special_ids:
            return ids[: max_length - 1] + ids[-1:]
        return ids[:max_length]

    @property
    def special_ids(self) -> set[int]:
        return {i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special}


def bert_from_vocab(directory: Path, settings: dict):
    """A BERT WordPiece tokenizer from vocab.txt (+ added_tokens.json): lowercasing as the config says,
    '[CLS] text [SEP]' — what transformers' BertTokenizerFast builds from the same files."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordPiece.from_file(str(directory / "vocab.txt"), unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(
        lowercase=settings.get("do_lower_case", True), strip_accents=settings.get("strip_accents")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    specials = [
        t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if tokenizer.token_to_id(t) is not None
    ]
    added = _read_json(directory / "added_tokens.json")  # {token: id}, e.g. LAVIS's "[DEC]"
    tokenizer.add_special_tokens(specials + sorted(added, key=added.get))
    tokenizer.post_processor = processors.BertProcessing(
        ("[SEP]", tokenizer.token_to_id("[SEP]")), ("[CLS]", tokenizer.token_to_id("[CLS]"))
    )
    return tokenizer


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value
