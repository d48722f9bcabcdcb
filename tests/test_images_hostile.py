"""blip2.images against hostile and broken inputs: crafted files are built here, in tmp_path, never committed.

Every failure must be an `ImageError` (or, for config files, a `CheckpointError`) naming the input, and no
crafted file may run an external program, block, or make us allocate for pixels we then refuse.
"""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import subprocess
import tempfile
import threading

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, features

import blip2.images as images
from blip2.errors import CheckpointError, ImageError, InputError
from blip2.images import ImageProcessorConfig, load_image

EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 16 16
0 0 moveto 16 16 lineto stroke
showpage
%%EOF
"""


def picture(size: tuple[int, int] = (24, 16)) -> Image.Image:
    """A small RGB gradient: every pixel differs, so a decoder has real work to do."""
    x, y = np.meshgrid(np.arange(size[0]), np.arange(size[1]))
    return Image.fromarray(np.stack([x * 10 % 256, y * 15 % 256, (x + y) * 7 % 256], -1).astype(np.uint8))


def encoded(fmt: str, frames: int = 1, **options) -> bytes:
    """A small valid file in `fmt` ("TIFF-LZW" is TIFF with LZW compression); several frames if asked."""
    out = io.BytesIO()
    first = picture()
    if fmt == "GIF":
        first = first.quantize(32)
    if fmt == "TIFF-LZW":
        fmt, options = "TIFF", dict(options, compression="tiff_lzw")
    if frames > 1:
        rest = [first.rotate(90 * i) for i in range(1, frames)]
        options = dict(options, save_all=True, append_images=rest)
    first.save(out, format=fmt, **options)
    return out.getvalue()


def allowed_encodings() -> list[str]:
    """Every allowed format this Pillow can also write (HEIF is read-only here)."""
    names = ["JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "TIFF-LZW"]
    return names + (["AVIF"] if features.check("avif") else [])


@pytest.fixture
def no_external_programs(monkeypatch):
    """Fail loudly if anything would start Ghostscript or any other process."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("an external program was started")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(os, "system", refuse)
    yield
    assert (
        calls == []
    )  # checked here too: the decode boundary would turn the AssertionError into an ImageError


# --------------------------------------------------------------------------------------------------
# 1. Only allow-listed raster formats are opened


@pytest.mark.parametrize("source", ["path", "bytes"])
def test_postscript_disguised_as_jpeg_is_refused_unread(tmp_path, no_external_programs, source):
    path = tmp_path / "holiday.jpg"
    path.write_bytes(EPS)
    with pytest.raises(ImageError, match="EPS images are not allowed") as raised:
        load_image(path if source == "path" else EPS)
    assert raised.value.source == (str(path) if source == "path" else "<bytes>")


def test_lazily_opened_pil_image_of_a_refused_format_is_refused_before_load(tmp_path, no_external_programs):
    path = tmp_path / "drawing.jpg"
    path.write_bytes(EPS)
    lazy = Image.open(path)  # the caller's own open: header parsed, Ghostscript not run yet
    assert lazy.format == "EPS" and lazy.tile
    with pytest.raises(ImageError, match=f"{path}: EPS images are not allowed"):
        load_image(lazy)


def test_decoded_pil_images_of_any_origin_are_accepted():
    # Pixels already in memory (here from an image Pillow could not re-open under our allow-list) are fine.
    buffer = io.BytesIO()
    picture().save(buffer, format="PCX")
    opened = Image.open(buffer)
    opened.load()
    assert load_image(opened).size == (24, 16)


