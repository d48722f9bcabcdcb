"""blip2.images against the reference transformers 5.24 BLIP image processor (PIL backend).

The reference is `BlipImageProcessorPil` (what `BlipImageProcessor` falls back to without torchvision),
fed the PIL image as users usually do: `processor(Image.open(path))`.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import blip2.images as images
from blip2.errors import ImageError, InputError
from blip2.images import ImageProcessorConfig, load_image, preprocess, preprocess_one

transformers_blip = pytest.importorskip("transformers.models.blip")

# A BLIP-2 checkpoint's preprocessor_config.json (Salesforce/blip2-opt-2.7b).
BLIP2_CONFIG = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "BlipImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "Blip2Processor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 224, "width": 224},
}
ATOL = 1e-5


@functools.cache
def _reference_processor(config_json: str):
    return transformers_blip.BlipImageProcessorPil.from_dict(json.loads(config_json))


def reference(image: Image.Image, config: dict = BLIP2_CONFIG) -> torch.Tensor:
    processor = _reference_processor(json.dumps(config, sort_keys=True))
    return processor(image, return_tensors="pt")["pixel_values"]


def ours(source, config: dict = BLIP2_CONFIG) -> torch.Tensor:
    return preprocess(source, ImageProcessorConfig.from_dict(config))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == torch.float32
    # A plain max-difference: torch.testing.assert_close is slow enough here to dominate the suite.
    assert (actual - expected).abs().max().item() <= atol


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    if path.suffix == ".png":
        kwargs.setdefault("compress_level", 1)  # fast; the pixels are the same
    image.save(path, **kwargs)
    return path


def astronaut(size: int = 128) -> Image.Image:
    return Image.fromarray(skimage.data.astronaut()).resize((size, size))


# --------------------------------------------------------------------------------------------------
# Parity with the reference


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "camera"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_photographs_match_reference(tmp_path, name, fmt):
    path = save(
        Image.fromarray(getattr(skimage.data, name)()), tmp_path / f"{name}.{fmt.lower()}", format=fmt
    )
    actual = ours(path)
    assert actual.shape == (1, 3, 224, 224)
    assert_close(actual, reference(Image.open(path)))


def _synthetic(mode: str) -> Image.Image:
    """A picture in `mode` with partial transparency where the mode allows it."""
    rgb = astronaut(96)
    ramp = Image.linear_gradient("L").resize(rgb.size)  # alpha 0..255 top to bottom
    if mode == "RGBA":
        return Image.merge("RGBA", (*rgb.split(), ramp))
    if mode == "LA":
        return Image.merge("LA", (rgb.convert("L"), ramp))
    if mode == "P":
        return rgb.quantize(32)
    if mode == "P+transparency":
        paletted = rgb.quantize(32)
        paletted.info["transparency"] = int(np.asarray(paletted)[0, 0])
        return paletted
    if mode == "RGB+transparency":
        return rgb  # saved with transparency= below
    return rgb.convert(mode)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("P", "GIF"),
        ("P+transparency", "PNG"),
        ("P+transparency", "GIF"),
        ("RGB+transparency", "PNG"),
        ("L", "PNG"),
        ("L", "JPEG"),
        ("1", "PNG"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("RGBA", "WEBP"),
    ],
)
def test_synthetic_modes_match_reference(tmp_path, mode, fmt):
    image = _synthetic(mode)
    options = {}
    if "transparency" in image.info:
        options["transparency"] = image.info["transparency"]
    if mode == "RGB+transparency":
        options["transparency"] = tuple(np.asarray(image)[0, 0].tolist())
    if fmt == "WEBP":
        options["lossless"] = True
    path = save(image, tmp_path / f"image.{fmt.lower()}", format=fmt, **options)
    opened = Image.open(path)
    assert opened.mode == mode.split("+")[0] or (fmt == "WEBP" and opened.mode == "RGBA")
    assert_close(ours(path), reference(opened))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P+transparency", "L", "1", "CMYK", "YCbCr", "HSV", "RGBa"])
def test_in_memory_pil_modes_match_reference(mode):
    image = _synthetic("RGBA").convert(mode) if mode in ("RGBa", "HSV") else _synthetic(mode)
    assert_close(ours(image), reference(image))


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    assert_close(ours(clear), ours(white), atol=0)


def test_non_square_image_and_custom_size_from_config(tmp_path):
    config = dict(BLIP2_CONFIG, size={"height": 160, "width": 192})
    path = save(Image.fromarray(skimage.data.coffee()), tmp_path / "coffee.jpg")  # 400 x 600
    actual = ours(path, config)
    assert actual.shape == (1, 3, 160, 192)
    assert_close(actual, reference(Image.open(path), config))


@pytest.mark.parametrize(
    "size", [200, [160, 192], {"shortest_edge": 200}, {"shortest_edge": 150, "longest_edge": 200}]
)
def test_size_forms_match_reference(size):
    config = dict(BLIP2_CONFIG, size=size)
    image = Image.fromarray(skimage.data.chelsea())  # 300 x 451, not square
    assert_close(ours(image, config), reference(image, config))


@pytest.mark.parametrize(
    "changes",
    [
        {"resample": 2},
        {"do_resize": False},
        {"do_normalize": False},
        {"do_rescale": False},
        {"image_mean": 0.5, "image_std": 0.5},
    ],
)
def test_config_switches_match_reference(changes):
    config = dict(BLIP2_CONFIG, **changes)
    image = astronaut(64)
    assert_close(ours(image, config), reference(image, config))


def test_config_defaults_are_the_reference_class_defaults():
    defaults = transformers_blip.BlipImageProcessorPil()
    config = ImageProcessorConfig()
    assert config.size == (defaults.size.height, defaults.size.width) == (384, 384)
    assert config.resample == defaults.resample
    assert config.rescale_factor == defaults.rescale_factor
    assert config.image_mean == tuple(defaults.image_mean)
    assert config.image_std == tuple(defaults.image_std)
    assert (config.do_resize, config.do_rescale, config.do_normalize, config.do_convert_rgb) == (True,) * 4


def test_config_from_file(tmp_path):
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps(dict(BLIP2_CONFIG, size={"height": 160, "width": 192})))
    assert ImageProcessorConfig.from_file(path).size == (160, 192)
    assert ImageProcessorConfig.from_dict(BLIP2_CONFIG).size == (224, 224)
    with pytest.raises(InputError, match="missing.json"):
        ImageProcessorConfig.from_file(tmp_path / "missing.json")
    with pytest.raises(InputError):
        ImageProcessorConfig.from_dict({"size": {"max_height": 3, "max_width": 4}})


# --------------------------------------------------------------------------------------------------
# Where we are better than the reference on purpose


def test_exif_orientation_is_applied(tmp_path):
    upright = Image.fromarray(skimage.data.coffee())  # 600 wide, 400 high
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = save(stored, tmp_path / "sideways.jpg", exif=exif)

    loaded = load_image(path)
    assert loaded.size == upright.size
    as_stored = Image.open(path)
    assert as_stored.size == stored.size
    expected = reference(as_stored.transpose(Image.Transpose.ROTATE_270))
    assert_close(ours(path), expected)
    # The reference, given the PIL image, sees it sideways.
    assert (reference(Image.open(path)) - expected).abs().max() > 1.0


def test_sixteen_bit_grey_png_is_not_a_white_page(tmp_path):
    camera = skimage.data.camera()  # uint8
    path16 = save(Image.fromarray(camera.astype(np.uint16) * 257), tmp_path / "camera16.png")
    path8 = save(Image.fromarray(camera), tmp_path / "camera8.png")
    assert Image.open(path16).mode == "I;16"
    # round(v / 257) undoes the usual 8-to-16-bit widening v * 257 exactly; any other 16-bit value is
    # within half an 8-bit step (0.5 / 255) of its true brightness.
    assert_close(ours(path16), ours(path8), atol=0)

    # Why: the reference's convert("RGB") clips every 16-bit value above 255, so all but pure black is white.
    white = ours(Image.new("RGB", camera.shape[::-1], (255, 255, 255)))
    wrong = reference(Image.open(path16))
    assert (wrong == white).float().mean() > 0.99


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I"])
def test_sixteen_bit_modes(mode):
    camera = skimage.data.camera()[:64, :64]
    wide = camera.astype(np.uint16) * 257
    if mode == "I":
        image = Image.fromarray(wide.astype(np.int32))
    else:  # Pillow's convert() between I;16 modes clips at 255, so build from raw bytes
        image = Image.frombytes(
            mode, wide.shape[::-1], wide.astype(">u2" if mode.endswith("B") else "<u2").tobytes()
        )
    assert image.mode == mode
    assert np.array_equal(np.asarray(load_image(image))[..., 0], camera)


def test_sixteen_bit_rounding():
    values = np.array([[0, 128, 129, 257, 65535, 65407]], dtype=np.uint16)
    assert np.asarray(load_image(values))[0, :, 0].tolist() == [0, 0, 1, 1, 255, 255]


def test_float_mode_image():
    camera = skimage.data.camera()[:64, :64]
    unit = Image.fromarray(camera.astype(np.float32) / 255)
    assert unit.mode == "F"
    assert np.array_equal(np.asarray(load_image(unit))[..., 0], camera)
    byte_range = Image.fromarray(camera.astype(np.float32))
    assert np.array_equal(np.asarray(load_image(byte_range))[..., 0], camera)


# --------------------------------------------------------------------------------------------------
# Every input kind gives the same pixels


def test_bytes_pil_and_numpy_inputs_match_path(tmp_path):
    array = skimage.data.astronaut()
    path = save(Image.fromarray(array), tmp_path / "astronaut.png")
    data = path.read_bytes()
    config = ImageProcessorConfig.from_dict(BLIP2_CONFIG)
    expected = preprocess_one(path, config)
    assert expected.shape == (3, 224, 224)
    for source in [str(path), data, bytearray(data), memoryview(data), Image.open(path), array]:
        assert torch.equal(preprocess_one(source, config), expected)


@pytest.mark.parametrize(
    "variant",
    [
        lambda a: a[..., None],
        lambda a: a.astype(np.uint16) * 257,
        lambda a: a.astype(np.float32) / 255,
        lambda a: a.astype(np.float64) / 255,
        lambda a: a.astype(np.int64),
    ],
)
def test_grey_array_dtypes(variant):
    camera = skimage.data.camera()[:64, :64]
    assert np.array_equal(np.asarray(load_image(variant(camera)))[..., 0], camera)


def test_bool_and_rgba_arrays():
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:4] = True
    assert np.array_equal(np.asarray(load_image(mask))[..., 1], mask * 255)
    rgba = np.asarray(_synthetic("RGBA"))
    assert torch.equal(ours(rgba), ours(Image.fromarray(rgba)))


def test_batch_of_mixed_inputs(tmp_path):
    path = save(astronaut(), tmp_path / "a.png")
    batch = ours([path, Image.open(path), np.asarray(Image.open(path))])
    assert batch.shape == (3, 3, 224, 224)
    assert torch.equal(batch[0], batch[1]) and torch.equal(batch[0], batch[2])
    assert_close(ours((path,)), ours(path))


# --------------------------------------------------------------------------------------------------
# Errors name the image


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size but holds no pixel data: cheap to write, huge to decode."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = io.BytesIO()
    astronaut().save(good, format="JPEG")
    files = {
        "missing": tmp_path / "missing.jpg",
        "directory": tmp_path / "folder.jpg",
        "empty": tmp_path / "empty.jpg",
        "truncated": tmp_path / "truncated.jpg",
        "text": tmp_path / "notes.jpg",
        "random": tmp_path / "noise.png",
        "bomb": tmp_path / "bomb.png",
    }
    files["directory"].mkdir()
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    files["text"].write_text("this is not a picture\n")
    files["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    files["bomb"].write_bytes(_png_header(20_000, 10_000))  # 200 Mpx: past PIL's own hard limit
    return files


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "truncated", "text", "random", "bomb"])
def test_bad_files_raise_image_error_naming_the_file(tmp_path, kind):
    path = _bad_files(tmp_path)[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning may leak either
        with pytest.raises(ImageError) as raised:
            load_image(path)
        assert str(path) in str(raised.value)
        assert raised.value.source == str(path)
        with pytest.raises(ImageError, match=path.name):
            load_image(Path(path))


def test_bad_bytes_are_named(tmp_path):
    for data in [b"", b"not an image", _bad_files(tmp_path)["truncated"].read_bytes()]:
        with pytest.raises(ImageError, match="<bytes>"):
            load_image(data)


def test_pixel_limit_is_overridable(tmp_path, monkeypatch):
    path = save(astronaut(), tmp_path / "small.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    for source in [path, path.read_bytes(), Image.open(path), np.asarray(Image.open(path))]:
        with pytest.raises(ImageError, match="decompression-bomb"):
            load_image(source)
    assert load_image(path, max_pixels=128 * 128).size == (128, 128)


def test_pil_warning_range_is_silent_and_still_guarded():
    # 100 Mpx: above PIL's warning threshold, below our limit; the empty file then fails to decode.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match="<bytes>: cannot decode"):
            load_image(_png_header(10_000, 10_000))


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((4, 4, 2), dtype=np.uint8),
        np.zeros((2, 2, 2, 3), dtype=np.uint8),
        np.zeros((5,), dtype=np.uint8),
        np.zeros((0, 4, 3), dtype=np.uint8),
        np.zeros((4, 4, 3), dtype=np.complex64),
        np.full((4, 4), 2.0),
        np.full((4, 4), 300, dtype=np.int32),
    ],
)
def test_bad_arrays_are_named(array):
    with pytest.raises(ImageError, match="<array>"):
        load_image(array)


def test_pil_and_other_inputs_are_named(tmp_path):
    path = save(astronaut(), tmp_path / "a.png")
    truncated = _bad_files(tmp_path)["truncated"]
    with pytest.raises(ImageError, match=str(truncated)):
        load_image(Image.open(truncated))  # an opened file keeps its name
    with pytest.raises(ImageError, match="<int>"):
        load_image(42)
    assert load_image(Image.open(path)).mode == "RGB"


def test_batch_failure_names_the_bad_image(tmp_path):
    good = save(astronaut(), tmp_path / "good.png")
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    with pytest.raises(ImageError, match="bad.jpg"):
        ours([good, bad, good])


def test_empty_batch_is_an_input_error():
    with pytest.raises(InputError):
        ours([])


# --------------------------------------------------------------------------------------------------
# Decoding straight to model size; settings from a checkpoint folder


@pytest.mark.parametrize("size", [{"height": 160, "width": 192}, {"shortest_edge": 150}])
def test_load_resized_gives_the_preprocessed_pixels(tmp_path, size):
    config = ImageProcessorConfig.from_dict(dict(BLIP2_CONFIG, size=size))
    path = save(Image.fromarray(skimage.data.coffee()), tmp_path / "coffee.jpg")  # 400 x 600
    small = images.load_resized(path, config)
    assert small.size == images.output_size(400, 600, config)[::-1]
    assert torch.equal(images.to_tensor(small, config), preprocess_one(path, config))
    assert_close(
        images.to_tensor(small, config)[None], reference(Image.open(path), dict(BLIP2_CONFIG, size=size))
    )


def test_from_checkpoint_matches_what_transformers_saved(checkpoints):
    folder = checkpoints["opt"]
    config = ImageProcessorConfig.from_checkpoint(folder)
    saved = transformers_blip.BlipImageProcessorPil.from_pretrained(folder)
    assert config.size == (saved.size.height, saved.size.width)
    assert (config.image_mean, config.image_std) == (tuple(saved.image_mean), tuple(saved.image_std))
    image = astronaut(64)
    assert_close(preprocess(image, config), saved(image, return_tensors="pt")["pixel_values"])
