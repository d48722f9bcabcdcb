"""What a deployment of the service configures: where it listens, who may call it, its limits, its batching."""

from __future__ import annotations

import dataclasses

from ..errors import InputError


@dataclasses.dataclass(frozen=True)
class Settings:
    """The service's settings; `blip2 serve` fills them from its options. Every limit is checked on each
    request and answered with a 4xx JSON error naming it (see `errors.py`)."""

    host: str = "127.0.0.1"  # loopback unless told otherwise: put a proxy in front to expose it
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>` (or `X-API-Key`)
    max_batch: int = 16  # requests merged into one call of the API
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for others
    max_queue: int = 256  # requests waiting per model; beyond, 503 with Retry-After
    max_upload_bytes: int = 20 * 1024**2  # a request body (all its images together)
    max_pixels: int = 40_000_000  # one image, width x height, checked before it is decoded
    max_prompt_chars: int = 4000  # one text: prompt, question, template, label
    max_new_tokens: int = 256  # the most a request may ask for; a task default above it is lowered to it
    max_inputs: int = 64  # images, questions, texts or labels in one request (each list)
    request_timeout_s: float = 60.0  # from arrival to answer; beyond, 504
    # Vision-tower outputs kept by image content (LRU); 0 turns the cache off. An entry is (257, 1408) values
    # for ViT-g: 0.7 MiB in float16, so the default holds about 180 MiB on the model's device.
    image_cache: int = 256
    index: str | None = None  # a search index folder (`blip2 index add`): POST /v1/search, GET /v1/thumbnail

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("host", "api_key", "index"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InputError(f"server setting {field.name} must be a number >= 0, got {value!r}")
        for name in ("max_batch", "max_queue", "max_upload_bytes", "max_pixels", "max_prompt_chars"):
            if getattr(self, name) < 1:
                raise InputError(f"server setting {name} must be >= 1, got {getattr(self, name)!r}")
        if not self.request_timeout_s > 0:
            raise InputError(f"server setting request_timeout_s must be > 0, got {self.request_timeout_s!r}")
        if self.api_key is not None and not self.api_key:
            raise InputError("the API key is empty")
