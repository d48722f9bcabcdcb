"""The image processor settings of a checkpoint (preprocessor_config.json), bounds-checked.

Only the fields BLIP-2 preprocessing uses, with the reference `BlipImageProcessor` class defaults. The file is
hostile input like every other: a size of 100000 would allocate gigabytes on the first image and a std of 0
would divide by zero, so every value is checked on construction.
"""

from __future__ import annotations

import math
import os
import reprlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import CheckpointError, InputError
from .files import read_json

MAX_CONFIG_BYTES = 1024**2
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Bounds every value from a (possibly hostile) config file must meet: a size of 100000 would allocate
# gigabytes on the first image, a std of 0 would divide by zero. Each rule: (test, what the value must be).
MAX_EDGE = 4096
_RESAMPLE_FILTERS = sorted(int(f) for f in Image.Resampling)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a size


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "edge": (lambda v: _is_int(v) and 1 <= v <= MAX_EDGE, f"an int in [1, {MAX_EDGE}]"),
    "resample": (
        lambda v: _is_int(v) and v in _RESAMPLE_FILTERS,
        f"a PIL filter, one of {_RESAMPLE_FILTERS}",
    ),
    "flag": (lambda v: isinstance(v, bool), "true or false"),
    "positive": (lambda v: _is_finite(v) and v > 0, "a finite number > 0"),
    "finite": (_is_finite, "a finite number"),
}
_FLAGS = ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")


def _check(rule: str, field: str, value: Any) -> None:
    test, expected = _RULES[rule]
    if not test(value):
        raise InputError(f"image processor setting {field} must be {expected}, got {reprlib.repr(value)}")


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The fields of a checkpoint's preprocessor_config.json that BLIP-2 preprocessing uses.

    Defaults are the reference `BlipImageProcessor` class defaults (384x384); BLIP-2 checkpoints override
    the size (224x224) in their file. The output size is either fixed, `size` = (height, width), or
    aspect-preserving: `shortest_edge` (and optionally `longest_edge`) with `size` None. Every value is
    bounds-checked on construction (`InputError` naming the field).
    """

    size: tuple[int, int] | None = (384, 384)  # (height, width)
    shortest_edge: int | None = None
    longest_edge: int | None = None
    resample: int = int(Image.Resampling.BICUBIC)
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    # Images are always converted to RGB (the model needs 3 channels); kept for fidelity to the file.
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        if (self.size is None) == (self.shortest_edge is None):
            raise InputError("give exactly one of size=(height, width) or shortest_edge")
        if self.longest_edge is not None and self.shortest_edge is None:
            raise InputError("longest_edge needs shortest_edge")
        for key in ("image_mean", "image_std"):
            if not isinstance(getattr(self, key), tuple) or len(getattr(self, key)) != 3:
                raise InputError(f"image processor setting {key} needs one value per RGB channel")
        for rule, field, value in self._values():
            _check(rule, field, value)

    def _values(self) -> Iterator[tuple[str, str, Any]]:
        """(rule, field, value) for every setting that is present."""
        if self.size is not None:
            if not isinstance(self.size, tuple) or len(self.size) != 2:
                raise InputError(f"image processor setting size must be (height, width), got {self.size!r}")
            yield from (("edge", "size.height", self.size[0]), ("edge", "size.width", self.size[1]))
        for key in ("shortest_edge", "longest_edge"):
            if getattr(self, key) is not None:
                yield "edge", f"size.{key}", getattr(self, key)
        yield "resample", "resample", self.resample
        yield from (("flag", key, getattr(self, key)) for key in _FLAGS)
        yield "positive", "rescale_factor", self.rescale_factor
        yield from (("finite", f"image_mean[{i}]", v) for i, v in enumerate(self.image_mean))
        yield from (("positive", f"image_std[{i}]", v) for i, v in enumerate(self.image_std))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ImageProcessorConfig:
        """Build from a preprocessor_config.json dict; keys this package does not use are ignored.

        Raises `InputError` naming the field for a value out of bounds or of the wrong type.
        """
        square = config.get("default_to_square", True)
        _check("flag", "default_to_square", square)
        fields: dict[str, Any] = dict(_parse_size(config.get("size"), square))
        for key in ("resample", "rescale_factor", *_FLAGS):
            if config.get(key) is not None:
                fields[key] = config[key]
        for key in ("image_mean", "image_std"):
            if config.get(key) is not None:
                fields[key] = _per_channel(key, config[key])
        return cls(**fields)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ImageProcessorConfig:
        """Read a preprocessor_config.json file; raises `InputError` naming the file."""
        return cls._from_json(Path(path), key=None)

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike) -> ImageProcessorConfig:
        """The image settings of a checkpoint folder: its preprocessor_config.json, or else the
        "image_processor" object of the processor_config.json that newer transformers versions write.

        Raises `CheckpointError` naming the file for an unreadable, oversized, malformed or out-of-bounds one.
        """
        directory = Path(directory)
        for filename, key in (
            ("preprocessor_config.json", None),
            ("processor_config.json", "image_processor"),
        ):
            path = directory / filename
            if not os.path.lexists(path):
                continue
            try:
                return cls._from_json(path, key)
            except _NoSettings:
                continue
            except InputError as e:
                raise CheckpointError(str(e)) from e
        raise CheckpointError(f"{directory} has no preprocessor_config.json (image size, mean and std)")

    @classmethod
    def _from_json(cls, path: Path, key: str | None) -> ImageProcessorConfig:
        """Settings from the JSON object in `path` (or its member `key`); `InputError` messages name the file."""
        where = f"{path}" if key is None else f'{path} ("{key}")'
        try:
            config = read_json(path, MAX_CONFIG_BYTES)
        except CheckpointError as e:  # from_checkpoint makes it a CheckpointError again
            raise InputError(str(e)) from e
        if key is not None:
            if not config.get(key):
                raise _NoSettings
            config = config[key]
            if not isinstance(config, dict):
                raise InputError(f"{where}: image processor config is not a JSON object")
        try:
            return cls.from_dict(config)
        except InputError as e:
            raise InputError(f"{where}: {e}") from e


class _NoSettings(Exception):
    """A processor_config.json without image processor settings."""


def _per_channel(key: str, value: Any) -> tuple[Any, ...]:
    """One value for all three channels (a number or a 1-list), or a list of three."""
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if len(values) not in (1, 3):
        raise InputError(f"image processor setting {key} needs 3 values (or 1 for all), got {len(values)}")
    return values * 3 if len(values) == 1 else values


def _parse_size(size: Any, default_to_square: bool) -> dict[str, Any]:
    """The reference's `get_size_dict` forms, for the keys a resize can use: int, [h, w], dict.

    Values are passed on unconverted; the config's own checks refuse what is not an int in range.
    """
    if size is None:
        return {}
    if _is_int(size):
        return {"size": (size, size)} if default_to_square else {"size": None, "shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"size": tuple(size)}
    if isinstance(size, Mapping):
        keys = {k for k, v in size.items() if v is not None}
        if keys == {"height", "width"}:
            return {"size": (size["height"], size["width"])}
        if keys in ({"shortest_edge"}, {"shortest_edge", "longest_edge"}):
            return {
                "size": None,
                "shortest_edge": size["shortest_edge"],
                "longest_edge": size.get("longest_edge"),
            }
    raise InputError(
        "unsupported image size "
        f"{reprlib.repr(size)}; use an int, [height, width], {{height, width}} or {{shortest_edge}}"
    )
