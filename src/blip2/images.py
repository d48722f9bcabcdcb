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

Every input is treated as hostile: only regular files up to `MAX_FILE_BYTES` are read (FIFOs, devices and
sockets are refused unopened), only the `allowed_formats()` are handed to Pillow (never EPS/PDF, which
Pillow would give to Ghostscript), the pixel count is checked against `MAX_PIXELS` after the header is
parsed and before any pixel is decoded, only the first frame of a multi-frame file is decoded, and any
exception a decoder raises becomes the image's `ImageError`. The image processor config files are
size-capped and every value is bounds-checked.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import cast

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from blip2.errors import ImageError, InputError
from blip2.image_config import ImageProcessorConfig

# Refuse images with more pixels than this before decoding them: twice PIL's own warning threshold, which
# is also the point where PIL itself refuses. Overridable (module attribute, or `max_pixels=`); PIL's
# own limit (2 * PIL.Image.MAX_IMAGE_PIXELS) still applies to files above it.
MAX_PIXELS = 178_956_970
# Refuse image files larger than this before reading them (module attribute, read at call time).
MAX_FILE_BYTES = 512 * 1024**2
# Refuse image processor config files larger than this before parsing them.

# The only formats Pillow may open for us: common raster formats with maintained decoders. Everything else
# (EPS and PDF, which Pillow hands to Ghostscript; DDS, BLP, SPIDER, ICO, ...) is refused unread.
# MPO (the multi-picture JPEG phones write) is opened by the JPEG plugin.
RASTER_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Allowed too when their plugins are registered (Pillow's own AVIF plugin, pillow-heif's HEIF opener).
OPTIONAL_FORMATS = ("AVIF", "HEIF")


ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray


# --------------------------------------------------------------------------------------------------
# Reading files


class Unreadable(Exception):
    """Why a file was not read; callers turn it into their own named error."""


# Not regular files, refused before they are opened: opening a FIFO blocks, reading /dev/zero never ends.
_SPECIAL_FILES = (
    (stat.S_ISDIR, "is a directory, not a file"),
    (stat.S_ISFIFO, "is a FIFO (named pipe), not a regular file"),
    (stat.S_ISCHR, "is a character device, not a regular file"),
    (stat.S_ISBLK, "is a block device, not a regular file"),
    (stat.S_ISSOCK, "is a socket, not a regular file"),
)
_OS_ERRORS: dict[int | None, str] = {  # by OSError.errno, which may be None
    errno.ENOENT: "file not found",
    errno.ENOTDIR: "file not found (a folder in its path is a file)",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENAMETOOLONG: "path too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.ENXIO: "not a regular file",  # what opening a socket gives
}
_OPEN_FLAGS = (
    os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
)


