"""POST /v1/chat/completions: OpenAI's chat API over BLIP-2, so OpenAI clients and tools can call it.

How a conversation becomes one BLIP-2 generation (BLIP-2 has no chat memory; this is LAVIS's way of giving
it one, as its demo does):
- the image is the last `image_url` part of the conversation (a `data:` URI or bare base64; a URL is a 422,
  never fetched); a conversation without an image is a 422;
- the last message must be the user's; its text parts (joined by a newline) are the question, put into the
  checkpoint's ask template (`Blip2.ask_prompts`: OPT "Question: {} Answer:", Flan-T5 "Question: {} Short
  answer:", InstructBLIP the question as is);
- each earlier user text followed by the assistant's reply is prepended, in order, as "<template filled
  with that text> <reply>", so that "what is it?" → "a cat" → "what colour is it?" gives the prompt
  "Question: what is it? Answer: a cat Question: what colour is it? Answer:";
- system and developer messages are ignored (BLIP-2 was not trained with them);
- a last user message with no text asks for a caption of the image (the earlier turns are then unused).

Options: `max_tokens` (or `max_completion_tokens`) is max_new_tokens; `temperature` 0 is greedy search,
> 0 sampling at that temperature (with `top_p`, `seed`); without `temperature` the task's defaults apply
(beam search, as `Blip2.ask` / `caption`); `n` > 1 is num_return_sequences. The request's `model` is not
used: the served model answers, and is named in the response. `usage` counts the prompt's tokens plus the
query tokens the image stands for, and the reply's tokens re-tokenized. Options OpenAI has and BLIP-2 does
not (stop, tools, logprobs, response_format, ...) are a 422 when set; other unknown fields are ignored.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..tasks.captioning import task_options
from .errors import invalid
from .images import from_text
from .limits import parse_body, validate
from .settings import Settings
from .streaming import TokenStream, respond, sse
from .tasks import CaptionCall, StreamCall

# OpenAI options with no BLIP-2 meaning: refused when set (a silent no-op would change what the caller gets).
UNSUPPORTED = (
    "stop",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
)


class ImageURL(BaseModel):
    url: str = Field(description="A data: URI (data:image/png;base64,...). URLs are refused, never fetched.")
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(BaseModel):
    """OpenAI's chat completion request; fields BLIP-2 cannot honour are refused (see UNSUPPORTED)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="Ignored: the served model answers.")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    seed: int | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    user: str | None = None


def check(body: ChatRequest, settings: Settings) -> None:
    """The limits and the options BLIP-2 has no meaning for (422 / 413 naming the field)."""
    extra = body.model_extra or {}
    for name in UNSUPPORTED:
        if extra.get(name) not in (None, False, [], 0):
            raise invalid(f"{name}: not supported by BLIP-2")
    if len(body.messages) > settings.max_inputs:
        raise invalid(f"messages: {len(body.messages)} given, more than the limit of {settings.max_inputs}")
    for i, message in enumerate(body.messages):
        for j, text in _texts(message):
            if len(text) > settings.max_prompt_chars:
                raise invalid(
                    f"messages[{i}].content[{j}]: {len(text)} characters, more than the limit of "
                    f"{settings.max_prompt_chars} (max_prompt_chars)"
                )
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None and asked > settings.max_new_tokens:
        raise invalid(f"max_tokens: {asked} is more than the limit of {settings.max_new_tokens}")
    if body.n is not None and body.n > settings.max_inputs:
        raise invalid(f"n: {body.n} is more than the limit of {settings.max_inputs}")


def _texts(message: ChatMessage) -> list[tuple[int, str]]:
    """(index, text) of the message's text parts (a string content is part 0)."""
    if isinstance(message.content, str):
        return [(0, message.content)]
    return [(j, part.text or "") for j, part in enumerate(message.content or []) if part.type == "text"]


def _text(message: ChatMessage) -> str:
    return "\n".join(text for _, text in _texts(message)).strip()


def last_image(body: ChatRequest) -> bytes:
    """The bytes of the conversation's last image_url part; a 422 without one, or for a URL."""
    for i in reversed(range(len(body.messages))):
        parts = body.messages[i].content
        if isinstance(parts, list):
            for j in reversed(range(len(parts))):
                part = parts[j]
                if part.type == "image_url":
                    if part.image_url is None:
                        raise invalid(f"messages[{i}].content[{j}].image_url: missing")
                    return from_text(part.image_url.url, f"messages[{i}].content[{j}].image_url.url")
    raise invalid("messages: no image_url part: BLIP-2 answers about an image (send it as a data: URI)")


def prompt_of(body: ChatRequest, ask_prompt) -> str | None:
    """The prompt the conversation maps to (see the module's docstring), or None for a caption.
    `ask_prompt(question)` fills the checkpoint's ask template."""
    talk = [m for m in body.messages if m.role in ("user", "assistant")]
    if not talk or talk[-1].role != "user":
        raise invalid("messages: the last message must be the user's")
    question = _text(talk[-1])
    if not question:
        return None
    context = []
    for earlier, reply in zip(talk[:-1], talk[1:-1]):
        if earlier.role == "user" and reply.role == "assistant" and _text(earlier):
            context.append(f"{ask_prompt(_text(earlier))} {_text(reply)}")
    return " ".join([*context, ask_prompt(question)])


