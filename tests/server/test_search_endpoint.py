"""POST /v1/search, GET /v1/thumbnail and GET /v1/info: search equals `blip2.Index.search` on the same
index and model; thumbnails only for indexed files; an index of another checkpoint is a 409."""

from __future__ import annotations

import io
import shutil
import sqlite3
import tarfile
import urllib.parse

import pytest
from PIL import Image
from service_helpers import b64

import blip2


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, photos, direct):
    """An index of four photos made with the served retrieval checkpoint; the folder it indexes."""
    root = tmp_path_factory.mktemp("indexed")
    folder = root / "photos"
    folder.mkdir()
    for photo in photos[:4]:
        shutil.copy(photo, folder / photo.name)
    (root / "secret.jpg").write_bytes(photos[0].read_bytes())  # beside the index's folder, not in it
    with blip2.Index(root / "idx", model=direct[1]) as index:
        index.add(folder)
    return root


def expected(direct, indexed, **query) -> list[dict]:
    with blip2.Index(indexed / "idx", model=direct[1]) as index:
        return [hit.to_dict() for hit in index.search(**query)]


def assert_same_hits(got: list[dict], want: list[dict]) -> None:
    for hit in got:
        assert hit.pop("thumbnail") == "/v1/thumbnail?path=" + urllib.parse.quote(hit["image"], safe="")
    assert [(h["rank"], h["image"], sorted(h)) for h in got] == [
        (h["rank"], h["image"], sorted(h)) for h in want
    ]
    for name in ("score", "match"):
        assert [h.get(name, 0) for h in got] == pytest.approx([h.get(name, 0) for h in want], rel=1e-5)


def test_search_by_text_and_image_equals_the_index(serve, direct, indexed, photos):
    client = serve(index=str(indexed / "idx"))
    got = client.post("/v1/search", json={"text": "a cat", "k": 3})
    assert got.status_code == 200, got.text
    assert_same_hits(got.json()["hits"], expected(direct, indexed, text="a cat", k=3))
    got = client.post("/v1/search", json={"text": "a cat", "rerank": True, "rerank_k": 4})
    assert_same_hits(got.json()["hits"], expected(direct, indexed, text="a cat", rerank=True, rerank_k=4))
    got = client.post("/v1/search", json={"image": "data:image/jpeg;base64," + b64(photos[1])}).json()
    query = blip2.images.load_resized(photos[1].read_bytes(), direct[1].image_config)
    assert_same_hits(got["hits"], expected(direct, indexed, image=query))
    assert got["hits"][0]["image"].endswith(photos[1].name)
    got = client.post("/v1/search", files={"image": photos[2].read_bytes()}, data={"k": "1"}).json()
    assert got["hits"][0]["image"].endswith(photos[2].name)


def test_search_filters_and_errors(serve, direct, indexed):
    client = serve(index=str(indexed / "idx"))
    got = client.post("/v1/search", json={"text": "a cat", "where_path": "*coffee*"}).json()
    assert [h["image"] for h in got["hits"]] == [
        h["image"] for h in expected(direct, indexed, text="a cat", where=blip2.index.Where(path="*coffee*"))
    ]
    assert len(got["hits"]) == 1
    for body, status in (
        ({}, 422),
        ({"text": "a", "image": b64(indexed / "secret.jpg")}, 422),
        ({"text": "x", "k": 0}, 422),
        ({"image": "http://example.com/a.jpg"}, 422),
        ({"text": "a", "kk": 1}, 422),
    ):
        got = client.post("/v1/search", json=body)
        assert got.status_code == status, (body, got.text)
        assert set(got.json()["error"]) == {"type", "message"}


def test_search_without_an_index_is_a_404(serve):
    client = serve()
    for got in (
        client.post("/v1/search", json={"text": "a cat"}),
        client.get("/v1/thumbnail", params={"path": "/etc/passwd"}),
    ):
        assert got.status_code == 404
        assert got.json()["error"]["type"] == "no_index"
    info = client.get("/v1/info").json()
    assert info["index"] is None and "search" not in info["tasks"]


def test_an_index_of_another_checkpoint_is_a_409(serve, tmp_path, retrieval_checkpoints, photos):
    other = blip2.load(retrieval_checkpoints["image-token"], device="cpu", dtype="float32")
    with blip2.Index(tmp_path / "idx", model=other) as index:
        index.add(photos[:2])
    client = serve(index=str(tmp_path / "idx"))
    got = client.post("/v1/search", json={"text": "a cat"})
    assert got.status_code == 409, got.text
    assert got.json()["error"]["type"] == "index_mismatch"


