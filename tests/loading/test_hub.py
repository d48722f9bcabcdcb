"""Resolving names: local directories, repo ids checked before any Hub call, and what is downloaded.

huggingface_hub.snapshot_download is replaced by a fake that serves a repo's files from a dict and writes
those its allow_patterns match into one snapshot folder, as the real one does: no network.
"""

from __future__ import annotations

import types
from fnmatch import fnmatch
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
from released_layouts import copy_checkpoint, to_bin_shards

import blip2
from blip2.errors import CheckpointError
from blip2.loading import hub as hub_module
from blip2.loading.hub import ALLOW_PATTERNS, PICKLE_PATTERNS, is_repo_id, resolve

REPO = "Salesforce/blip2-opt-2.7b"


class FakeHub:
    """A Hub holding one repo (`files`: name -> bytes); `cached`: names already in the local cache."""

    def __init__(self, root: Path, files: dict[str, bytes], cached: tuple[str, ...] = (), missing=False):
        self.snapshot = root / "snapshots" / "abc123"
        self.files, self.missing, self.calls = files, missing, []
        for name in cached:
            self._write(name)

    def _write(self, name: str) -> None:
        self.snapshot.mkdir(parents=True, exist_ok=True)
        (self.snapshot / name).write_bytes(self.files[name])

    def __call__(self, repo_id, *, allow_patterns, local_files_only=False, **options):
        self.calls.append((repo_id, list(allow_patterns), local_files_only))
        if local_files_only:
            if not self.snapshot.is_dir():
                raise LocalEntryNotFoundError("not in the cache")
            return str(self.snapshot)
        if self.missing:
            raise RepositoryNotFoundError("404", response=types.SimpleNamespace(headers={}, request=None))
        for name in self.files:
            if any(fnmatch(name, p) for p in allow_patterns):
                self._write(name)
        return str(self.snapshot)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def _hub(monkeypatch, tmp_path, files, **options) -> FakeHub:
    hub = FakeHub(tmp_path / "hub", files, **options)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    return hub


def test_safetensors_repo_downloads_no_pickles(monkeypatch, tmp_path):
    files = {
        "config.json": b"{}",
        "model.safetensors": b"weights",
        "pytorch_model.bin": b"old weights",
        "tf_model.h5": b"other framework",
    }
    hub = _hub(monkeypatch, tmp_path, files)
    path = resolve(REPO)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert hub.calls == [(REPO, ALLOW_PATTERNS, True), (REPO, ALLOW_PATTERNS, False)]


def test_repo_without_safetensors_falls_back_to_bin_shards(monkeypatch, tmp_path, checkpoints, photos):
    """A 2023 copy (.bin shards and their index only) is downloaded and loads weights-only."""
    d = copy_checkpoint(checkpoints["opt-sharded"], tmp_path / "repo")
    to_bin_shards(d)
    hub = _hub(monkeypatch, tmp_path, {**_files(d), "flax_model.msgpack": b"other framework"})
    model = blip2.load(REPO)
    assert [call[1] for call in hub.calls] == [ALLOW_PATTERNS, ALLOW_PATTERNS, PICKLE_PATTERNS]
    assert not (hub.snapshot / "flax_model.msgpack").exists()
    options = dict(num_beams=1, max_new_tokens=4)
    assert model.caption(photos[0], **options) == blip2.load(checkpoints["opt-sharded"]).caption(
        photos[0], **options
    )


def test_cached_snapshot_with_weights_needs_no_network(monkeypatch, tmp_path):
    files = {"config.json": b"{}", "model.safetensors": b"weights"}
    hub = _hub(monkeypatch, tmp_path, files, cached=tuple(files))
    assert resolve(REPO) == hub.snapshot
    assert [call[2] for call in hub.calls] == [True]


def test_cached_snapshot_without_weights_is_completed(monkeypatch, tmp_path):
    files = {"config.json": b"{}", "model.safetensors": b"weights"}
    hub = _hub(monkeypatch, tmp_path, files, cached=("config.json",))
    assert (resolve(REPO) / "model.safetensors").is_file()
    # The cache may hold a 2023 copy's .bin shards: looked for there before the network.
    assert [call[1:] for call in hub.calls] == [
        (ALLOW_PATTERNS, True),
        (PICKLE_PATTERNS, True),
        (ALLOW_PATTERNS, False),
    ]


def test_unknown_repo(monkeypatch, tmp_path):
    _hub(monkeypatch, tmp_path, {}, missing=True)
    with pytest.raises(CheckpointError, match="not found on the Hugging Face Hub"):
        resolve("Salesforce/blip2-opt-99b")


@pytest.mark.parametrize(
    "name",
    [
        "Salesforce/blip2 opt-2.7b",
        "a/b/c",
        "Salesforce/blip2--opt",
        "-x/y",
        "x/y.",
        "x/y.git",
        "x/" + "y" * 97,
    ],
)
def test_invalid_repo_id_is_never_sent_to_the_hub(monkeypatch, tmp_path, name):
    hub = _hub(monkeypatch, tmp_path, {"config.json": b"{}"})
    with pytest.raises(CheckpointError, match="not a valid Hub repo id"):
        resolve(name)
    assert hub.calls == []


def test_repo_id_rules():
    assert is_repo_id("Salesforce/blip2-flan-t5-xl") and is_repo_id("a_b/c.d-1")
    assert not is_repo_id("blip2-opt-2.7b")  # an owner is required: a bare word is more likely a typo'd path
    assert not is_repo_id("Salesforce/blip2 opt") and not is_repo_id("../Salesforce/x")


def test_resolve_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve(tmp_path)
    with pytest.raises(CheckpointError, match="no such directory"):
        resolve(tmp_path / "absent")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="hf download Salesforce/blip2-flan-t5-xl"):
        resolve("Salesforce/blip2-flan-t5-xl")


# -- the packaged demo checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["demo", "demo-itm"])
def test_demo_names_resolve_to_the_packaged_folders_without_the_hub(monkeypatch, tmp_path, name):
    hub = _hub(monkeypatch, tmp_path, {}, missing=True)
    monkeypatch.chdir(tmp_path)
    path = resolve(name)
    assert path == Path(hub_module.__file__).parent.parent / "demo" / "weights" / name
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert hub.calls == []


def test_a_local_folder_named_demo_wins(monkeypatch, tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve("demo") == Path("demo")


def test_missing_demo_weights_say_how_to_rebuild(monkeypatch, tmp_path):
    monkeypatch.setitem(hub_module.PACKAGED_CHECKPOINTS, "demo", "no-such-folder")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"demo.*not in this installation.*blip2\.demo\.build"):
        resolve("demo")
