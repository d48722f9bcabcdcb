"""The dynamic batcher (with a recording fake model), the encoded-image cache, error isolation in merged
calls, and concurrent requests against a live server: fewer model calls than requests, each answer equal
to the direct API call."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

import pytest
import torch
from service_helpers import b64, live_server, metric

import blip2
from blip2.errors import InputError
from blip2.server.batching import Batcher, QueueFull
from blip2.server.cache import EncodedImages
from blip2.server.tasks import TASKS, AskCall, CaptionCall, PairCall, execute


class Recorder:
    """A fake `execute`: records each call's task and items, answers each item with (task, item)."""

    def __init__(self, gate: threading.Event | None = None):
        self.calls: list[tuple[str, list]] = []
        self.gate = gate

    def __call__(self, task: str, calls: list) -> list:
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append((task, list(calls)))
        return [ValueError(call) if call == "bad" else (task, call) for call in calls]


def _batcher(execute, **kwargs) -> Batcher:
    settings = dict(max_batch=4, max_wait_s=0.2, max_queue=100) | kwargs
    batcher = Batcher(execute, **settings)
    batcher.start()
    return batcher


def test_same_key_merges_up_to_max_batch_others_wait_their_turn():
    gate = threading.Event()
    record = Recorder(gate)
    batcher = _batcher(record)
    first = batcher.submit("t", "k", 0)  # taken at once; the worker then waits at the gate
    time.sleep(0.3)
    futures = [batcher.submit("t", "k", i) for i in range(1, 7)]
    other = batcher.submit("t", "other", "x")
    solo = [batcher.submit("t", None, "a"), batcher.submit("t", None, "b")]
    gate.set()
    assert [f.result(10) for f in [first, *futures, other, *solo]] == [
        ("t", i) for i in [0, 1, 2, 3, 4, 5, 6, "x", "a", "b"]
    ]
    batcher.close()
    assert [items for _, items in record.calls] == [[0], [1, 2, 3, 4], [5, 6], ["x"], ["a"], ["b"]]


def test_a_lone_request_waits_at_most_max_wait():
    record = Recorder()
    batcher = _batcher(record, max_wait_s=0.05)
    started = time.monotonic()
    assert batcher.submit("t", "k", 1).result(10) == ("t", 1)
    assert time.monotonic() - started < 5  # not held for a batch that never fills
    batcher.close()


def test_errors_are_per_call_and_the_queue_is_bounded():
    gate = threading.Event()
    batcher = _batcher(Recorder(gate), max_queue=2)
    running = batcher.submit("t", None, "bad")
    time.sleep(0.2)  # taken by the worker, which waits at the gate
    queued = [batcher.submit("t", None, "q1"), batcher.submit("t", None, "q2")]
    with pytest.raises(QueueFull):
        batcher.submit("t", None, "q3")
    queued[0].cancel()  # a request that timed out: never run
    gate.set()
    with pytest.raises(ValueError):
        running.result(10)
    with pytest.raises(CancelledError):
        queued[0].result(10)
    assert queued[1].result(10) == ("t", "q2")
    batcher.close()


def test_close_runs_what_is_queued_then_refuses():
    gate = threading.Event()
    record = Recorder(gate)
    batcher = _batcher(record, max_wait_s=30)
    futures = [batcher.submit("t", "k", i) for i in range(3)]
    closing = threading.Thread(target=batcher.close)
    closing.start()
    gate.set()
    closing.join(10)
    assert [f.result(0) for f in futures] == [("t", 0), ("t", 1), ("t", 2)]  # not held for max_wait
    with pytest.raises(QueueFull):
        batcher.submit("t", "k", 9)


def test_image_cache_encodes_each_image_once_and_evicts_the_oldest():
    def tower(pixels):  # (B, 3, 2, 2) -> (B, 1, 4): a stand-in for the vision tower
        return pixels.flatten(1)[:, :4].unsqueeze(1) * 2

    encoded = []

    def encode(pixels):
        encoded.append(len(pixels))
        return tower(pixels)

    cache = EncodedImages(encode, capacity=2)
    a, b, c = (torch.full((3, 2, 2), float(v)) for v in (1, 2, 3))
    assert torch.equal(cache(torch.stack([a, b, a])), tower(torch.stack([a, b, a])))
    assert encoded == [2]  # a once
    assert torch.equal(cache(torch.stack([b])), tower(torch.stack([b])))
    assert encoded == [2]  # b was cached
    cache(torch.stack([c]))  # evicts a, the least recently used
    assert encoded == [2, 1] and len(cache) == 2
    assert torch.equal(cache(torch.stack([a, b])), tower(torch.stack([a, b])))
    assert encoded == [2, 1, 1]  # a again, b still cached