def test_thumbnails_only_of_indexed_files(serve, indexed):
    client = serve(index=str(indexed / "idx"))
    (hit,) = client.post("/v1/search", json={"text": "a rocket", "k": 1}).json()["hits"]
    path = hit["image"]
    got = client.get(hit["thumbnail"])
    assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(got.content))
    original = Image.open(path)
    assert thumb.format == "JPEG" and max(thumb.size) == min(256, max(original.size))
    folder = indexed / "photos"
    for path in (
        str(indexed / "secret.jpg"),  # a real image, not in the index
        str(folder / ".." / "secret.jpg"),
        str(folder / ".." / "photos" / "coffee.jpg"),  # an indexed file, but not its stored path
        "/etc/passwd",
        "photos/coffee.jpg",
        "",
    ):
        got = client.get("/v1/thumbnail", params={"path": path})
        assert got.status_code == 404, path
        assert got.json()["error"]["type"] == "not_found"


def test_thumbnails_of_shard_members_through_their_locator(serve, direct, tmp_path, photos):
    """A member of a tar shard: its hit carries source and key, its thumbnail is read from the shard; a
    locator crafted to point at other bytes of the shard, or a key not indexed, is a 404."""
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for key, photo in (("cat", photos[2]), ("rocket", photos[3])):
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(photo.read_bytes())
            tar.addfile(info, io.BytesIO(photo.read_bytes()))
    with blip2.Index(tmp_path / "idx", model=direct[1]) as index:
        index.add(str(shard))
    client = serve(index=str(tmp_path / "idx"))
    hits = client.post("/v1/search", json={"text": "a rocket", "k": 2}).json()["hits"]
    assert {(h["image"], h["source"], h["key"]) for h in hits} == {
        (f"{shard}#{key}", str(shard), key) for key in ("cat", "rocket")
    }
    for hit in hits:
        got = client.get(hit["thumbnail"])
        assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
        original = Image.open(photos[2] if hit["key"] == "cat" else photos[3])
        assert max(Image.open(io.BytesIO(got.content)).size) == min(256, max(original.size))
    assert client.get("/v1/thumbnail", params={"path": f"{shard}#dog"}).status_code == 404
    with sqlite3.connect(tmp_path / "idx" / "index.sqlite") as db:
        db.execute("UPDATE images SET locator = '{\"member\": [0, 4096]}'")  # the tar headers, not an image
    for hit in hits:
        got = client.get(hit["thumbnail"])
        assert got.status_code == 404 and got.json()["error"]["type"] == "not_found"


def test_info_names_the_models_index_and_tasks(serve, indexed):
    client = serve(index=str(indexed / "idx"))
    info = client.get("/v1/info").json()
    assert info["models"] == {
        "model": client.service.models.model.name,
        "match_model": client.service.models.match_model.name,
    }
    assert info["index"]["count"] == 4
    assert set(info["tasks"]) >= {"caption", "ask", "chat", "match", "search", "embed"}
    spec = client.get("/openapi.json").json()
    assert {"/v1/search", "/v1/thumbnail", "/v1/info", "/v1/chat/completions"} <= set(spec["paths"])
    body = spec["paths"]["/v1/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"text", "image", "k", "rerank", "where_path"} <= set(body["properties"])


def test_serve_with_a_folder_that_is_not_an_index_is_one_line(tmp_path, capsys):
    from blip2.cli import main

    (tmp_path / "not-an-index").mkdir()
    code = None
    try:
        main(["serve", "--index", str(tmp_path / "not-an-index"), "--port", "0"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("blip2: error:") and "not-an-index" in err and "Traceback" not in err


def test_the_index_routes_need_the_api_key(serve, indexed):
    client = serve(index=str(indexed / "idx"), api_key="k")
    for got in (
        client.get("/v1/info"),
        client.get("/v1/thumbnail", params={"path": "x"}),
        client.post("/v1/search", json={"text": "a cat"}),
    ):
        assert got.status_code == 401 and got.json()["error"]["type"] == "unauthorized"
    assert client.get("/v1/info", headers={"Authorization": "Bearer k"}).status_code == 200
