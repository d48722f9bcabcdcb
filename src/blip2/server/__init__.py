"""The HTTP service (`blip2 serve`): a FastAPI application over the task API, one model worker thread per
loaded checkpoint behind a dynamic batcher, limits and JSON errors for every failure, Prometheus metrics.

fastapi, uvicorn and python-multipart are the `server` extra: nothing here is imported by `import blip2`.

- `settings.py` what a deployment configures (limits, batching, the API key);
- `schemas.py` the request and response bodies; `images.py` images from requests (never from a URL);
- `tasks.py` each task as one call of the `Blip2` API over many requests, and how results go back;
- `batching.py` the queue and the worker thread that owns the model; `cache.py` encoded images by content;
- `limits.py` request bodies and fields against the limits; `errors.py` the JSON error body;
- `metrics.py` Prometheus text; `app.py` the routes (`create_app`); `docs.py` an offline /docs page.
"""