def refused_files() -> dict[str, bytes]:
    """Crafted files in formats Pillow knows but we refuse, some of which misbehaved when corrupt."""
    files = {"EPS": EPS, "PDF": b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n"}
    for fmt, image in [
        ("DDS", picture().convert("RGBA")),
        ("BLP", picture().quantize(16)),
        ("SPIDER", picture().convert("F")),
        ("ICO", picture()),
        ("PCX", picture()),
        ("TGA", picture()),
        ("PPM", picture()),
        ("QOI", picture()),
        ("XBM", picture().convert("1")),
        ("SGI", picture()),
        ("JPEG2000", picture()),
    ]:
        out = io.BytesIO()
        image.save(out, format=fmt)
        files[fmt] = out.getvalue()
    return files


REFUSED = refused_files()
# Formats whose signature Pillow recognises from the first bytes, so the message can name them.
NAMED = {"EPS", "DDS", "BLP", "ICO", "PCX", "PPM", "QOI", "SGI", "JPEG2000"}


@pytest.mark.parametrize("fmt", sorted(REFUSED))
@pytest.mark.parametrize("damage", ["intact", "truncated", "flipped"])
def test_refused_formats_give_image_error(tmp_path, no_external_programs, fmt, damage):
    data = REFUSED[fmt]
    if damage == "truncated":
        data = data[: max(1, len(data) // 2)]
    if damage == "flipped":
        data = data[:20] + bytes(b ^ 0x5A for b in data[20:40]) + data[40:]
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="not allowed|not in an allowed format") as raised:
        load_image(path)
    assert raised.value.source == str(path)
    if fmt in NAMED and damage != "truncated":
        assert f"{fmt} images are not allowed" in raised.value.reason


def test_allowed_formats_follow_the_installed_plugins(monkeypatch):
    assert set(images.RASTER_FORMATS) <= set(images.allowed_formats())
    assert ("AVIF" in images.allowed_formats()) == ("AVIF" in Image.OPEN)
    monkeypatch.setitem(Image.OPEN, "HEIF", (lambda fp, filename: None, lambda prefix: False))
    assert "HEIF" in images.allowed_formats()  # looked up at call time, as pillow-heif registers late


# --------------------------------------------------------------------------------------------------
# 2. Any failure to decode an allowed format is that image's ImageError


def variants(data: bytes, count: int = 50) -> list[bytes]:
    """`count` damaged copies: truncated at 10 points, and single or burst byte flips at evenly spread
    positions (headers included, where most parsers are fragile)."""
    cuts = np.linspace(1, len(data) - 1, 10).astype(int)
    flips = np.linspace(0, len(data) - 1, count - len(cuts)).astype(int)
    rng = np.random.default_rng(len(data))  # deterministic
    damaged = [data[:cut] for cut in cuts]
    for i, position in enumerate(flips):
        width = 1 if i % 2 else 8
        noise = rng.integers(0, 256, width, dtype=np.uint8).tobytes()
        damaged.append(data[:position] + noise + data[position + width :])
    return damaged


@pytest.mark.filterwarnings("ignore")  # decoders warn about the damage; only the outcome matters here
@pytest.mark.parametrize("fmt", allowed_encodings())
def test_damaged_files_decode_or_raise_image_error(fmt):
    data = encoded(fmt, frames=2 if fmt in ("MPO", "GIF", "TIFF", "WEBP", "PNG") else 1)
    assert load_image(data).size == (24, 16)
    outcomes = {"decoded": 0, "refused": 0}
    for damaged in variants(data):
        try:
            rgb = load_image(damaged)
        except ImageError as e:
            assert e.source == "<bytes>"
            assert "not allowed" not in e.reason  # a damaged allowed file is damaged, not forbidden
            outcomes["refused"] += 1
        else:
            assert rgb.mode == "RGB"
            outcomes["decoded"] += 1
    assert outcomes["refused"] > 0  # the damage was real


@pytest.mark.parametrize(
    "error", [KeyError("tile"), ZeroDivisionError("division by zero"), MemoryError(), RuntimeError("x")]
)
def test_any_decoder_exception_becomes_image_error(monkeypatch, error):
    def broken_load(*args):
        raise error

    monkeypatch.setattr(Image.core, "new", broken_load)  # what every tile-based decoder calls first
    with pytest.raises(ImageError, match=f"cannot decode image \\({type(error).__name__}") as raised:
        load_image(encoded("PNG"))
    assert raised.value.__cause__ is error


def test_interrupts_are_not_swallowed(monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.core, "new", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_image(encoded("PNG"))


def test_broken_exif_keeps_the_pixels(monkeypatch):
    def broken(image):
        raise ValueError("bad EXIF")

    monkeypatch.setattr(images.ImageOps, "exif_transpose", broken)
    assert load_image(encoded("PNG")).size == (24, 16)


# --------------------------------------------------------------------------------------------------
# 3. Special files and paths


def raised_within(call, seconds: float = 10.0) -> BaseException:
    """What `call()` raises, failing the test if it blocks instead (it runs in a daemon thread)."""
    outcome: list[BaseException | None] = []
    worker = threading.Thread(target=lambda: outcome.append(_raised(call)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "blocked"
    assert outcome[0] is not None, "raised nothing"
    return outcome[0]


def _raised(call) -> BaseException | None:
    try:
        call()
    except BaseException as e:  # handed to the test thread, which checks its type
        return e
    return None


def load_within(path) -> ImageError:
    """The ImageError `load_image(path)` raises, failing the test if it blocks instead."""
    error = raised_within(lambda: load_image(path))
    assert isinstance(error, ImageError), error
    return error


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "camera.jpg"
    os.mkfifo(fifo)
    assert load_within(fifo).reason == "is a FIFO (named pipe), not a regular file"


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_character_devices_are_refused(device):
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    assert load_within(device).reason == "is a character device, not a regular file"


def test_socket_is_refused():
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:  # short: socket paths are limited to ~100 bytes
        path = os.path.join(folder, "s.png")
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(path)
            assert load_within(path).reason == "is a socket, not a regular file"


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("", "empty path"),
        ("photo\0.jpg", "path contains a NUL byte"),
        ("x" * 5000 + ".jpg", "path too long"),
        ("/nonexistent-folder/photo.jpg", "file not found"),
    ],
)
def test_bad_paths(path, reason):
    with pytest.raises(ImageError) as raised:
        load_image(path)
    assert raised.value.reason == reason
    assert raised.value.source == path


def test_directory_and_symlink_loop(tmp_path):
    assert load_within(tmp_path).reason == "is a directory, not a file"
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    assert load_within(loop).reason == "too many levels of symbolic links"


def test_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "secret.png"
    path.write_bytes(encoded("PNG"))
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads anything: have open() answer what it answers everyone else

        def denied(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(images.os, "open", denied)
    assert load_within(path).reason == "permission denied"


def test_file_size_limit(tmp_path, monkeypatch):
    path = tmp_path / "large.png"
    data = encoded("PNG")
    path.write_bytes(data)
    monkeypatch.setattr(images, "MAX_FILE_BYTES", len(data) - 1)
    with pytest.raises(
        ImageError, match=f"file is {len(data)} bytes, more than the limit of {len(data) - 1}"
    ):
        load_image(path)
    monkeypatch.setattr(images, "MAX_FILE_BYTES", len(data))
    assert load_image(path).size == (24, 16)


def test_the_opened_file_is_checked_not_only_the_path(tmp_path, monkeypatch):
    """A regular file at stat time that is a FIFO by the time it is opened (a swap) is still refused."""
    fifo = tmp_path / "swapped.jpg"
    os.mkfifo(fifo)
    regular = tmp_path / "regular.jpg"
    regular.write_bytes(encoded("JPEG"))
    real_stat = os.stat

    def stat_before_the_swap(path, **kwargs):
        return real_stat(regular if os.fspath(path) == str(fifo) else path, **kwargs)

    monkeypatch.setattr(images.os, "stat", stat_before_the_swap)
    assert load_within(fifo).reason == "is a FIFO (named pipe), not a regular file"


# --------------------------------------------------------------------------------------------------
# 4. Pixel limit before any pixel allocation; only the first frame is decoded


@pytest.mark.parametrize("fmt", allowed_encodings())
def test_pixel_limit_is_checked_before_decoding(monkeypatch, fmt):
    data = encoded(fmt)
    decoder = type(Image.open(io.BytesIO(data)))
    allocations = []
    monkeypatch.setattr(decoder, "load", lambda self: allocations.append("load"))
    monkeypatch.setattr(Image.core, "new", lambda *args: allocations.append("new"))
    with pytest.raises(ImageError, match="decompression-bomb guard"):
        load_image(data, max_pixels=24 * 16 - 1)
    assert allocations == []


def test_huge_declared_size_is_refused_by_the_header(tmp_path):
    # A GIF header claiming 65535 x 65535 pixels (4.3 Gpx) and no pixel data.
    screen = b"GIF89a" + (65535).to_bytes(2, "little") * 2 + b"\x00\x00\x00"
    frame = b"\x2c" + b"\x00\x00\x00\x00" + (65535).to_bytes(2, "little") * 2 + b"\x00" + b"\x08\x00\x3b"
    with pytest.raises(ImageError, match="<bytes>: too many pixels|decompression-bomb"):
        load_image(screen + frame)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "PNG", "WEBP", "MPO"])
def test_only_the_first_frame_is_decoded(monkeypatch, fmt):
    data = encoded(fmt, frames=5)
    opened = Image.open(io.BytesIO(data))
    assert getattr(opened, "n_frames", 1) == 5
    decoder = type(opened)
    later_frames = []
    for method in ("seek", "_seek"):
        original = getattr(decoder, method, None)
        if original is not None:

            def spy(self, frame, *args, _original=original, **kwargs):
                if frame != 0:
                    later_frames.append(frame)
                return _original(self, frame, *args, **kwargs)

            monkeypatch.setattr(decoder, method, spy)
    assert np.array_equal(
        np.asarray(load_image(data)), np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    )
    assert later_frames == []


# --------------------------------------------------------------------------------------------------
# 5. The image processor config is hostile too

GOOD = {"size": {"height": 224, "width": 224}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25] * 3}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"size": {"height": 100_000, "width": 224}}, "size.height"),
        ({"size": {"height": 224, "width": 0}}, "size.width"),
        ({"size": {"height": 224.0, "width": 224}}, "size.height"),
        ({"size": True}, "size"),
        ({"size": 5000}, "size.height"),
        ({"size": [224, "224"]}, "size.width"),
        ({"size": {"shortest_edge": -1}}, "size.shortest_edge"),
        ({"size": {"shortest_edge": 224, "longest_edge": 10**9}}, "size.longest_edge"),
        ({"size": "224"}, "size"),
        ({"image_std": 0}, "image_std[0]"),
        ({"image_std": [0.5, 0.0, 0.5]}, "image_std[1]"),
        ({"image_std": [0.5, -1, 0.5]}, "image_std[1]"),
        ({"image_mean": [0.5, float("nan"), 0.5]}, "image_mean[1]"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"image_mean": "abc"}, "image_mean[0]"),
        ({"image_mean": [0.5, None, 0.5]}, "image_mean[1]"),
        ({"rescale_factor": 0}, "rescale_factor"),
        ({"rescale_factor": float("inf")}, "rescale_factor"),
        ({"rescale_factor": "0.5"}, "rescale_factor"),
        ({"resample": 99}, "resample"),
        ({"resample": True}, "resample"),
        ({"do_resize": "yes"}, "do_resize"),
        ({"do_normalize": 1}, "do_normalize"),
        ({"default_to_square": 0}, "default_to_square"),
    ],
)
def test_bad_config_values_name_the_file_and_field(tmp_path, changes, field):
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(dict(GOOD, **changes)))
    with pytest.raises(CheckpointError) as raised:
        ImageProcessorConfig.from_checkpoint(tmp_path)
    assert str(raised.value).startswith(f"{path}: ")
    assert field in str(raised.value)
    with pytest.raises(InputError, match=field.replace("[", r"\[")):  # the API callers' error
        ImageProcessorConfig.from_dict(dict(GOOD, **changes))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        ('{"size": ' + "9" * 5000 + "}", "not valid JSON"),
        (" " * (1024**2 + 1) + "{}", "larger than 1 MiB"),
        ("\udcff", "not UTF-8"),
    ],
)
def test_malformed_config_files(tmp_path, text, message):
    path = tmp_path / "preprocessor_config.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(CheckpointError, match=message) as raised:
        ImageProcessorConfig.from_checkpoint(tmp_path)
    assert str(path) in str(raised.value)


