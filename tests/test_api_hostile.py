"""Crafted tokenizer files: each is refused with a CheckpointError naming it, never a raw exception, and
never read past its size cap. The files are built here from the tiny checkpoints' good ones."""

from __future__ import annotations

import json
import shutil

import pytest

import blip2
from blip2 import text as text_module
from blip2.errors import CheckpointError
from blip2.text import TextProcessor

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture
def opt_tokenizer(checkpoints, tmp_path):
    """A copy of the tiny OPT checkpoint's tokenizer files, to corrupt."""
    for name in TOKENIZER_FILES:
        shutil.copy(checkpoints["opt"] / name, tmp_path)
    return tmp_path


@pytest.fixture
def bert_vocab(instruct_checkpoints, tmp_path):
    """The Q-Former's BERT tokenizer as an older export has it: vocab.txt (+ added_tokens.json)."""
    source = instruct_checkpoints["opt"] / "qformer_tokenizer"
    state = json.loads((source / "tokenizer.json").read_text())
    vocab = state["model"]["vocab"]
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in sorted(vocab, key=vocab.get)))
    shutil.copy(source / "tokenizer_config.json", tmp_path)
    return tmp_path


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("name", [*TOKENIZER_FILES, "special_tokens_map.json"])
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not valid JSON|not a valid tokenizer"),
        (b"[1, 2]", "not a JSON object|not a valid tokenizer"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON|not a valid tokenizer"),  # deep nesting
    ],
)
def test_malformed_file_is_named(name, content, message, opt_tokenizer):
    (opt_tokenizer / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"{name}: ({message})"):
        TextProcessor.from_dir(opt_tokenizer)


def test_tokenizer_json_that_is_no_tokenizer(opt_tokenizer):
    (opt_tokenizer / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(CheckpointError, match="tokenizer.json: not a valid tokenizer"):
        TextProcessor.from_dir(opt_tokenizer)


def test_oversized_files_are_refused_unread(opt_tokenizer, monkeypatch):
    """A settings file past 1 MiB is refused even when it is valid JSON; so is a tokenizer.json past its cap
    (made small here, so as not to write 64 MiB)."""
    config = opt_tokenizer / "tokenizer_config.json"
    config.write_text(json.dumps({"pad_token": "<pad>", "padding": " " * (1 << 20)}))
    with pytest.raises(CheckpointError, match="tokenizer_config.json: larger than 1 MiB"):
        TextProcessor.from_dir(opt_tokenizer)
    config.write_text("{}")
    size = (opt_tokenizer / "tokenizer.json").stat().st_size
    monkeypatch.setattr(text_module, "MAX_TOKENIZER_BYTES", size - 1)
    with pytest.raises(CheckpointError, match="tokenizer.json: larger than"):
        TextProcessor.from_dir(opt_tokenizer)
    monkeypatch.setattr(text_module, "MAX_TOKENIZER_BYTES", size)
    assert TextProcessor.from_dir(opt_tokenizer).encode("a photo of")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(bos_token=5), "bos_token must be a string or a {'content': string} object, got 5"),
        (dict(pad_token=["<pad>"]), "pad_token must be a string"),
        (dict(pad_token={"content": 1}), "pad_token must be a string"),
        (dict(add_bos_token="yes"), "add_bos_token must be true or false, got 'yes'"),
        (dict(pad_token="<nowhere>"), "pad_token '<nowhere>' is not in the vocabulary \\(tokenizer.json\\)"),
        (dict(add_bos_token=True, bos_token="<nowhere>"), "bos_token '<nowhere>' is not in the vocabulary"),
    ],
)
def test_bad_settings_are_named(changes, message, opt_tokenizer):
    _edit_json(opt_tokenizer / "tokenizer_config.json", **changes)
    with pytest.raises(CheckpointError, match=rf"tokenizer_config.json: {message}"):
        TextProcessor.from_dir(opt_tokenizer)


def test_settings_from_special_tokens_map_are_checked_and_named(opt_tokenizer):
    config = json.loads((opt_tokenizer / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (opt_tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    (opt_tokenizer / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<zzz>"}}))
    with pytest.raises(CheckpointError, match="special_tokens_map.json: pad_token '<zzz>' is not in"):
        TextProcessor.from_dir(opt_tokenizer)
    (opt_tokenizer / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "<pad>"}}))
    assert TextProcessor.from_dir(opt_tokenizer).pad_id is not None


def test_unused_bos_token_may_be_absent(opt_tokenizer):
    """Without add_bos_token the BOS token is never used: its absence is no reason to refuse."""
    _edit_json(opt_tokenizer / "tokenizer_config.json", bos_token="<nowhere>")
    assert TextProcessor.from_dir(opt_tokenizer).bos_id is None


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("vocab.txt", "[PAD]\n[UNK]\n[CLS]\nhello\n", "vocab.txt: a BERT vocabulary needs \\[SEP\\]"),
        ("vocab.txt", b"[PAD]\n\xc3\x28\n", "vocab.txt: not UTF-8"),
        (
            "added_tokens.json",
            '{"[DEC]": "x"}',
            "added_tokens.json: the id of '\\[DEC\\]' must be an integer",
        ),
        ("added_tokens.json", "[]", "added_tokens.json: not a JSON object"),
        ("tokenizer_config.json", '{"do_lower_case": "no"}', "tokenizer_config.json: do_lower_case must be"),
        ("tokenizer_config.json", '{"strip_accents": 1}', "tokenizer_config.json: strip_accents must be"),
    ],
)
def test_bad_bert_files_are_named(name, content, message, bert_vocab):
    path = bert_vocab / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(CheckpointError, match=message):
        TextProcessor.from_dir(bert_vocab)


def test_oversized_vocab_txt_is_refused(bert_vocab, monkeypatch):
    monkeypatch.setattr(text_module, "MAX_VOCAB_BYTES", 100)
    with pytest.raises(CheckpointError, match="vocab.txt: larger than"):
        TextProcessor.from_dir(bert_vocab)


def test_load_reports_the_bad_tokenizer_file(checkpoints, tmp_path):
    """End to end: `blip2.load` on a checkpoint whose tokenizer_config.json is broken."""
    copy = shutil.copytree(checkpoints["opt"], tmp_path / "opt")
    (copy / "tokenizer_config.json").write_text('{"pad_token": ')
    with pytest.raises(CheckpointError, match="tokenizer_config.json: not valid JSON"):
        blip2.load(copy, device="cpu")