def read_file(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of the regular file at `path`, refusing special files and files over `limit` bytes.

    The file is opened once and checked through its descriptor, so a file swapped or grown after the first
    check is still refused. Raises `Unreadable` with a short reason.
    """
    raw = os.fspath(path)
    if not raw:
        raise Unreadable("empty path")
    if ("\0" if isinstance(raw, str) else b"\0") in raw:
        raise Unreadable("path contains a NUL byte")
    try:
        _check_regular(os.stat(raw), limit)  # before opening: open() itself blocks on a FIFO
        with open(os.open(raw, _OPEN_FLAGS), "rb") as f:
            _check_regular(os.fstat(f.fileno()), limit)  # the file actually opened
            data = f.read(limit + 1)  # at most one byte past the limit, however much the file grows
    except OSError as e:
        raise Unreadable(_OS_ERRORS.get(e.errno, f"cannot read file: {e.strerror or e}")) from e
    if len(data) > limit:
        raise Unreadable(f"file grew past the limit of {limit} bytes while being read")
    if not data:
        raise Unreadable("empty file")
    return data


def _check_regular(info: os.stat_result, limit: int) -> None:
    for is_kind, reason in _SPECIAL_FILES:
        if is_kind(info.st_mode):
            raise Unreadable(reason)
    if not stat.S_ISREG(info.st_mode):
        raise Unreadable("not a regular file")
    if info.st_size > limit:
        raise Unreadable(f"file is {info.st_size} bytes, more than the limit of {limit} bytes")


# --------------------------------------------------------------------------------------------------
# Loading


def allowed_formats() -> tuple[str, ...]:
    """The Pillow formats images are opened with, looked up now: AVIF and HEIF count once their plugin is in."""
    Image.init()  # registers every plugin Pillow ships, so that AVIF shows up where it is built in
    return RASTER_FORMATS + tuple(name for name in OPTIONAL_FORMATS if name in Image.OPEN)


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
    float in [0, 1] (or another integer dtype with values in [0, 255]). Files must be in one of the
    `allowed_formats()` and at most `MAX_FILE_BYTES` long. Multi-frame files give their first frame, and
    only that frame is decoded. Images with more than `max_pixels` pixels (default: the module's
    `MAX_PIXELS` at call time) are refused before decoding. Every failure raises `ImageError` whose
    message starts with the image's name.
    """
    name = source_name(source)
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if isinstance(source, Image.Image):
        with _as_image_error(name):
            _refuse_undecoded_format(source, name)
            _check_pixels(source.size, name, limit)
            source.load()
            return _upright_rgb(source, name)
    if isinstance(source, np.ndarray):
        return _upright_rgb(_array_to_image(source, name, limit), name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError(name, "empty input, no image bytes")
        return _decode(data, name, limit)
    if isinstance(source, (str, os.PathLike)):
        try:
            data = read_file(source, MAX_FILE_BYTES)
        except Unreadable as e:
            raise ImageError(name, str(e)) from e
        return _decode(data, name, limit)
    raise ImageError(
        name, f"unsupported input type {type(source).__name__}; give a path, bytes, a PIL image or an array"
    )


_OPEN_LOCK = threading.Lock()


def _decode(data: bytes, name: str, limit: int) -> Image.Image:
    with _as_image_error(name):
        # PIL warns between 1x and 2x its MAX_IMAGE_PIXELS; our own limit replaces that warning.
        # catch_warnings swaps the process-wide filters, so two overlapping blocks (the decode pool's threads)
        # could leave the "ignore" behind: the lock keeps ours apart. Opening only reads the header, so the
        # lock is held briefly; decoding (load) runs in parallel.
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _open_allowed(data, name)
        with image:
            _check_pixels(image.size, name, limit)  # the header is read, no pixel decoded yet
            image.load()  # decode the first frame now, so a truncated file fails here and not later
            return _upright_rgb(image, name)


def _open_allowed(data: bytes, name: str) -> ImageFile.ImageFile:
    """Open (parse the header of) `data` with the allowed formats' plugins only."""
    try:
        return Image.open(io.BytesIO(data), formats=allowed_formats())
    except UnidentifiedImageError as e:
        raise ImageError(name, _not_allowed(_identify(data))) from e


def _not_allowed(fmt: str | None) -> str:
    """Why a file no allowed plugin would open was refused, given the format its first bytes suggest."""
    allowed = allowed_formats()
    if fmt is None:
        return f"not an image, or not in an allowed format ({', '.join(allowed)})"
    if fmt in allowed:  # the signature is right but the plugin rejected the header
        return f"cannot decode image (damaged {fmt} header)"
    return f"{fmt} images are not allowed (allowed: {', '.join(allowed)})"


def _identify(data: bytes) -> str | None:
    """The format a refused file seems to be in, from its first bytes only (each plugin's signature test)."""
    prefix = data[:16]  # what Image.open shows each plugin's test
    for fmt, (_, accept) in Image.OPEN.items():
        with contextlib.suppress(Exception):  # a signature test that fails just says no
            if accept is not None and accept(prefix) is True:
                return fmt
    return None


def _refuse_undecoded_format(image: Image.Image, name: str) -> None:
    """A lazily opened file in a format not allowed is refused before `load()` runs its decoder (for EPS,
    Ghostscript). Pixels the caller has already decoded are accepted whatever their source."""
    if not isinstance(image, ImageFile.ImageFile) or image.format in allowed_formats() + ("MPO",):
        return
    if image.tile or getattr(image, "_im", None) is None:  # not decoded yet
        raise ImageError(name, _not_allowed(image.format))


@contextlib.contextmanager
def _as_image_error(name: str) -> Iterator[None]:
    """The decode boundary: whatever a decoder raises becomes an `ImageError` naming the image.

    Pillow's plugins raise nearly anything on hostile files (KeyError, ZeroDivisionError, MemoryError,
    plain Exception, ...); one bad image must not abort a batch. KeyboardInterrupt and SystemExit pass.
    """
    try:
        yield
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"too many pixels, refused as a possible decompression bomb ({e})") from e
    except Exception as e:
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise ImageError(name, f"cannot decode image ({detail})") from e


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
    except Exception:  # broken EXIF metadata: keep the pixels as stored rather than refuse a readable picture
        pass
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
    values: np.ndarray = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
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


def load_resized(
    source: ImageSource, config: ImageProcessorConfig, *, max_pixels: int | None = None
) -> Image.Image:
    """Decode `source` and resize it at once to the model's input size (when `config` resizes), so that a
    batch holds model-size images rather than full-size ones. `to_tensor` of it is `preprocess_one`."""
    return fit(load_image(source, max_pixels=max_pixels), config)


def fit(image: Image.Image, config: ImageProcessorConfig) -> Image.Image:
    """A decoded RGB image at the model's input size: resized when `config` resizes, else as it is."""
    return resize(image, config) if config.do_resize else image


def preprocess_one(image: ImageSource, config: ImageProcessorConfig) -> torch.Tensor:
    """One image -> (3, H, W) float32 pixel values. Raises `ImageError` naming the image."""
    return to_tensor(load_resized(image, config), config)


def preprocess(images: ImageSource | Sequence[ImageSource], config: ImageProcessorConfig) -> torch.Tensor:
    """One image or a list of them -> (B, 3, H, W) float32 pixel values.

    Raises `InputError` for an empty list or images whose output sizes differ (aspect-preserving configs),
    and `ImageError` naming the first image that cannot be read.
    """
    # a str or bytes is one image, though a Sequence too
    batch = list(images) if isinstance(images, (list, tuple)) else [cast(ImageSource, images)]
    if not batch:
        raise InputError("no images given")
    return stack_pixels([preprocess_one(image, config) for image in batch])


def stack_pixels(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`preprocess_one`'s (3, H, W) tensors -> (B, 3, H, W); an `InputError` when their sizes differ
    (aspect-preserving configs)."""
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise InputError(
            f"images resize to different shapes {sorted(shapes)}; use a fixed size to batch them"
        )
    return torch.stack(list(tensors))
