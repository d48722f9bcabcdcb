"""Our Python PTB tokenization against the real one (Stanford CoreNLP's java PTBTokenizer, run as
pycocoevalcap runs it), on tricky captions; skipped without java."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
from eval_fixtures import TRICKY_CAPTIONS, caption_fixture, generated_captions

from blip2.eval.tokenize import ptb_tokens, tokenize

_COCO = importlib.util.find_spec("pycocoevalcap")
needs_java = pytest.mark.skipif(
    shutil.which("java") is None or _COCO is None,
    reason="the oracle is CoreNLP's jar: needs java and pycocoevalcap (the test extra)",
)
CORENLP = (
    Path(list(_COCO.submodule_search_locations or [""])[0] if _COCO else "")
    / "tokenizer"
    / "stanford-corenlp-3.4.1.jar"
)

MORE = [
    "A man riding a wave on top of a surfboard.",
    "A PERSON IS HOLDING A HOT DOG WITH KETCHUP ON IT",
    "two giraffes standing in a grassy field next to trees",
    "A bathroom with a toilet, sink, and shower.",
    "A kitchen that has a stove, microwave and refrigerator in it .",
    "A young boy's birthday party with a cake ( and candles ).",
    'A street sign that reads "Main St." on a pole',
    "A plate of food; broccoli, rice & chicken",
    "a 12-foot-tall statue of a man's head",
]


def java_tokens(lines: list[str], tmp_path: Path) -> list[str]:
    """CoreNLP's tokens, lower-cased, one line per caption (exactly pycocoevalcap's command)."""
    source = tmp_path / "captions.txt"
    source.write_text("\n".join(lines), encoding="utf-8")
    command = [
        "java",
        "-cp",
        str(CORENLP),
        "edu.stanford.nlp.process.PTBTokenizer",
        "-preserveLines",
        "-lowerCase",
    ]
    out = subprocess.run([*command, str(source)], capture_output=True, check=True).stdout.decode()
    return [line.rstrip() for line in out.split("\n")][: len(lines)]


@needs_java
def test_tokens_equal_corenlp(tmp_path):
    lines = [c for c in TRICKY_CAPTIONS + MORE if c.strip()]
    theirs = java_tokens(lines, tmp_path)
    ours = [" ".join(t.lower() for t in ptb_tokens(line)) for line in lines]
    assert ours == theirs


@needs_java
@pytest.mark.parametrize("seed", [0, 1])
def test_tokenize_equals_corenlp_on_generated_captions(tmp_path, seed):
    """What the metrics see (lower-cased, pycocoevalcap's punctuation dropped) on 2,000 generated captions."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    lines = generated_captions(2000, seed)
    theirs = [
        " ".join(w for w in line.split(" ") if w not in PUNCTUATIONS) for line in java_tokens(lines, tmp_path)
    ]
    assert [tokenize(line) for line in lines] == theirs


@needs_java
def test_tokenize_equals_pycocoevalcap_tokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs, _ = caption_fixture(0)
    theirs = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    assert {k: [tokenize(c) for c in v] for k, v in refs.items()} == theirs


@pytest.mark.parametrize(
    "caption, tokens",
    [
        ("A man's dog isn't happy.", "a man 's dog is n't happy"),
        ("(a) dog", "-lrb- a -rrb- dog"),  # -LRB- is lower-cased before the punctuation list sees it
        ('a "big" dog -- really!', "a big dog really"),
        ("", ""),
    ],
)
def test_tokenize_known_cases(caption, tokens):
    assert tokenize(caption) == tokens
