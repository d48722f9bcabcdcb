"""The request and response bodies, as pydantic models (FastAPI's OpenAPI schema is made from them).

Request fields are those of the Python API, with its names. A field left out (or null) is not passed to
the API, so the API's default applies: the service has no defaults of its own. Images are base64 strings or
`data:` URIs in JSON, or file parts of a multipart/form-data body (then the other fields are form fields,
repeated for lists).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

IMAGES = "Images: base64 or data: URIs (JSON), or file parts named `images` (multipart). URLs are refused."


class Body(BaseModel):
    """Unknown fields are errors: a misspelt option must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")

    def given(self, *names: str) -> dict[str, Any]:
        """The fields among `names` that the request set (not null): the keyword arguments of the API call."""
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


GENERATION_OPTIONS = (
    "max_new_tokens",
    "min_new_tokens",
    "num_beams",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "length_penalty",
    "early_stopping",
    "num_return_sequences",
    "seed",
)


class Generation(Body):
    """Decoding options, as `blip2.Blip2.caption` / `ask` take them; unset ones keep the task's defaults."""

    max_new_tokens: int | None = Field(None, description="Most tokens to generate (caption 30, ask 10).")
    min_new_tokens: int | None = None
    num_beams: int | None = Field(None, description="Beam width (default 5; 1 = greedy).")
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    length_penalty: float | None = None
    early_stopping: bool | Literal["never"] | None = None
    num_return_sequences: int | None = Field(None, description="n > 1: a list of n texts per input.")
    seed: int | None = None
    stream: bool | None = Field(
        None, description="Server-sent events: the text as it is decoded (one image, one prompt)."
    )

    def options(self) -> dict[str, Any]:
        return self.given(*GENERATION_OPTIONS)


class CaptionRequest(Generation):
    images: list[str] = Field(default_factory=list, description=IMAGES)
    prompt: str | None = Field(None, description="Text the caption continues (e.g. 'a photo of').")


class AskRequest(Generation):
    images: list[str] = Field(default_factory=list, description=IMAGES)
    questions: list[str] | str = Field(
        description="One image and several questions, several images and one question, or one each pairwise."
    )
    template: str | None = Field(None, description="Prompt template, {} for the question.")


class MatchRequest(Body):
    images: list[str] = Field(default_factory=list, description=IMAGES)
    texts: list[str] | str = Field(description="Paired with the images as in `ask`.")


class SimilarityRequest(Body):
    images: list[str] = Field(default_factory=list, description=IMAGES)
    texts: list[str] | str = Field(description="Each image is scored against each text.")


class EmbedRequest(Body):
    images: list[str] = Field(default_factory=list, description=IMAGES)
    texts: list[str] | str = Field(
        default_factory=list, description="Texts to embed (retrieval checkpoints)."
    )


class ClassifyRequest(Body):
    image: str | None = Field(None, description="One image: base64 or a data: URI, or a file part `image`.")
    labels: list[str] = Field(description="The candidate labels.")
    template: str | None = Field(None, description="Prompt with {} for the label (default 'a photo of {}').")
    rerank: bool | None = None
    top_k: int | None = None
    temperature: float | None = None


class CaptionResponse(BaseModel):
    captions: list[str | list[str]] = Field(
        description="One per image (a list of n with num_return_sequences=n)."
    )


class AskResponse(BaseModel):
    answers: list[str | list[str]] = Field(description="One per (image, question) pair.")


class MatchResponse(BaseModel):
    probabilities: list[float] = Field(description="ITM probability of each (image, text) pair.")


class SimilarityResponse(BaseModel):
    scores: list[list[float]] = Field(description="ITC similarity, one row per image, one column per text.")


class EmbedResponse(BaseModel):
    images: dict[str, list] | None = Field(
        None,
        description="image_embeds (N, Q, 768), and image_embeds_proj (N, Q, 256) when the checkpoint has it.",
    )
    texts: dict[str, list] | None = Field(
        None, description="text_embeds (N, L, 768), attention_mask (N, L), text_embeds_proj (N, 256)."
    )


class Label(BaseModel):
    label: str
    score: float
    probability: float
    match: float | None = None


class ClassifyResponse(BaseModel):
    labels: list[Label] = Field(description="Best first.")


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
