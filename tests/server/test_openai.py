"""POST /v1/chat/completions against the Python API on the same inputs: the conversation's mapping to one
BLIP-2 prompt (checked against the prompt written out by hand), its options, its errors; and the `openai`
client talking to a live server."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from service_helpers import b64, live_server, metric

import blip2

ASK = dict(num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0)  # Blip2.ask's defaults


def image_part(path) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + b64(path)}}


def user(*parts) -> dict:
    return {
        "role": "user",
        "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts],
    }


def chat(client, messages, **options):
    got = client.post("/v1/chat/completions", json={"model": "blip2", "messages": messages, **options})
    assert got.status_code == 200, got.text
    return got.json()


def test_a_question_is_ask_and_no_text_is_caption(serve, direct, photos):
    client = serve()
    image = photos[0].read_bytes()
    got = chat(client, [user(image_part(photos[0]), "what is in the picture?")])
    assert got["object"] == "chat.completion" and got["id"].startswith("chatcmpl-")
    assert got["model"] == client.service.models.model.name and isinstance(got["created"], int)
    (choice,) = got["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == direct[0].ask(image, "what is in the picture?")
    assert choice["finish_reason"] in ("stop", "length")
    usage = got["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    got = chat(client, [user(image_part(photos[0]), "what is it?")], temperature=0, max_tokens=4)
    assert got["choices"][0]["message"]["content"] == direct[0].ask(
        image, "what is it?", num_beams=1, max_new_tokens=4
    )
    assert got["choices"][0]["finish_reason"] == "length"  # random tiny weights never stop early
    got = chat(client, [user(image_part(photos[0]))])
    assert got["choices"][0]["message"]["content"] == direct[0].caption(image)
    got = chat(client, [{"role": "user", "content": [image_part(photos[0])]}], temperature=0, max_tokens=6)
    assert got["choices"][0]["message"]["content"] == direct[0].caption(image, num_beams=1, max_new_tokens=6)


def test_earlier_turns_are_prepended_and_the_last_image_is_used(serve, direct, photos):
    client = serve()
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        user(image_part(photos[1]), "what is it?"),
        {"role": "assistant", "content": "a cup"},
        user(image_part(photos[0]), "what colour is it?"),
    ]
    got = chat(client, messages)
    prompt = "Question: what is it? Answer: a cup Question: what colour is it? Answer:"  # OPT's template
    want = direct[0].caption(photos[0].read_bytes(), prompt, **ASK)
    assert got["choices"][0]["message"]["content"] == want
    assert chat(client, messages[1:])["choices"] == got["choices"]  # the system message is ignored


def test_temperature_samples_and_n_gives_choices(serve, direct, photos):
    client = serve()
    got = chat(client, [user(image_part(photos[2]), "what?")], temperature=0.7, seed=3, n=2, max_tokens=5)
    want = direct[0].ask(
        photos[2].read_bytes(),
        "what?",
        do_sample=True,
        temperature=0.7,
        seed=3,
        num_return_sequences=2,
        max_new_tokens=5,
    )
    assert [c["message"]["content"] for c in got["choices"]] == want
    assert [c["index"] for c in got["choices"]] == [0, 1]


@pytest.mark.parametrize(
    "messages, options, field",
    [
        (
            [user({"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/a.jpg"}}, "what?")],
            {},
            "image_url.url",
        ),
        ([user("what?")], {}, "no image_url part"),
        (
            [user("{IMAGE}", "what?"), {"role": "assistant", "content": "x"}],
            {},
            "the last message must be the user's",
        ),
        ([user("{IMAGE}", "what?")], {"stop": ["\n"]}, "stop"),
        ([user("{IMAGE}", "what?")], {"max_tokens": 100000}, "max_tokens"),
        ([user("{IMAGE}", "what?")], {"temperature": -1}, "temperature"),
        ([{"role": "tool", "content": "x"}], {}, "messages[0].role"),
        ([], {}, "messages"),
    ],
)
def test_bad_chats_are_422_naming_the_field(serve, photos, messages, options, field):
    client = serve(match=False)
    for message in messages:
        if isinstance(message["content"], list):
            message["content"] = [
                image_part(photos[0]) if p.get("text") == "{IMAGE}" else p for p in message["content"]
            ]
    got = client.post("/v1/chat/completions", json={"messages": messages, **options})
    assert got.status_code == 422, got.text
    assert field in got.json()["error"]["message"]


def test_the_openai_client_talks_to_a_live_server(serve, direct, photos):
    openai = pytest.importorskip("openai")
    client = serve(match=False, api_key="secret")
    with live_server(client.app) as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="secret", max_retries=0)
        got = api.chat.completions.create(
            model="anything",
            messages=[user(image_part(photos[3]), "what is it?")],
            temperature=0,
            max_tokens=5,
        )
        assert got.choices[0].message.content == direct[0].ask(
            photos[3].read_bytes(), "what is it?", num_beams=1, max_new_tokens=5
        )
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="x", messages=[user(image_part(photos[3]), "what?")])
        with pytest.raises(openai.UnprocessableEntityError):
            api.chat.completions.create(model="x", messages=[user("no image")])


def test_concurrent_chats_share_model_calls(checkpoints, direct, photos):
    import httpx

    from blip2.server.app import create_app
    from blip2.server.service import Models
    from blip2.server.settings import Settings

    app = create_app(
        Settings(max_batch=8, max_wait_ms=1000), Models(blip2.load(checkpoints["opt"], device="cpu"))
    )
    questions = ["what is it?", "where is it?", "how many?", "what colour?"]
    bodies = [
        {"messages": [user(image_part(photos[i]), questions[i])], "temperature": 0, "max_tokens": 5}
        for i in range(4)
    ]
    with live_server(app) as url, ThreadPoolExecutor(4) as pool:
        responses = list(
            pool.map(lambda body: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60), bodies)
        )
        text = httpx.get(f"{url}/metrics").text
    assert metric(text, "blip2_batch_size_sum", task="caption") == 4
    assert metric(text, "blip2_model_calls_total", task="caption") < 4  # merged
    for i, response in enumerate(responses):
        want = direct[0].ask(photos[i].read_bytes(), questions[i], num_beams=1, max_new_tokens=5)
        assert response.json()["choices"][0]["message"]["content"] == want
