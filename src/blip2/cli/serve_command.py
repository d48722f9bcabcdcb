"""`blip2 serve`: the HTTP service (blip2.server) under uvicorn. fastapi and uvicorn (the `server` extra) are
imported when the command runs, so that `blip2 --help` stays fast and works without them."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import click

from ..server.settings import Settings
from .options import DEFAULT_MODEL, TEXT, _check_device, _check_dtype

# The service's own defaults (settings.py imports neither fastapi nor torch).
DEFAULTS = {field.name: field.default for field in dataclasses.fields(Settings)}
LOOPBACK = ("127.0.0.1", "::1", "localhost")
# After SIGTERM, in-flight requests get this long beyond the request timeout to finish.
SHUTDOWN_GRACE_S = 5.0


# (setting, flag, type, help) of the options that fill `Settings` (defaults: the settings' own)
SETTING_OPTIONS = [
    (
        "host",
        "--host",
        TEXT,
        "Address to bind; 127.0.0.1 serves this machine only (use a proxy to expose it).",
    ),
    ("port", "--port", click.IntRange(0, 65535), "Port to bind."),
    ("max_batch", "--max-batch", click.IntRange(min=1), "Most requests merged into one model call."),
    (
        "max_wait_ms",
        "--max-wait-ms",
        click.FloatRange(min=0),
        "Most time a request waits for others to batch with.",
    ),
    (
        "max_queue",
        "--max-queue",
        click.IntRange(min=1),
        "Requests waiting per model; beyond, 503 + Retry-After.",
    ),
    ("max_upload_bytes", "--max-upload-bytes", click.IntRange(min=1), "Largest request body (413)."),
    ("max_pixels", "--max-pixels", click.IntRange(min=1), "Largest image, width x height (413)."),
    ("max_prompt_chars", "--max-prompt-chars", click.IntRange(min=1), "Longest text field (422)."),
    (
        "max_new_tokens",
        "--max-new-tokens",
        click.IntRange(min=1),
        "Most new tokens a request may ask for (422).",
    ),
    ("max_inputs", "--max-inputs", click.IntRange(min=1), "Most images / texts in one request (413)."),
    (
        "request_timeout_s",
        "--request-timeout",
        click.FloatRange(min=0, min_open=True),
        "Seconds per request (504).",
    ),
    ("image_cache", "--image-cache", click.IntRange(min=0), "Encoded images kept by content (0: none)."),
]


def _setting_options(func):
    for name, flag, kind, help in reversed(SETTING_OPTIONS):
        func = click.option(flag, name, type=kind, default=DEFAULTS[name], show_default=True, help=help)(func)
    return func


@click.command("serve")
@click.option(
    "--model",
    "-m",
    envvar="BLIP2_MODEL",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Checkpoint for caption and ask (directory or Hub repo id; env BLIP2_MODEL).",
)
@click.option(
    "--match-model",
    envvar="BLIP2_MATCH_MODEL",
    default=None,
    help="Retrieval checkpoint for match, similarity, classify and embed (env BLIP2_MATCH_MODEL); "
    "without it they use --model.",
)
@click.option(
    "--device",
    default=None,
    callback=_check_device,
    help="cpu, cuda, cuda:1 ... (default: cuda if available).",
)
@click.option(
    "--index",
    "index",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="A search index (blip2 index add) made with the match model: POST /v1/search, GET /v1/thumbnail.",
)
@click.option("--dtype", default=None, callback=_check_dtype, help="float32, float16 or bfloat16.")
@click.option(
    "--quantize",
    type=click.Choice(["int8", "int4"], case_sensitive=False),
    default=None,
    help="Weight-only quantization of the language model.",
)
@click.option(
    "--api-key-env",
    metavar="NAME",
    default=None,
    help="Require the API key held in environment variable NAME on /v1/* (Authorization: Bearer <key>).",
)
@_setting_options
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: one process (uvicorn). ray: a Ray Serve deployment, one model replica per GPU, on the "
    "cluster at RAY_ADDRESS or a local one (pip install 'blip2[ray]').",
)
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    default=None,
    help="With --engine ray: model replicas (default: one per GPU of the cluster, or 1).",
)
@click.option(
    "--num-gpus-per-replica",
    type=click.FloatRange(min=0),
    default=None,
    help="With --engine ray: GPUs each replica reserves (default: 1 when the cluster has GPUs, else 0).",
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
def serve(
    model,
    match_model,
    device,
    index,
    dtype,
    quantize,
    api_key_env,
    engine,
    replicas,
    num_gpus_per_replica,
    log_level,
    **settings,
):
    """Serve the models over HTTP: POST /v1/caption, /v1/ask, /v1/match, /v1/similarity, /v1/embed,
    /v1/classify, /v1/search (JSON with base64 images, or multipart uploads); GET /v1/info, /healthz,
    /readyz, /metrics, /docs.

    The port opens at once and /readyz answers 503 until the models are loaded. Concurrent requests are
    batched into shared model calls. SIGTERM (or Ctrl-C) stops taking connections, lets the requests in
    flight finish, then exits. `--engine ray` runs the same service as a Ray Serve deployment, one model
    replica per GPU, on the cluster at RAY_ADDRESS (or a local Ray). Example:

    \b
        blip2 serve --model Salesforce/blip2-opt-2.7b --match-model Salesforce/blip2-itm-vit-g
        curl -s localhost:8000/v1/caption -F images=@photo.jpg
    """
    try:
        import uvicorn

        from ..server.app import create_app
    except ImportError as e:
        raise click.ClickException(
            f"blip2 serve needs the server extra: pip install 'blip2[server]' ({e})"
        ) from None

    if engine == "local" and (replicas, num_gpus_per_replica) != (None, None):
        raise click.UsageError("--replicas and --num-gpus-per-replica need --engine ray")
    config = Settings(**settings, api_key=_api_key(api_key_env), index=index)
    load = functools.partial(load_models, model, match_model, device, dtype, quantize)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
    if config.api_key is None and config.host not in LOOPBACK:
        logging.getLogger("blip2.server").warning(
            "serving on %s without an API key: anyone who can reach it may use it (see --api-key-env)",
            config.host,
        )
    if engine == "ray":
        return _serve_on_ray(config, load, replicas, num_gpus_per_replica)
    app = create_app(config, load)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=log_level,
            timeout_graceful_shutdown=int(config.request_timeout_s + SHUTDOWN_GRACE_S),
        )
    )
    service = app.state.service
    service.on_load_error = lambda error: setattr(server, "should_exit", True)
    server.run()
    if service.load_error is not None:
        raise service.load_error  # blip2's main turns it into one line and an exit code
    if not server.started:
        raise click.ClickException(f"could not serve on {config.host}:{config.port} (see the log above)")


def load_models(model, match_model, device, dtype, quantize):
    """The service's models (blip2.server.service.Models) loaded from the command's options; module level so
    that Ray can ship it to its replicas."""
    from ..server.service import Models
    from ..tasks.api import load as load_checkpoint

    main = load_checkpoint(model, device=device, dtype=dtype, quantize=quantize)
    matcher = load_checkpoint(match_model, device=device, dtype=dtype) if match_model else None
    return Models(main, matcher)


def _serve_on_ray(config: Settings, load, replicas: int | None, gpus_per_replica: float | None) -> None:
    """The service on Ray Serve until SIGTERM or Ctrl-C; a one-line error when Ray is not installed."""
    from ..server import ray_serve

    try:
        ray_serve.import_ray()
    except ImportError as e:
        raise click.ClickException(str(e)) from None
    ray_serve.run(config, load, replicas, gpus_per_replica)


def _api_key(env_name: str | None) -> str | None:
    """The API key from environment variable `env_name`; a usage error when it is unset or empty."""
    if env_name is None:
        return None
    key = os.environ.get(env_name, "")
    if not key:
        raise click.BadParameter(
            f"environment variable {env_name} is not set or empty", param_hint="--api-key-env"
        )
    return key
