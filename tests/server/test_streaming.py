"""`stream: true` on /v1/caption, /v1/ask and /v1/chat/completions: the streamed pieces concatenate to the
non-streamed response (itself equal to the Python API); greedy and sampling stream token by token, beam
search in one piece; multi-byte characters are never split; errors before the first event are plain JSON."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from service_helpers import b64, live_server
from test_openai import image_part, user


def events(response) -> list[tuple[str | None, str]]:
    """(event name, data) of each server-sent event of a response body."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    out = []
    for frame in response.text.split("\n\n"):
        if not frame:
            continue
        name, data = None, ""
        for line in frame.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data = value
        out.append((name, data))
    return out


def streamed(response) -> tuple[dict[int, list[str]], dict]:
    """The deltas of each row, and the `done` event's body."""
    pieces: dict[int, list[str]] = {}
    done = None
    for name, data in events(response):
        if name == "done":
            done = json.loads(data)
        else:
            assert name is None, data
            delta = json.loads(data)
            pieces.setdefault(delta["index"], []).append(delta["text"])
    assert done is not None
    return pieces, done


def test_greedy_caption_streams_token_by_token(serve, direct, photos):
    client = serve(match=False)
    body = {"images": [b64(photos[0])], "num_beams": 1, "max_new_tokens": 12}
    pieces, done = streamed(client.post("/v1/caption", json={**body, "stream": True}))
    want = direct[0].caption([photos[0].read_bytes()], num_beams=1, max_new_tokens=12)
    assert done == client.post("/v1/caption", json=body).json() == {"captions": want}
    assert "".join(pieces[0]) == want[0]
    assert len(pieces[0]) > 3  # one event per token (random tiny weights: no early end)


def test_sampled_answers_stream_each_sequence(serve, direct, photos):
    client = serve(match=False)
    options = {
        "do_sample": True,
        "temperature": 0.8,
        "seed": 7,
        "num_return_sequences": 2,
        "max_new_tokens": 6,
    }
    body = {"images": [b64(photos[1])], "questions": "what is it?", **options}
    pieces, done = streamed(client.post("/v1/ask", json={**body, "stream": True}))
    want = direct[0].ask([photos[1].read_bytes()], ["what is it?"], **options)
    assert done == {"answers": want}
    assert ["".join(pieces[0]), "".join(pieces[1])] == want[0]


def test_beam_search_streams_its_text_in_one_piece(serve, direct, photos):
    client = serve(match=False)
    pieces, done = streamed(client.post("/v1/caption", json={"images": [b64(photos[2])], "stream": True}))
    want = direct[0].caption([photos[2].read_bytes()])
    assert done == {"captions": want} and pieces == {0: want}


def test_errors_before_the_first_event_are_json(serve, photos):
    client = serve(match=False)
    got = client.post("/v1/caption", json={"images": [b64(photos[0])] * 2, "stream": True})
    assert got.status_code == 422 and "stream" in got.json()["error"]["message"]
    got = client.post("/v1/ask", json={"images": [b64(photos[0])], "questions": ["a", "b"], "stream": True})
    assert got.status_code == 422
    long = "word " * 3000
    got = client.post("/v1/caption", json={"images": [b64(photos[0])], "prompt": long[:3999], "stream": True})
    assert got.status_code == 422 and got.headers["content-type"] == "application/json", got.text


class Direct:
    def call_soon_threadsafe(self, function, *args):
        function(*args)


def test_multibyte_characters_are_never_split(direct):
    from blip2.server.streaming import TokenStream

    text = direct[0].text
    sentence = "café 日本語 🙂 naïve"
    ids = text.tokenizer.encode(sentence, add_special_tokens=False).ids
    # byte-level BPE: some prefixes end inside a character, where decoding gives U+FFFD
    assert any(text.decode(ids[:i]).endswith("\ufffd") for i in range(1, len(ids)))
    stream = TokenStream(text, Direct())  # type: ignore[arg-type]
    for token in ids:
        stream.on_step(torch.tensor([token]))
    pieces = []
    while not stream._queue.empty():
        pieces.append(stream._queue.get_nowait()[1])
    assert all("\ufffd" not in piece for piece in pieces)
    final = text.decode(ids)
    assert "".join(pieces) + "".join(rest for _, rest in stream.finish([final])) == final == sentence


def test_chat_streams_openai_chunks(serve, direct, photos):
    client = serve(match=False)
    messages = [user(image_part(photos[3]), "what is it?")]
    body = {"model": "m", "messages": messages, "temperature": 0, "max_tokens": 8}
    whole = client.post("/v1/chat/completions", json=body).json()
    got = events(
        client.post(
            "/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
        )
    )
    assert got[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in got[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == whole["choices"][0]["message"]["content"]
    assert content == direct[0].ask(photos[3].read_bytes(), "what is it?", num_beams=1, max_new_tokens=8)
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_the_openai_client_streams(serve, direct, photos):
    openai = pytest.importorskip("openai")
    client = serve(match=False)
    with live_server(client.app) as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        messages = [user(image_part(photos[0]))]
        stream = api.chat.completions.create(
            model="m", messages=messages, temperature=0, max_tokens=9, stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == direct[0].caption(photos[0].read_bytes(), num_beams=1, max_new_tokens=9)


def test_a_client_that_leaves_stops_the_decoding(direct):
    from blip2.server.streaming import StreamCancelled, TokenStream

    stream = TokenStream(direct[0].text, asyncio.new_event_loop())
    stream.cancelled = True
    with pytest.raises(StreamCancelled):
        stream.on_step(torch.tensor([5]))