def generation_of(body: ChatRequest, task: str, settings: Settings) -> dict[str, Any]:
    """The request's options as the generation options of `task` ("ask" or "caption"), all of them
    spelled out (the call runs as a caption with a prompt, which must not apply its own defaults)."""
    given: dict[str, Any] = {}
    if body.temperature == 0:
        given.update(num_beams=1, do_sample=False)
    elif body.temperature is not None:
        given.update(do_sample=True, temperature=body.temperature)
    for name, value in (
        ("max_new_tokens", body.max_completion_tokens or body.max_tokens),
        ("top_p", body.top_p),
        ("seed", body.seed),
        ("num_return_sequences", body.n if body.n and body.n > 1 else None),
    ):
        if value is not None:
            given[name] = value
    options = task_options(task, given)
    options["max_new_tokens"] = min(options["max_new_tokens"], settings.max_new_tokens)
    return options


def chat_call(body: ChatRequest, model: Any, image: Any, settings: Settings) -> CaptionCall:
    """The conversation as a caption call (batched with caption requests of the same options)."""
    prompt = prompt_of(body, lambda text: model.ask_prompts([text])[0])
    options = generation_of(body, "caption" if prompt is None else "ask", settings)
    return CaptionCall([image], prompt, options)


def completion(texts: list[str], call: CaptionCall, model: Any) -> dict[str, Any]:
    """The chat.completion response for the generated `texts` (one per choice)."""
    limit = call.options["max_new_tokens"]
    prompt_tokens = model.config.num_query_tokens + len(model.text.encode(call.prompt or ""))
    counts = [_count(model, text) for text in texts]
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "length" if count >= limit else "stop",
        }
        for i, (text, count) in enumerate(zip(texts, counts))
    ]
    return {
        **envelope("chat.completion", model),
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": sum(counts),
            "total_tokens": prompt_tokens + sum(counts),
        },
    }


def envelope(kind: str, model: Any, id: str | None = None) -> dict[str, Any]:
    return {
        "id": id or f"chatcmpl-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model.name,
    }


def _count(model: Any, text: str) -> int:
    return len(model.text.tokenizer.encode(text, add_special_tokens=False).ids)


def choices_of(result: dict[str, Any]) -> list[str]:
    """The texts of a caption call's result for one image: one, or n with num_return_sequences."""
    texts = result["captions"][0]
    return texts if isinstance(texts, list) else [texts]


async def stream_chat(service: Any, body: ChatRequest, call: CaptionCall, model: Any) -> Response:
    """The chat as OpenAI's chat.completion.chunk events: each choice's role, its content deltas, its
    finish_reason, the usage when stream_options.include_usage, then `data: [DONE]`."""
    stream = TokenStream(model.text, asyncio.get_running_loop())
    base = envelope("chat.completion.chunk", model)
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def chunk(index: int, delta: dict, finish_reason: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
        return sse({**base, "choices": [choice]})

    def fmt(kind: str, payload: Any) -> list[str]:
        if kind == "start":
            return [chunk(i, {"role": "assistant", "content": ""}) for i in range(body.n or 1)]
        if kind == "delta":
            return [chunk(payload[0], {"content": payload[1]})]
        if kind == "error":
            return [sse(payload), sse("[DONE]")]
        full = completion(choices_of(payload), call, model)
        frames = [chunk(c["index"], {}, c["finish_reason"]) for c in full["choices"]]
        if include_usage:
            frames.append(sse({**base, "choices": [], "usage": full["usage"]}))
        return [*frames, sse("[DONE]")]

    return await respond(service, StreamCall("caption", call, stream.on_step), stream, choices_of, fmt)


def add_routes(app: FastAPI) -> None:
    """POST /v1/chat/completions."""
    from .app import authorize, decode_images, with_timeout

    service = app.state.service
    settings: Settings = service.settings

    async def handle(request: Request, model: Any) -> Response:
        data, uploads = await parse_body(request, settings)
        if uploads:
            raise invalid("send the chat as JSON, its images as data: URIs in image_url parts")
        body = validate(ChatRequest, data)
        check(body, settings)
        images = await decode_images([("image_url", last_image(body))], model, settings)
        call = chat_call(body, model, images[0], settings)
        if body.stream:
            return await stream_chat(service, body, call, model)
        result = await service.run("caption", call)
        return JSONResponse(completion(choices_of(result), call, model))

    @app.post("/v1/chat/completions", summary="OpenAI-compatible chat about an image", response_model=None)
    async def chat_completions(request: Request) -> Response:
        authorize(request, settings)
        model = service.model_for("caption")
        return await with_timeout(handle(request, model), settings)
