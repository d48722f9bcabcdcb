"""Tokenizer loading and prompt layout details not covered by the end-to-end parity tests."""

from __future__ import annotations

import json
import shutil

import pytest

from blip2.errors import CheckpointError
from blip2.text import TextProcessor

TEXTS = ["What is in the picture?", "Describe the image in detail.", "two DOGS playing, with a ball!"]


def test_bert_vocab_txt_gives_the_same_ids_as_tokenizer_json(instruct_checkpoints, tmp_path):
    source = instruct_checkpoints["opt"] / "qformer_tokenizer"
    reference = TextProcessor.from_dir(source)
    state = json.loads((source / "tokenizer.json").read_text())
    vocab = state["model"]["vocab"]  # WordPiece: {token: id}
    added = {t["content"]: t["id"] for t in state["added_tokens"] if t["content"] not in vocab}
    legacy = tmp_path / "qformer_tokenizer"
    legacy.mkdir()
    (legacy / "vocab.txt").write_text("".join(t + "\n" for t in sorted(vocab, key=vocab.get)))
    (legacy / "added_tokens.json").write_text(json.dumps(added))
    shutil.copy(source / "tokenizer_config.json", legacy)
    ours = TextProcessor.from_dir(legacy)
    for text in TEXTS:
        assert ours.encode(text) == reference.encode(text)
    assert ours.batch(TEXTS, "right").ids.tolist() == reference.batch(TEXTS, "right").ids.tolist()


def test_missing_tokenizer_says_how_to_write_one(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(CheckpointError, match="save_pretrained"):
        TextProcessor.from_dir(tmp_path)


def test_truncation_keeps_the_final_special_token(instruct_checkpoints):
    bert = TextProcessor.from_dir(instruct_checkpoints["opt"] / "qformer_tokenizer")
    long = " ".join(["dogs"] * 50)
    ids = bert.batch([long, "a cat"], "right", max_length=8).ids
    assert ids.shape == (2, 8)
    assert ids[0, -1].item() == bert.tokenizer.token_to_id("[SEP]")
    assert ids[0, 0].item() == bert.tokenizer.token_to_id("[CLS]")


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_no_token_spells_more_than_longest_token_characters(family, checkpoints):
    """The bound check_lengths relies on to refuse a long prompt untokenized: n tokens never cover more than
    n * longest_token characters."""
    text = TextProcessor.from_dir(checkpoints[family])
    vocab = text.tokenizer.get_vocab(with_added_tokens=True)
    assert text.longest_token == max(len(token) for token in vocab)
    for sample in TEXTS + ["a" * 500, "the the the " * 40, "ünïcödé ✓ 漢字 " * 10]:
        assert len(sample) <= len(text.encode(sample)) * text.longest_token
