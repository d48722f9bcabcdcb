"""blip2: fast, exact BLIP-2 inference in plain PyTorch."""

__version__ = "0.1.0"
