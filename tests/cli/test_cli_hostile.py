"""The real `blip2` command on hostile inputs: every bad input ends in one error line (stderr, or a JSON error
line), the right exit code, never an internal error; the good inputs of the same run are still processed; and
whatever the file names hold, every output line is valid UTF-8 that reads back to the exact name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from blip2.cli import main
from blip2.embeddings_io import path_from_fields, read_embeddings

# Good pictures under names that break naive output: a newline, a tab, bytes that are not UTF-8, a backslash.
ODD_GOOD_NAMES = [
    b"new\nline.jpg",
    b"tab\there.jpg",
    b"caf\xe9.jpg",
    b"back\\xe9slash.jpg",
    b"\xe2\x80\xa8sep.jpg",
]


def run(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    out.encode("utf-8"), err.encode("utf-8")  # what reaches the terminal is valid UTF-8
    assert "Traceback" not in err and "internal error" not in err
    return exit_info.value.code, out, err


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size and holds no pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, photos):
    """(name, good) in the order given to the command: good photos, some under odd names, among bad inputs."""
    root = tmp_path_factory.mktemp("hostile")
    raw = os.fsencode(root)
    data = photos[0].read_bytes()
    bad_files = {
        b"truncated.jpg": data[: len(data) // 3],
        b"empty.jpg": b"",
        b"notes.jpg": b"not an image\n",
        b"random.png": os.urandom(2048),
        b"\xff\nbad name.jpg": b"not an image either",
        b"bomb.png": png_header(100_000, 100_000),  # 10 gigapixels claimed in a few bytes
    }
    for name, content in bad_files.items():
        with open(raw + b"/" + name, "wb") as f:
            f.write(content)
    for name in ODD_GOOD_NAMES:
        with open(raw + b"/" + name, "wb") as f:
            f.write(data)
    os.mkdir(raw + b"/folder.jpg")
    os.mkfifo(raw + b"/fifo.jpg")
    named = lambda names, good: [(os.fsdecode(raw + b"/" + n), good) for n in names]  # noqa: E731
    return [
        (str(photos[1]), True),
        *named(list(bad_files), False),
        *named(ODD_GOOD_NAMES, True),
        *named([b"missing.jpg", b"folder.jpg", b"fifo.jpg"], False),
        ("", False),
        (str(photos[2]), True),
    ]


def names(inputs, good=None):
    return [name for name, ok in inputs if good is None or ok == good]


@pytest.mark.parametrize("command", ["caption", "similarity", "embed"])
def test_json_lines_name_every_input_exactly(
    capsys, checkpoints, retrieval_checkpoints, inputs, tmp_path, command
):
    args = {
        "caption": ["-m", str(checkpoints["opt"]), "--beams", "1", "--max-new-tokens", "4"],
        "similarity": ["-m", str(retrieval_checkpoints["plain"]), "-t", "a cat"],
        "embed": ["-m", str(retrieval_checkpoints["plain"]), "-o", str(tmp_path / "E.npy")],
    }[command]
    code, out, err = run(capsys, command, *names(inputs), *args, "--json", "--batch-size", "3")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert [path_from_fields(line, "stdout") for line in lines] == names(inputs)
    assert ["error" not in line for line in lines] == [ok for _, ok in inputs]
    if command == "embed":
        paths, array = read_embeddings(tmp_path / "E.npy")
        assert paths == names(inputs, good=True) and len(array) == len(paths)


@pytest.mark.parametrize("command", ["caption", "similarity"])
def test_plain_output_keeps_one_line_per_image_and_its_columns(
    capsys, checkpoints, retrieval_checkpoints, inputs, command
):
    args = {
        "caption": ["-m", str(checkpoints["t5"]), "--beams", "1", "--max-new-tokens", "4"],
        "similarity": ["-m", str(retrieval_checkpoints["plain"]), "-t", "a\tcat", "-t", "a\ndog"],
    }[command]
    code, out, err = run(capsys, command, *names(inputs), *args)
    lines = out.splitlines()
    if command == "similarity":
        assert lines.pop(0) == "image\ta\\tcat\ta\\ndog"
    assert code == 1
    assert len(lines) == len(names(inputs, good=True))
    assert all(len(line.split("\t")) == (2 if command == "caption" else 3) for line in lines)
    assert lines[1].startswith("/") and "new\\nline.jpg\t" in lines[1]
    assert "caf\\xe9.jpg" in out and "back\\\\xe9slash.jpg" in out  # a literal backslash is escaped
    assert "\\u2028sep.jpg" in out
    errors = err.splitlines()
    assert len(errors) == len(names(inputs, good=False)) and all(
        e.startswith("blip2: error: ") for e in errors
    )


@pytest.mark.parametrize("command", ["ask", "match", "classify"])
@pytest.mark.parametrize("bad", [b"notes.jpg", b"folder.jpg", b"fifo.jpg", b"", b"\xff\nbad name.jpg"])
def test_one_image_commands_report_a_bad_image(
    capsys, checkpoints, retrieval_checkpoints, inputs, command, bad
):
    image = next(name for name, _ in inputs if os.fsencode(os.path.basename(name)) == bad)
    args = {
        "ask": [image, "what is it?", "-m", str(checkpoints["opt"])],
        "match": [image, "a cat", "-m", str(retrieval_checkpoints["plain"])],
        "classify": [image, "--labels", "cat,dog", "-m", str(retrieval_checkpoints["plain"])],
    }[command]
    code, out, err = run(capsys, command, *args)
    assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith("blip2: error: ")


def test_non_utf8_argv_bytes_in_a_real_process(checkpoints, inputs):
    """Bytes on the command line, as a shell passes them: the output is still UTF-8 JSON, exact names back."""
    odd = [os.fsencode(name) for name, ok in inputs if ok and b"\xe9" in os.fsencode(name)]
    command = [sys.executable, "-m", "blip2", "caption", *odd, "-m", str(checkpoints["opt"]), "--json"]
    result = subprocess.run(
        [*command, "--beams", "1", "--max-new-tokens", "4"], capture_output=True, timeout=120, env=_utf8_env()
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.decode("utf-8").splitlines()]
    assert [os.fsencode(path_from_fields(line, "stdout")) for line in lines] == odd
    assert "image_bytes" in lines[0] and "caf\\xe9.jpg" in lines[0]["image"]


def _utf8_env() -> dict:
    return {**os.environ, "PYTHONUTF8": "1", "LC_ALL": "C.UTF-8"}


# -- usage errors: exit 2, one line, before any work where possible ---------------------------------------------
SURROGATE = os.fsdecode(b"caf\xe9?")  # a command-line argument that is not UTF-8


def usage_errors(photo, opt, retrieval, tmp):
    """(argv, what the message names) for bad options, arguments and values."""
    return [
        (["caption", photo, "--device", "foo"], "--device"),
        (["caption", photo, "--device", "cuda:99"], "--device"),
        (["caption", photo, "--beams", "abc"], "--beams"),
        (["caption", photo, "--batch-size", "0"], "--batch-size"),
        (["caption", photo, "--temperature", "warm"], "--temperature"),
        (["caption", photo, "--seed", "1.5"], "--seed"),
        (["caption", photo, "--frobnicate"], "--frobnicate"),
        (["caption"], "IMAGES"),
        (["caption", photo, "-m", "/nowhere", "--dtype", "float8"], "float8"),
        (["caption", photo, "-m", opt, "--top-p", "3", "--sample"], "top_p"),
        (["caption", photo, "-m", opt, "--seed", "99999999999999999999999", "--sample"], "seed"),
        (["caption", photo, "-m", opt, "--temperature", "inf", "--sample"], "temperature"),
        (["caption", photo, "-m", opt, "--length-penalty", "nan"], "length_penalty"),
        (["caption", photo, "-m", opt, "--repetition-penalty", "inf"], "repetition_penalty"),
        (
            ["caption", photo, "-m", opt, "--min-new-tokens", "200", "--max-new-tokens", "300"],
            "max_new_tokens=300",
        ),
        (["caption", photo, "--prompt", SURROGATE], "--prompt"),
        (["ask", photo, SURROGATE], "QUESTIONS"),
        (["ask", photo, "  "], "QUESTIONS"),
        (["ask", photo, "what?", "-m", opt, "--template", "no slot"], "no slot"),
        (["ask", photo, "what?", "--template", SURROGATE], "--template"),
        (["match", photo, SURROGATE], "TEXTS"),
        (["similarity", photo, "-t", SURROGATE], "--text"),
        (["classify", photo, "--labels", " , ,"], "--labels"),
        (["classify", photo, "--labels", SURROGATE], "--labels"),
        (["embed", photo, "-o", f"{tmp}/E.csv"], ".npy or .parquet"),
        (["embed", photo, "-o", tmp], "is a directory"),
        (["embed", photo, "-o", f"{tmp}/no/such/folder/E.npy"], "does not exist"),
    ]


def test_usage_errors_are_one_line_exit_2(capsys, checkpoints, retrieval_checkpoints, photos, tmp_path):
    cases = usage_errors(
        str(photos[0]), str(checkpoints["opt"]), str(retrieval_checkpoints["plain"]), tmp_path
    )
    for argv, named in cases:
        code, out, err = run(capsys, *argv)
        assert (code, out, err.count("\n")) == (2, "", 1), (argv, err)
        assert err.startswith("blip2: error: ") and named in err, (argv, err)
    assert os.listdir(tmp_path) == []


def test_output_closed_early_is_not_an_error(retrieval_checkpoints, photos):
    """`blip2 similarity ... | head -1`: the command stops quietly when its reader goes away (click's exit 1)."""
    images = [str(photos[i % len(photos)]) for i in range(200)]
    command = [sys.executable, "-m", "blip2", "similarity", *images, "-t", "a cat", "--batch-size", "1"]
    process = subprocess.Popen(
        [*command, "-m", str(retrieval_checkpoints["plain"])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_utf8_env(),
    )
    assert process.stdout.readline().startswith(b"image\t")
    process.stdout.close()  # as head does after its line
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 1 and stderr == ""