def test_config_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "preprocessor_config.json")
    error = raised_within(lambda: ImageProcessorConfig.from_checkpoint(tmp_path))
    assert isinstance(error, CheckpointError)
    assert "is a FIFO" in str(error)


@pytest.mark.parametrize(
    ("combined", "message"),
    [
        ({"image_processor": [1, 2]}, 'processor_config.json \\("image_processor"\\): .*not a JSON object'),
        (
            {"image_processor": dict(GOOD, image_std=0)},
            'processor_config.json \\("image_processor"\\): .*image_std',
        ),
        ({"tokenizer": {}}, "has no preprocessor_config.json"),
        ({"image_processor": {}}, "has no preprocessor_config.json"),
    ],
)
def test_processor_config_fallback_errors(tmp_path, combined, message):
    (tmp_path / "processor_config.json").write_text(json.dumps(combined))
    with pytest.raises(CheckpointError, match=message):
        ImageProcessorConfig.from_checkpoint(tmp_path)


def test_from_checkpoint_reads_either_file(tmp_path):
    with pytest.raises(CheckpointError, match="has no preprocessor_config.json"):
        ImageProcessorConfig.from_checkpoint(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": dict(GOOD, resample=2)}))
    assert ImageProcessorConfig.from_checkpoint(tmp_path) == ImageProcessorConfig.from_dict(
        dict(GOOD, resample=2)
    )
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(GOOD))  # the older file wins
    assert ImageProcessorConfig.from_checkpoint(tmp_path) == ImageProcessorConfig.from_dict(GOOD)


def test_direct_construction_is_checked_too():
    with pytest.raises(InputError, match="size.height"):
        ImageProcessorConfig(size=(0, 224))
    with pytest.raises(InputError, match="image_std"):
        ImageProcessorConfig(image_std=(0.5, 0.5, 0.0))
    with pytest.raises(InputError, match="image_mean"):
        ImageProcessorConfig(image_mean=(0.5, 0.5))
