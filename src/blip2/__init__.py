"""blip2: fast, exact BLIP-2 inference in plain PyTorch.

import blip2
model = blip2.load("Salesforce/blip2-opt-2.7b")
model.caption("photo.jpg")
model.ask("photo.jpg", "what is the man holding?")

index = blip2.Index("photos.idx", model=blip2.load("Salesforce/blip2-itm-vit-g"))
index.add("~/Photos")
index.search(text="a dog on a beach", k=10)
"""

from .errors import Blip2Error, CheckpointError, ImageError, InputError

__version__ = "0.1.0"
__all__ = [
    "load",
    "Blip2",
    "Index",
    "Blip2Error",
    "CheckpointError",
    "ImageError",
    "InputError",
    "__version__",
]


def __getattr__(name: str):
    # torch is imported on first use, so `import blip2` (and `blip2 --help`) stays fast.
    if name in ("load", "Blip2"):
        from .tasks import api

        return getattr(api, name)
    if name == "Index":  # numpy and sqlite3 on first use too
        from .index import Index

        return Index
    raise AttributeError(f"module 'blip2' has no attribute {name!r}")
