"""METEOR through the jar, against pycocoevalcap's Meteor (same jar, its own wrapper); skipped without java."""

from __future__ import annotations

import shutil

import pytest
from eval_fixtures import caption_fixture

from blip2.eval import meteor as meteor_module
from blip2.eval.captions import pairs
from blip2.eval.meteor import MeteorUnavailable, find_jar, meteor
from blip2.eval.tokenize import tokenize

pytest.importorskip("pycocoevalcap", reason="the oracle: pip install pycocoevalcap (the test extra)")


@pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed (METEOR is a jar)")
def test_meteor_equals_pycocoevalcap():
    from pycocoevalcap.meteor.meteor import Meteor

    raw_refs, raw_cands = caption_fixture(1)
    refs = {k: [tokenize(c) for c in v] for k, v in raw_refs.items()}
    cands = {k: [tokenize(c) for c in v] for k, v in raw_cands.items()}
    ours, ours_each = meteor(pairs(refs, cands))
    theirs, theirs_each = Meteor().compute_score(refs, cands)
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert ours_each == pytest.approx(theirs_each, abs=1e-12)
    assert 0 < ours < 1


def test_a_missing_jar_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP2_METEOR_JAR", str(tmp_path / "nope.jar"))
    with pytest.raises(MeteorUnavailable, match="nope.jar: no such file"):
        find_jar()
    with pytest.raises(MeteorUnavailable, match="other.jar"):
        meteor([(["a dog"], "a dog")], jar=tmp_path / "other.jar")


def test_no_java_is_unavailable(monkeypatch):
    monkeypatch.setattr(meteor_module.shutil, "which", lambda name: None)
    with pytest.raises(MeteorUnavailable, match="java/jar not found"):
        meteor([(["a dog"], "a dog")])


def test_a_jar_that_is_not_meteor_fails_cleanly(tmp_path):
    if shutil.which("java") is None:
        pytest.skip("java is not installed")
    fake = tmp_path / "meteor-1.5.jar"
    fake.write_bytes(b"not a jar")
    with pytest.raises(MeteorUnavailable, match="failed"):
        meteor([(["a dog"], "a dog")], jar=fake)