def test_a_failing_call_in_a_merged_batch_fails_alone(direct, photos):
    model = direct[0]
    options = {"num_beams": 1, "max_new_tokens": 5}
    good = CaptionCall([photos[0].read_bytes()], "a", options)
    bad = CaptionCall([photos[1].read_bytes()], " ".join(["word"] * 300), options)
    results = execute(model, TASKS["caption"], [good, bad, good])
    assert results[0] == results[2] == {"captions": model.caption([photos[0].read_bytes()], "a", **options)}
    assert isinstance(results[1], InputError)
    asked = execute(model, TASKS["ask"], [AskCall([photos[0].read_bytes()], ["what?", "who?"], None, {})])
    assert asked == [{"answers": model.ask([photos[0].read_bytes()], ["what?", "who?"])}]
    mismatched = execute(direct[1], TASKS["match"], [PairCall([photos[0].read_bytes()] * 2, ["a", "b", "c"])])
    assert isinstance(mismatched[0], InputError)


def _counting(model, name: str) -> list:
    calls = []
    method = getattr(model, name)

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return method(*args, **kwargs)

    setattr(model, name, counted)
    return calls


@pytest.mark.parametrize("task", ["caption", "ask", "match", "similarity", "embed"])
def test_concurrent_requests_share_model_calls(checkpoints, retrieval_checkpoints, direct, photos, task):
    import httpx

    from blip2.server.app import create_app
    from blip2.server.service import Models
    from blip2.server.settings import Settings

    model = blip2.load(checkpoints["opt"], device="cpu")
    match_model = blip2.load(retrieval_checkpoints["plain"], device="cpu")
    served = model if task in ("caption", "ask") else match_model
    method = {"caption": "caption", "ask": "ask", "match": "match", "similarity": "similarity"}
    calls = _counting(served, method.get(task, "embed_images"))
    app = create_app(Settings(max_batch=8, max_wait_ms=1000), Models(model, match_model))
    requests = [_request(task, photos, i) for i in range(8)]
    with live_server(app) as url, ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda body: httpx.post(f"{url}/v1/{task}", json=body[0], timeout=60), requests)
        )
        text = httpx.get(f"{url}/metrics").text
    assert [r.status_code for r in responses] == [200] * 8, [r.text for r in responses]
    assert 1 <= len(calls) < 8  # merged: fewer calls of the API than requests
    assert metric(text, "blip2_model_calls_total", task=task) == len(calls)
    assert metric(text, "blip2_batch_size_sum", task=task) == 8
    for response, (_, expected) in zip(responses, requests):
        _assert_same(response.json(), expected(direct))


def _request(task: str, photos, i: int):
    """(JSON body, direct(models) -> the expected body) for request i: inputs vary with i."""
    image = photos[i % len(photos)]
    data = image.read_bytes()
    texts = ["a cat", "an astronaut in space", "coffee"][: 1 + i % 3]
    if task == "caption":
        return {"images": [b64(image)], "num_beams": 2}, lambda d: {
            "captions": d[0].caption([data], num_beams=2)
        }
    if task == "ask":
        return (
            {"images": [b64(image)], "questions": texts},
            lambda d: {"answers": d[0].ask([data], texts)},
        )
    if task == "match":
        return {"images": [b64(image)], "texts": texts}, lambda d: {
            "probabilities": d[1].match([data], texts)
        }
    if task == "similarity":
        return (
            {"images": [b64(image)], "texts": texts},
            lambda d: {"scores": d[1].similarity([data], texts).tolist()},
        )
    return (
        {"images": [b64(image)], "texts": texts},
        lambda d: {
            "images": {k: v.tolist() for k, v in d[1].embed_images([data]).items()},
            "texts": {k: v.tolist() for k, v in d[1].embed_texts(texts).items()},
        },
    )


def _assert_same(got, expected):
    """Equal structure and strings; numbers within float32 noise (a batch sums in another order)."""
    if isinstance(expected, dict):
        assert set(got) == set(expected)
        for key in expected:
            _assert_same(got[key], expected[key])
    elif isinstance(expected, list):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            _assert_same(g, e)
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    else:
        assert got == expected


def test_bad_requests_in_a_concurrent_batch_fail_alone(checkpoints, direct, photos):
    import httpx

    from blip2.server.app import create_app
    from blip2.server.service import Models
    from blip2.server.settings import Settings

    app = create_app(
        Settings(max_batch=8, max_wait_ms=1000), Models(blip2.load(checkpoints["opt"], device="cpu"))
    )
    options = {"num_beams": 1, "max_new_tokens": 6, "prompt": "a"}
    bodies = [{"images": [b64(p)], **options} for p in photos[:4]]
    bodies.insert(
        1, {**bodies[0], "prompt": " ".join(["word"] * 300)}
    )  # too many tokens: fails in the merged call
    bodies.insert(3, {**bodies[0], "images": ["bm90IGFuIGltYWdl"]})  # not an image: fails on arrival
    with live_server(app) as url, ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(
            pool.map(lambda body: httpx.post(f"{url}/v1/caption", json=body, timeout=60), bodies)
        )
    assert [r.status_code for r in responses] == [200, 422, 200, 422, 200, 200]
    assert responses[1].json()["error"]["message"].startswith("input 0: the prompt is")
    assert responses[3].json()["error"]["type"] == "invalid_image"
    good = [r.json()["captions"][0] for i, r in enumerate(responses) if i not in (1, 3)]
    assert good == direct[0].caption([p.read_bytes() for p in photos[:4]], "a", num_beams=1, max_new_tokens=6)
