"""Tokenizer wrapper and prompt construction, built exactly as the reference processor builds them.

Decoder-only (OPT): `[image]*Q  [pad]*k  </s> prompt...` — the query placeholders first, then the left
padding the tokenizer put before the BOS, so a batch of prompts of different lengths gives the same output
as each alone. Encoder-decoder (Flan-T5): `[image]*Q  prompt... </s>  [pad]*k` (right padding).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import CheckpointError
from .files import read_json, read_text


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
        a WordPiece vocab.txt as older exports have.

        Every file is untrusted: each is read up to a size cap (tokenizer.json 64 MiB, vocab.txt 16 MiB, the
        small JSON files 1 MiB), and a file that is too big, not UTF-8, not valid JSON, not an object, of
        the wrong types, or names a pad token (or a BOS token it must add) missing from the vocabulary, is a
        CheckpointError naming it. No pad token named: padding uses id 0 (padding is masked out)."""
        settings, origin = _settings(directory)
        vocabulary = directory / "tokenizer.json"
        if vocabulary.is_file():
            tokenizer = _tokenizer_json(vocabulary)
        elif (directory / "vocab.txt").is_file():
            vocabulary = directory / "vocab.txt"
            tokenizer = bert_from_vocab(directory, settings)
        else:
            raise CheckpointError(
                f"{directory} has no tokenizer.json (nor a BERT vocab.txt). To write one from another format, "
                "run once, where transformers is installed: "
                f"AutoTokenizer.from_pretrained('{directory}').save_pretrained('{directory}')"
            )
        add_bos = settings.get("add_bos_token", False)
        tokens = {key: _token(settings.get(key)) for key in ("bos_token", "pad_token")}
        for key in ("pad_token", "bos_token") if add_bos else ("pad_token",):
            if tokens[key] is not None and tokenizer.token_to_id(tokens[key]) is None:
                raise CheckpointError(
                    f"{origin[key]}: {key} {tokens[key]!r} is not in the vocabulary ({vocabulary.name})"
                )
        return cls(tokenizer, bos_token=tokens["bos_token"], pad_token=tokens["pad_token"], add_bos=add_bos)

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

    @functools.cached_property
    def longest_token(self) -> int:
        """The most characters one token of the vocabulary spells: a text longer than n times this is more
        than n tokens (short of a normalizer that deletes characters), so it can be refused untokenized."""
        return max(len(token) for token in self.tokenizer.get_vocab(with_added_tokens=True))

    @property
    def special_ids(self) -> set[int]:
        return {i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special}


def bert_from_vocab(directory: Path, settings: dict):
    """A BERT WordPiece tokenizer from vocab.txt (+ added_tokens.json): lowercasing as the config says,
    '[CLS] text [SEP]' — what transformers' BertTokenizerFast builds from the same files."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab = _read_vocab(directory / "vocab.txt")
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(
        lowercase=settings.get("do_lower_case", True), strip_accents=settings.get("strip_accents")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    specials: list[str] = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab]
    added = _read_added_tokens(directory / "added_tokens.json")  # {token: id}, e.g. LAVIS's "[DEC]"
    tokenizer.add_special_tokens(specials + sorted(added, key=added.__getitem__))
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    return tokenizer


# -- reading untrusted files ----------------------------------------------------------------------------------
# Real files are far smaller: tokenizer.json a few MB (LLaMA's 1.8 MB, OPT's 2 MB), vocab.txt 230 kB, the
# JSON settings a few kB. The caps bound what a crafted checkpoint can make us read into memory.
MAX_TOKENIZER_BYTES = 64 << 20
MAX_VOCAB_BYTES = 16 << 20
MAX_SETTINGS_BYTES = 1 << 20

# The tokenizer settings we read, with their accepted types: (check, what the error says).
SETTINGS = {
    "bos_token": (lambda v: v is None or _token_is_valid(v), "a string or a {'content': string} object"),
    "pad_token": (lambda v: v is None or _token_is_valid(v), "a string or a {'content': string} object"),
    "add_bos_token": (lambda v: isinstance(v, bool), "true or false"),
    "do_lower_case": (lambda v: isinstance(v, bool), "true or false"),
    "strip_accents": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
}
BERT_REQUIRED = ("[UNK]", "[CLS]", "[SEP]")


def _settings(directory: Path) -> tuple[dict, dict[str, Path]]:
    """The settings of SETTINGS from tokenizer_config.json, then special_tokens_map.json for those it
    lacks; and the file each came from (for error messages). A wrong type is a CheckpointError."""
    settings: dict = {}
    origin: dict[str, Path] = {}
    for path in (directory / "tokenizer_config.json", directory / "special_tokens_map.json"):
        for key, value in _read_json(path).items():
            if key not in SETTINGS or key in settings:
                continue
            valid, expected = SETTINGS[key]
            if not valid(value):
                raise CheckpointError(f"{path}: {key} must be {expected}, got {value!r}")
            settings[key], origin[key] = value, path
    return settings, origin


def _read_json(path: Path) -> dict:
    """A JSON object from a small settings file; {} when the file is absent."""
    return read_json(path, MAX_SETTINGS_BYTES) if path.exists() or path.is_symlink() else {}


def _tokenizer_json(path: Path):
    from tokenizers import Tokenizer

    text = read_text(path, MAX_TOKENIZER_BYTES)
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # the tokenizers library raises plain Exception for every malformed file
        raise CheckpointError(f"{path}: not a valid tokenizer ({e})") from None


def _read_vocab(path: Path) -> dict[str, int]:
    """vocab.txt: one token per line, its id the line number (as tokenizers' WordPiece.from_file reads it)."""
    lines = read_text(path, MAX_VOCAB_BYTES).split("\n")
    if lines[-1] == "":
        lines.pop()
    vocab = {line.rstrip(): i for i, line in enumerate(lines)}
    missing = [t for t in BERT_REQUIRED if t not in vocab]
    if missing:
        raise CheckpointError(f"{path}: a BERT vocabulary needs {', '.join(missing)}")
    return vocab


def _read_added_tokens(path: Path) -> dict[str, int]:
    added = _read_json(path)
    for token, index in added.items():
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise CheckpointError(f"{path}: the id of {token!r} must be an integer >= 0, got {index!r}")
    return added


def _token_is_valid(value) -> bool:
    if isinstance(value, dict):
        value = value.get("content")
    return isinstance(value, str)


def _token(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value
