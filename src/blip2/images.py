"""Images in, BLIP-2 pixel tensors out.

`load_image` turns anything a caller may hand us (a path, encoded bytes, a PIL image, a numpy array) into
an upright 8-bit RGB PIL image, and raises `ImageError` naming the image for every failure.
`preprocess` then resizes, rescales and normalizes exactly as the reference
`transformers` `BlipImageProcessorPil` (5.24) does, so that pixel values match it bit for bit.

Where we differ from the reference on purpose:

- EXIF orientation is applied to every input (the reference applies it only to images it opens from a
  path or URL string itself, not to PIL images or arrays it is given).
- 16-bit images (PIL modes ``I;16*`` and ``I``, uint16 arrays) are scaled to 8 bits as ``round(v / 257)``
  (the exact inverse of the usual 8-to-16-bit widening ``v * 257``); the reference's ``convert("RGB")``
  clips them at 255, which turns most photographs into a white page.
- Pictures with transparency are always composited on white, as the reference does for PIL inputs
  (when the reference opens a path string itself it drops the alpha channel instead).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from blip2.errors import ImageError, InputError

# Refuse images with more pixels than this before decoding them: twice PIL's own warning threshold, which
# is also the point where PIL itself refuses. Overridable (module attribute, or `max_pixels=`); PIL's
# own limit (2 * PIL.Image.MAX_IMAGE_PIXELS) still applies to files above it.
MAX_PIXELS = 178_956_970

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray

# What Pillow raises for files it cannot decode; plugins differ, so the list is long.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError)


# --------------------------------------------------------------------------------------------------
# Loading


def source_name(source: object) -> str:
    """The name an `ImageError` uses for `source`: its path, or a placeholder for in-memory inputs."""
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, Image.Image):
        return getattr(source, "filename", "") or "<PIL image>"
    if isinstance(source, np.ndarray):
        return "<array>"
    return f"<{type(source).__name__}>"


def load_image(source: ImageSource, *, max_pixels: int | None = None) -> Image.Image:
    """Decode `source` fully into an upright 8-bit RGB PIL image.

    `source` is a path (str or `os.PathLike`), an encoded file as bytes/bytearray/memoryview, a PIL image,
    or a numpy array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) with dtype uint8, uint16, bool,
    float in [0, 1] (or another integer dtype with values in [0, 255]). Multi-frame files give their first
    frame. Images with more than `max_pixels` pixels (default: the module's `MAX_PIXELS` at call time) are
    refused before decoding. Every failure raises `ImageError` whose message starts with the image's name.
    """
    name = source_name(source)
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, Image.Image):
        with _as_image_error(name):
            _check_pixels(source.size, name, limit)
            source.load()
            return _upright_rgb(source, name)
    if isinstance(source, np.ndarray):
        return _upright_rgb(_array_to_image(source, name, limit), name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError(name, "empty input, no image bytes")
        return _decode(io.BytesIO(data), name, limit)
    if isinstance(source, (str, os.PathLike)):
        return _decode(_checked_path(Path(os.fspath(source)), name), name, limit)
    raise ImageError(
        name, f"unsupported input type {type(source).__name__}; give a path, bytes, a PIL image or an array"
    )


def _checked_path(path: Path, name: str) -> Path:
    """Turn the common path mistakes into clear messages before Pillow sees them."""
    try:
        if not path.exists():
            raise ImageError(name, "file not found")
        if path.is_dir():
            raise ImageError(name, "is a directory, not an image file")
        if path.stat().st_size == 0:
            raise ImageError(name, "empty file")
    except OSError as e:
        raise ImageError(name, f"cannot read file: {e.strerror or e}") from e
    return path


def _decode(fp: Path | io.BytesIO, name: str, limit: int) -> Image.Image:
    with _as_image_error(name):
        # PIL warns between 1x and 2x its MAX_IMAGE_PIXELS; our own limit replaces that warning.
        # (catch_warnings swaps the process-wide filters; a concurrent thread may miss a warning meanwhile.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp)
        with image:
            _check_pixels(image.size, name, limit)
            image.load()  # decode everything now, so a truncated file fails here and not later
            return _upright_rgb(image, name)


@contextlib.contextmanager
def _as_image_error(name: str) -> Iterator[None]:
    """Turn whatever Pillow raises into an `ImageError` naming the image."""
    try:
        yield
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"too many pixels, refused as a possible decompression bomb ({e})") from e
    except PermissionError as e:
        raise ImageError(name, "permission denied") from e
    except UnidentifiedImageError as e:
        raise ImageError(name, "not an image, or an image format Pillow cannot read") from e
    except _DECODE_ERRORS as e:
        raise ImageError(name, f"cannot decode image: {e}") from e


def _check_pixels(size: tuple[int, int], name: str, limit: int) -> None:
    width, height = size
    if width * height > limit:
        raise ImageError(
            name,
            f"image is {width}x{height} = {width * height} pixels, more than the limit of {limit} "
            "(decompression-bomb guard; raise blip2.images.MAX_PIXELS to allow it)",
        )


def _upright_rgb(image: Image.Image, name: str) -> Image.Image:
    try:
        image = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS + (KeyError, AttributeError):
        pass  # broken EXIF metadata: keep the pixels as stored rather than refuse a readable picture
    with _as_image_error(name):
        return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    8-bit modes convert exactly as the reference `transformers.image_transforms.convert_to_rgb`: images
    with an alpha band or a "transparency" entry are composited on white, the rest use `convert("RGB")`.
    High-depth modes are first scaled to 8-bit grey ("L", or "LA" when they carry transparency).
    """
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_depth_to_grey(image)
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _high_depth_to_grey(image: Image.Image) -> Image.Image:
    """Scale a 16-bit ("I;16*", "I") or float ("F") grey image to 8 bits, keeping PNG-style transparency."""
    values = np.asarray(image)
    if image.mode == "F":
        grey = _float_to_uint8(values)
    else:
        grey = _sixteen_to_eight(np.clip(values.astype(np.int64), 0, 65535))
    transparency = image.info.get("transparency")
    if isinstance(transparency, int):  # one grey value marked transparent (PNG tRNS)
        alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey, alpha], axis=-1), "LA")
    return Image.fromarray(grey)


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """round(v / 257) for v in [0, 65535]: maps v * 257 back to v exactly, 65535 to 255."""
    return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] are scaled by 255; other ranges are taken as 0..255 and clipped, as Pillow does."""
    values = np.nan_to_num(values.astype(np.float64))
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return np.round(np.clip(values, 0.0, 255.0)).astype(np.uint8)


def _array_to_image(array: np.ndarray, name: str, limit: int) -> Image.Image:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array -> PIL "L", "RGB" or "RGBA" image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or 0 in array.shape:
        raise ImageError(
            name,
            f"array of shape {array.shape} is not an image; expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)",
        )
    _check_pixels((array.shape[1], array.shape[0]), name, limit)
    return Image.fromarray(np.ascontiguousarray(_array_to_uint8(array, name)))


def _array_to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return _sixteen_to_eight(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise ImageError(
                name, f"float array values must lie in [0, 1], got [{array.min()}, {array.max()}]"
            )
        return np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise ImageError(
                name, f"{array.dtype} array values must lie in [0, 255], got [{array.min()}, {array.max()}]"
            )
        return array.astype(np.uint8)
    raise ImageError(
        name, f"unsupported array dtype {array.dtype}; use uint8, uint16, bool or float in [0, 1]"
    )


# --------------------------------------------------------------------------------------------------
# Configuration

_SCALAR_KEYS = ("resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "do_convert_rgb")


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The fields of a checkpoint's preprocessor_config.json that BLIP-2 preprocessing uses.

    Defaults are the reference `BlipImageProcessor` class defaults (384x384); BLIP-2 checkpoints override
    the size (224x224) in their file. The output size is either fixed, `size` = (height, width), or
    aspect-preserving: `shortest_edge` (and optionally `longest_edge`) with `size` None.
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
        try:
            Image.Resampling(self.resample)
        except ValueError as e:
            raise InputError(f"unknown PIL resample filter {self.resample!r}") from e
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise InputError("image_mean and image_std need one value per RGB channel")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> ImageProcessorConfig:
        """Build from a preprocessor_config.json dict; keys this package does not use are ignored."""
        fields: dict[str, Any] = dict(_parse_size(config.get("size"), config.get("default_to_square", True)))
        for key in _SCALAR_KEYS:
            if config.get(key) is not None:
                fields[key] = config[key]
        for key in ("image_mean", "image_std"):
            if config.get(key) is not None:
                value = config[key]
                fields[key] = tuple(value) if isinstance(value, (list, tuple)) else (value,) * 3
        return cls(**fields)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ImageProcessorConfig:
        """Read a preprocessor_config.json file."""
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise InputError(f"{os.fspath(path)}: cannot read image processor config: {e}") from e
        if not isinstance(config, dict):
            raise InputError(f"{os.fspath(path)}: image processor config is not a JSON object")
        return cls.from_dict(config)


def _parse_size(size: Any, default_to_square: bool) -> dict[str, Any]:
    """The reference's `get_size_dict` forms, for the keys a resize can use: int, [h, w], dict."""
    if size is None:
        return {}
    if isinstance(size, int):
        return {"size": (size, size)} if default_to_square else {"size": None, "shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"size": (int(size[0]), int(size[1]))}
    if isinstance(size, Mapping):
        keys = {k for k, v in size.items() if v is not None}
        if keys == {"height", "width"}:
            return {"size": (int(size["height"]), int(size["width"]))}
        if keys in ({"shortest_edge"}, {"shortest_edge", "longest_edge"}):
            return {
                "size": None,
                "shortest_edge": size["shortest_edge"],
                "longest_edge": size.get("longest_edge"),
            }
    raise InputError(
        f"unsupported image size {size!r}; use an int, [height, width], {{height, width}} or {{shortest_edge}}"
    )


# --------------------------------------------------------------------------------------------------
# Preprocessing


def output_size(height: int, width: int, config: ImageProcessorConfig) -> tuple[int, int]:
    """The (height, width) an image of the given size is resized to, as the reference PIL backend computes it."""
    if config.size is not None:
        return config.size
    short_edge = config.shortest_edge
    assert short_edge is not None
    if config.longest_edge is not None:  # transformers' get_size_with_aspect_ratio
        short, long = min(height, width), max(height, width)
        raw = None
        if long / short * short_edge > config.longest_edge:
            raw = config.longest_edge * short / long
            short_edge = int(round(raw))
        if short == short_edge:
            return height, width
        scale = raw if raw is not None else short_edge
        if width < height:
            return int(scale * height / width), short_edge
        return short_edge, int(scale * width / height)
    # transformers' get_resize_output_image_size(default_to_square=False): the long edge is truncated.
    if width <= height:
        return int(short_edge * height / width), short_edge
    return short_edge, int(short_edge * width / height)


def resize(image: Image.Image, config: ImageProcessorConfig) -> Image.Image:
    """PIL resize exactly as the reference (`image.resize((w, h), resample)`, no reducing_gap)."""
    height, width = output_size(image.height, image.width, config)
    return image.resize((width, height), resample=config.resample)


def to_tensor(image: Image.Image, config: ImageProcessorConfig) -> torch.Tensor:
    """8-bit RGB image -> (3, H, W) float32, rescaled and normalized in the reference's order and dtypes.

    Done in numpy, as the reference does: bit-identical to it, and a few small single-threaded passes
    are cheaper here than torch's multi-threaded kernels on a busy machine.
    """
    values = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    if config.do_rescale:
        # The reference multiplies in float64 and only then rounds to float32.
        values = (values.astype(np.float64) * config.rescale_factor).astype(np.float32)
    else:
        values = values.astype(np.float32)
    if config.do_normalize:
        mean = np.array(config.image_mean, dtype=np.float32)
        std = np.array(config.image_std, dtype=np.float32)
        values = (values - mean) / std
    return torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1)))  # (3, H, W)


def preprocess_one(image: ImageSource, config: ImageProcessorConfig) -> torch.Tensor:
    """One image -> (3, H, W) float32 pixel values. Raises `ImageError` naming the image."""
    rgb = load_image(image)
    if config.do_resize:
        rgb = resize(rgb, config)
    return to_tensor(rgb, config)


def preprocess(images: ImageSource | Sequence[ImageSource], config: ImageProcessorConfig) -> torch.Tensor:
    """One image or a list of them -> (B, 3, H, W) float32 pixel values.

    Raises `InputError` for an empty list or images whose output sizes differ (aspect-preserving configs),
    and `ImageError` naming the first image that cannot be read.
    """
    batch = list(images) if isinstance(images, (list, tuple)) else [images]
    if not batch:
        raise InputError("no images given")
    tensors = [preprocess_one(image, config) for image in batch]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise InputError(
            f"images resize to different shapes {sorted(shapes)}; use a fixed size to batch them"
        )
    return torch.stack(tensors)
