"""Every endpoint against the Python API called directly on the same inputs (tiny checkpoints): same texts,
same numbers; JSON base64, data: URIs and multipart uploads alike; the probes, metrics and docs."""

from __future__ import annotations

import pytest
from PIL import Image
from service_helpers import b64, metric

APPROX = dict(rel=1e-5, abs=1e-6)


def test_caption_equals_the_api(serve, direct, photos):
    client = serve()
    images = [b64(p) for p in photos[:3]]
    for options in ({}, {"num_beams": 1, "max_new_tokens": 7}, {"num_beams": 3, "num_return_sequences": 2}):
        got = client.post("/v1/caption", json={"images": images, **options})
        assert got.status_code == 200, got.text
        assert got.json() == {"captions": direct[0].caption([p.read_bytes() for p in photos[:3]], **options)}
    got = client.post("/v1/caption", json={"images": images[:1], "prompt": "a photo of"})
    assert got.json()["captions"] == direct[0].caption([photos[0].read_bytes()], "a photo of")


def test_ask_equals_the_api(serve, direct, photos):
    client = serve()
    questions = ["what is it?", "where is it?", "how many?"]
    got = client.post("/v1/ask", json={"images": [b64(photos[0])], "questions": questions, "num_beams": 2})
    assert got.json() == {"answers": direct[0].ask([photos[0].read_bytes()], questions, num_beams=2)}
    images = [b64(p) for p in photos[:2]]
    got = client.post("/v1/ask", json={"images": images, "questions": "what?", "template": "Q: {} A:"})
    assert got.json()["answers"] == direct[0].ask([p.read_bytes() for p in photos[:2]], ["what?"], "Q: {} A:")


def test_match_similarity_classify_equal_the_api(serve, direct, photos):
    client = serve()
    texts = ["a cat on a couch", "an astronaut", "coffee"]
    data = [p.read_bytes() for p in photos[:3]]
    got = client.post("/v1/match", json={"images": [b64(photos[0])], "texts": texts}).json()
    assert got["probabilities"] == pytest.approx(direct[1].match([data[0]], texts), **APPROX)
    got = client.post("/v1/similarity", json={"images": [b64(p) for p in photos[:3]], "texts": texts}).json()
    expected = direct[1].similarity(data, texts).tolist()
    assert [row for row in got["scores"]] == [pytest.approx(row, **APPROX) for row in expected]
    labels = ["cat", "person", "cup", "rocket"]
    got = client.post("/v1/classify", json={"image": b64(photos[2]), "labels": labels, "rerank": True}).json()
    want = direct[1].classify(data[2], labels, rerank=True)
    assert [r["label"] for r in got["labels"]] == [r["label"] for r in want]
    for ours, theirs in zip(got["labels"], want):
        for name in ("score", "probability", "match"):
            assert ours[name] == pytest.approx(theirs[name], **APPROX)


def test_embed_equals_the_api(serve, direct, photos):
    client = serve()
    texts = ["a cat", "an astronaut floating above the earth in a white suit"]
    got = client.post("/v1/embed", json={"images": [b64(photos[1])], "texts": texts}).json()
    images = direct[1].embed_images([photos[1].read_bytes()])
    assert set(got["images"]) == set(images) == {"image_embeds", "image_embeds_proj"}
    for name, value in images.items():
        assert got["images"][name][0][0] == pytest.approx(value[0, 0].tolist(), **APPROX)
    text = direct[1].embed_texts(texts)
    assert got["texts"]["attention_mask"] == text["attention_mask"].tolist()
    assert got["texts"]["text_embeds_proj"][1] == pytest.approx(
        text["text_embeds_proj"][1].tolist(), **APPROX
    )
    assert len(got["texts"]["text_embeds"][0]) == text["text_embeds"].shape[1]
    only_texts = client.post("/v1/embed", json={"texts": ["a cat"]}).json()
    assert only_texts["images"] is None
    assert (
        only_texts["texts"]["attention_mask"] == direct[1].embed_texts(["a cat"])["attention_mask"].tolist()
    )


def test_multipart_and_data_uris_equal_json(serve, photos):
    client = serve()
    json_body = {"images": [b64(p) for p in photos[:2]], "max_new_tokens": 6, "prompt": "a"}
    expected = client.post("/v1/caption", json=json_body).json()
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in photos[:2]]
    got = client.post("/v1/caption", files=files, data={"max_new_tokens": "6", "prompt": "a"})
    assert got.json() == expected
    uris = [f"data:image/jpeg;base64,{b64(p)}" for p in photos[:2]]
    assert client.post("/v1/caption", json={**json_body, "images": uris}).json() == expected
    files = [("images", ("a.jpg", photos[0].read_bytes(), "image/jpeg"))]
    asked = client.post("/v1/ask", files=files, data={"questions": ["what?", "who?"]})
    assert (
        asked.json()
        == client.post("/v1/ask", json={"images": [b64(photos[0])], "questions": ["what?", "who?"]}).json()
    )
    one = client.post(
        "/v1/classify", files=[("image", ("a.jpg", photos[0].read_bytes()))], data={"labels": ["a", "b"]}
    )
    assert one.status_code == 200 and len(one.json()["labels"]) == 2


def test_a_follow_up_question_skips_the_vision_tower(serve, direct, photos):
    client = serve()
    image = b64(photos[3])
    first = client.post("/v1/ask", json={"images": [image], "questions": ["what?"]}).json()
    second = client.post("/v1/ask", json={"images": [image], "questions": ["why?"]}).json()
    assert first["answers"] + second["answers"] == direct[0].ask([photos[3].read_bytes()], ["what?", "why?"])
    text = client.get("/metrics").text
    assert metric(text, "blip2_image_cache_total", model="model", result="miss") == 1
    assert metric(text, "blip2_image_cache_total", model="model", result="hit") == 1


def test_probes_metrics_and_docs(serve, photos):
    client = serve()
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    client.post("/v1/caption", json={"images": [b64(photos[0])], "max_new_tokens": 3})
    client.post("/v1/caption", json={"images": ["not base64!"]})
    text = client.get("/metrics").text
    assert metric(text, "blip2_requests_total", route="/v1/caption", status="200") == 1
    assert metric(text, "blip2_requests_total", route="/v1/caption", status="422") == 1
    assert metric(text, "blip2_errors_total", route="/v1/caption", type="invalid_request") == 1
    assert metric(text, "blip2_request_duration_seconds_count", route="/v1/caption") == 2
    assert metric(text, "blip2_batch_size_count", task="caption") == 1
    assert metric(text, "blip2_queue_depth", model="model") == 0
    spec = client.get("/openapi.json").json()
    assert {"/v1/caption", "/v1/ask", "/v1/match", "/v1/similarity", "/v1/embed", "/v1/classify"} <= set(
        spec["paths"]
    )
    body = spec["paths"]["/v1/caption"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "max_new_tokens" in body["application/json"]["schema"]["properties"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "openapi.json" in docs.text
    assert "http://" not in docs.text and "https://" not in docs.text  # nothing loaded from elsewhere


def test_the_image_size_is_what_the_model_sees(serve, direct, tmp_path):
    """A large PNG is resized once on arrival; the API given the original bytes says the same."""
    import numpy as np

    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (300, 410, 3), dtype=np.uint8)).save(path)
    client = serve()
    got = client.post("/v1/caption", json={"images": [b64(path)], "num_beams": 2}).json()
    assert got["captions"] == direct[0].caption([path.read_bytes()], num_beams=2)
