"""The search index: `Index` (index.py) over a store of rows and fp16 vectors (store.py), exact BLIP-2 scoring
(exact.py) and an ANN stage for large collections (ann.py). See `Index` for the API."""

from .adding import AddReport
from .index import Hit, Index, fingerprint
from .store import Where

__all__ = ["AddReport", "Hit", "Index", "Where", "fingerprint"]
