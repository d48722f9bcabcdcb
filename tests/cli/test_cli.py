"""The real `blip2` command on tiny checkpoints: output format, bad images, exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import blip2
from blip2.cli import main


def run(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("bad")
    data = photos[0].read_bytes()
    files = {
        "truncated.jpg": data[: len(data) // 3],
        "empty.jpg": b"",
        "notes.jpg": b"this is not an image at all\n",
        "random.png": os.urandom(2048),
    }
    for name, content in files.items():
        (root / name).write_bytes(content)
    return {name: str(root / name) for name in files} | {"missing.jpg": str(root / "missing.jpg")}


def test_caption_json_one_line_per_image_in_order(capsys, checkpoints, photos, bad_images):
    good = [str(p) for p in photos[:2]]
    inputs = [
        good[0],
        bad_images["truncated.jpg"],
        bad_images["empty.jpg"],
        bad_images["notes.jpg"],
        bad_images["random.png"],
        bad_images["missing.jpg"],
        good[1],
    ]
    code, out, err = run(
        capsys,
        "caption",
        *inputs,
        "--model",
        str(checkpoints["opt"]),
        "--json",
        "--beams",
        "2",
        "--max-new-tokens",
        "8",
    )
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert [line["image"] for line in lines] == inputs
    assert "caption" in lines[0] and "caption" in lines[-1]
    for line in lines[1:-1]:
        assert set(line) == {"image", "error"} and os.path.basename(line["image"]) in line["error"]
    assert "Traceback" not in err


def test_caption_matches_library(capsys, checkpoints, photos):
    model = blip2.load(checkpoints["opt"])
    expected = model.caption([str(p) for p in photos[:3]], prompt="a photo of", num_beams=3, max_new_tokens=8)
    code, out, _ = run(
        capsys,
        "caption",
        *map(str, photos[:3]),
        "-m",
        str(checkpoints["opt"]),
        "--prompt",
        "a photo of",
        "--beams",
        "3",
        "--max-new-tokens",
        "8",
        "--batch-size",
        "2",
    )
    assert code == 0
    assert [line.split("\t", 1)[1] for line in out.splitlines()] == expected


def test_plain_errors_go_to_stderr_one_line(capsys, checkpoints, photos, bad_images):
    code, out, err = run(
        capsys,
        "caption",
        str(photos[0]),
        bad_images["truncated.jpg"],
        "-m",
        str(checkpoints["t5"]),
        "--beams",
        "1",
        "--max-new-tokens",
        "5",
    )
    assert code == 1
    assert len(out.splitlines()) == 1 and out.startswith(str(photos[0]))
    assert err.count("\n") == 1 and "truncated.jpg" in err and "Traceback" not in err


def test_ask_json(capsys, checkpoints, photos):
    model = blip2.load(checkpoints["opt"])
    questions = ["what is it?", "how many dogs are there?"]
    expected = model.ask(str(photos[0]), questions)
    code, out, _ = run(capsys, "ask", str(photos[0]), *questions, "-m", str(checkpoints["opt"]), "--json")
    assert code == 0
    (line,) = [json.loads(x) for x in out.splitlines()]
    assert line == {
        "image": str(photos[0]),
        "answers": [{"question": q, "answer": a} for q, a in zip(questions, expected)],
    }


def test_ask_bad_image(capsys, checkpoints, bad_images):
    code, out, err = run(capsys, "ask", bad_images["notes.jpg"], "what?", "-m", str(checkpoints["opt"]))
    assert code == 1 and out == "" and "notes.jpg" in err and "Traceback" not in err


def test_model_from_environment(capsys, checkpoints, photos, monkeypatch):
    monkeypatch.setenv("BLIP2_MODEL", str(checkpoints["t5"]))
    code, out, _ = run(capsys, "caption", str(photos[0]), "--json", "--beams", "1", "--max-new-tokens", "4")
    assert code == 0 and "caption" in json.loads(out)


def test_missing_model_is_one_clear_line(capsys, photos, tmp_path):
    code, out, err = run(capsys, "caption", str(photos[0]), "-m", str(tmp_path / "nowhere"))
    assert code == 1 and out == ""
    assert "nowhere" in err and "Traceback" not in err and err.count("\n") == 1


def test_offline_repo_id_says_how_to_get_it(capsys, photos, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    code, _, err = run(capsys, "caption", str(photos[0]), "-m", "Salesforce/blip2-opt-2.7b")
    assert code == 1
    assert "Salesforce/blip2-opt-2.7b" in err and "--local-dir" in err and "Traceback" not in err


def test_bad_option_values(capsys, checkpoints, photos):
    code, _, err = run(
        capsys, "caption", str(photos[0]), "-m", str(checkpoints["opt"]), "--top-p", "3", "--sample"
    )
    assert code == 2 and "top_p" in err and "Traceback" not in err
    code, _, err = run(capsys, "caption", str(photos[0]), "--beams", "0")
    assert code == 2 and "Traceback" not in err


def test_python_dash_m(checkpoints, photos):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "blip2",
            "caption",
            str(photos[0]),
            "-m",
            str(checkpoints["opt"]),
            "--json",
            "--beams",
            "1",
            "--max-new-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["image"] == str(photos[0])


# -- matching commands (retrieval checkpoints) -----------------------------------------------------------------
def test_match_json_equals_library(capsys, retrieval_checkpoints, photos):
    path = str(retrieval_checkpoints["plain"])
    texts = ["a cat on a couch", "two dogs"]
    expected = blip2.load(path).match(str(photos[0]), texts)
    code, out, _ = run(capsys, "match", str(photos[0]), *texts, "-m", path, "--json")
    assert code == 0
    line = json.loads(out)
    assert line["image"] == str(photos[0])
    assert [m["text"] for m in line["matches"]] == texts
    assert [m["probability"] for m in line["matches"]] == pytest.approx(expected, abs=1e-6)


def test_similarity_lines_per_image_with_bad_one(capsys, retrieval_checkpoints, photos, bad_images):
    path = str(retrieval_checkpoints["plain"])
    inputs = [str(photos[0]), bad_images["empty.jpg"], str(photos[1])]
    expected = blip2.load(path).similarity([str(photos[0]), str(photos[1])], ["a cat", "a dog"])
    code, out, err = run(capsys, "similarity", *inputs, "-t", "a cat", "-t", "a dog", "-m", path, "--json")
    lines = [json.loads(x) for x in out.splitlines()]
    assert code == 1 and [x["image"] for x in lines] == inputs and "error" in lines[1]
    assert [s["score"] for s in lines[0]["scores"]] == pytest.approx(expected[0].tolist(), abs=1e-6)
    assert [s["score"] for s in lines[2]["scores"]] == pytest.approx(expected[1].tolist(), abs=1e-6)
    assert "Traceback" not in err


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_embed_writes_rows_with_paths(capsys, retrieval_checkpoints, photos, bad_images, tmp_path, suffix):
    from blip2.embeddings_io import read_embeddings

    path = str(retrieval_checkpoints["plain"])
    out_file = tmp_path / f"vectors{suffix}"
    inputs = [str(photos[0]), bad_images["notes.jpg"], str(photos[2])]
    code, out, err = run(capsys, "embed", *inputs, "-m", path, "--out", str(out_file), "--batch-size", "2")
    assert code == 1 and "notes.jpg" in err
    paths, array = read_embeddings(out_file)
    assert paths == [str(photos[0]), str(photos[2])]
    expected = blip2.load(path).embed_images([str(photos[0]), str(photos[2])])["image_embeds_proj"]
    assert array.shape == tuple(expected.shape)
    assert abs(array - expected.numpy()).max() < 1e-5


def test_embed_refuses_unknown_format_before_work(capsys, photos, tmp_path):
    code, _, err = run(capsys, "embed", str(photos[0]), "--out", str(tmp_path / "x.csv"), "-m", "/nowhere")
    assert code == 2 and ".npy or .parquet" in err


def test_classify(capsys, retrieval_checkpoints, photos):
    path = str(retrieval_checkpoints["plain"])
    expected = blip2.load(path).classify(str(photos[0]), ["cat", "dog", "car"])
    code, out, _ = run(capsys, "classify", str(photos[0]), "--labels", "cat, dog,car", "-m", path, "--json")
    assert code == 0
    ranked = json.loads(out)["labels"]
    assert [r["label"] for r in ranked] == [r["label"] for r in expected]
    assert sum(r["probability"] for r in ranked) == pytest.approx(1.0, abs=1e-5)


def test_matching_on_captioning_checkpoint_is_a_clear_error(capsys, checkpoints, photos):
    code, out, err = run(capsys, "match", str(photos[0]), "a cat", "-m", str(checkpoints["opt"]))
    assert code == 1 and out == "" and "blip2-itm-vit-g" in err and "Traceback" not in err


def test_caption_on_retrieval_checkpoint_is_a_clear_error(capsys, retrieval_checkpoints, photos):
    code, _, err = run(capsys, "caption", str(photos[0]), "-m", str(retrieval_checkpoints["plain"]))
    assert code == 1 and "no language model" in err and "Traceback" not in err


def test_tiny_checkpoint_command_writes_a_loadable_checkpoint(tmp_path, photos, capsys):
    from blip2.testing import main as write_tiny

    write_tiny([str(tmp_path / "tiny"), "--kind", "instructblip-llama"])
    assert "tiny" in capsys.readouterr().out
    model = blip2.load(tmp_path / "tiny")
    assert model.instruct and model.family == "llama"
    assert isinstance(model.ask(photos[0], "what is it?", num_beams=1), str)


# -- the same output as the library, for every checkpoint kind ---------------------------------------------------
@pytest.fixture(scope="module")
def every_kind(checkpoints, instruct_checkpoints):
    return {
        "opt": checkpoints["opt"],
        "t5": checkpoints["t5"],
        **{f"instructblip-{lm}": path for lm, path in instruct_checkpoints.items()},
    }


@pytest.mark.parametrize("kind", ["opt", "t5", "instructblip-opt", "instructblip-t5", "instructblip-llama"])
def test_caption_and_ask_json_equal_the_library(capsys, every_kind, photos, kind):
    path = str(every_kind[kind])
    model = blip2.load(path)
    images = [str(p) for p in photos[:2]]
    questions = ["what is it?", "is it red?", "where?"]
    options = ["--beams", "2", "--max-new-tokens", "6", "-m", path, "--json", "--batch-size", "2"]
    code, out, _ = run(capsys, "caption", *images, *options)
    assert code == 0
    expected = model.caption(images, num_beams=2, max_new_tokens=6)
    assert [json.loads(line)["caption"] for line in out.splitlines()] == expected
    code, out, _ = run(capsys, "ask", images[0], *questions, *options)
    assert code == 0
    expected = model.ask(images[0], questions, num_beams=2, max_new_tokens=6)
    assert [a["answer"] for a in json.loads(out)["answers"]] == expected


def test_ask_runs_batch_size_questions_per_pass_and_encodes_once(capsys, checkpoints, photos, monkeypatch):
    from blip2 import images as image_io
    from blip2.tasks.api import Blip2

    path = str(checkpoints["opt"])
    questions = [f"question number {i}?" for i in range(7)]
    expected = blip2.load(path).ask(str(photos[0]), questions, num_beams=1)
    passes, encoded, reads = [], [], []
    generate_text, encode_vision, load_image = (
        Blip2.generate_from_embeds,
        Blip2.encode_vision,
        image_io.load_image,
    )
    monkeypatch.setattr(
        Blip2, "generate_from_embeds", lambda self, *a: passes.append(len(a[2])) or generate_text(self, *a)
    )
    monkeypatch.setattr(
        Blip2, "encode_vision", lambda self, p: encoded.append(len(p)) or encode_vision(self, p)
    )
    monkeypatch.setattr(
        image_io, "load_image", lambda source, **k: reads.append(source) or load_image(source, **k)
    )
    code, out, _ = run(
        capsys, "ask", str(photos[0]), *questions, "-m", path, "--beams", "1", "--batch-size", "3"
    )
    assert code == 0
    assert passes == [3, 3, 1]
    assert encoded == [1]  # the vision tower ran once for the image, not once per pass
    assert [r for r in reads if isinstance(r, str)] == [str(photos[0])]
    assert [line.split("\t", 1)[1] for line in out.splitlines()] == expected


@pytest.mark.parametrize("command", ["embed", "similarity"])
def test_batches_hold_model_size_images_and_results_do_not_change(
    capsys, retrieval_checkpoints, photos, monkeypatch, tmp_path, command
):
    from blip2.embeddings_io import read_embeddings
    from blip2.tasks.api import Blip2

    path = str(retrieval_checkpoints["plain"])
    images = [str(p) for p in photos]  # different sizes, one odd-sized
    model = blip2.load(path)
    height, width = model.image_config.size
    expected = {
        "embed": model.embed_images(images)["image_embeds_proj"].numpy(),
        "similarity": model.similarity(images, "a cat")[:, 0].tolist(),
    }[command]
    method = {"embed": "embed_images", "similarity": "similarity"}[command]
    original, sizes = getattr(Blip2, method), []
    monkeypatch.setattr(
        Blip2, method, lambda self, imgs, *a: sizes.extend(i.size for i in imgs) or original(self, imgs, *a)
    )
    common = [*images, "-m", path, "--batch-size", "5"]
    if command == "embed":
        code, _, _ = run(capsys, "embed", *common, "-o", str(tmp_path / "E.npy"))
        assert np.array_equal(read_embeddings(tmp_path / "E.npy")[1], expected)
    else:
        code, out, _ = run(capsys, "similarity", *common, "-t", "a cat", "--json")
        assert [json.loads(line)["scores"][0]["score"] for line in out.splitlines()] == expected
    assert code == 0
    assert sizes == [(width, height)] * len(images)


# -- embed: the destination first, rows as they come, nothing stale ---------------------------------------------
def test_embed_upper_case_extension_and_rewrite(capsys, retrieval_checkpoints, photos, tmp_path):
    from blip2.embeddings_io import read_embeddings

    path, out = str(retrieval_checkpoints["plain"]), tmp_path / "E.NPY"
    assert run(capsys, "embed", *map(str, photos[:3]), "-m", path, "-o", str(out))[0] == 0
    assert run(capsys, "embed", str(photos[3]), "-m", path, "-o", str(out))[0] == 0
    paths, array = read_embeddings(out)
    assert paths == [str(photos[3])] and len(array) == 1
    assert sorted(os.listdir(tmp_path)) == ["E.NPY", "E.NPY.paths.jsonl"]


def test_embed_refuses_a_bad_destination_before_loading(capsys, photos, tmp_path):
    (tmp_path / "folder.npy").mkdir()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)  # root can still write there: /sys is a folder nobody may create files in
    unwritable = locked if os.geteuid() else "/sys"
    for out, message in [
        (tmp_path / "folder.npy", "is a directory"),
        (f"{unwritable}/E.npy", "cannot write in"),
    ]:
        code, _, err = run(capsys, "embed", str(photos[0]), "-o", str(out), "-m", str(tmp_path / "nowhere"))
        assert code == 2 and message in err and err.count("\n") == 1  # 1 would mean the model was looked for


def test_embed_with_no_good_image_leaves_no_stale_file(
    capsys, retrieval_checkpoints, photos, bad_images, tmp_path
):
    path, out = str(retrieval_checkpoints["plain"]), tmp_path / "E.npy"
    assert run(capsys, "embed", str(photos[0]), "-m", path, "-o", str(out))[0] == 0
    code, _, err = run(capsys, "embed", bad_images["notes.jpg"], "-m", path, "-o", str(out))
    assert code == 1 and "no embeddings written" in err and os.listdir(tmp_path) == []


@pytest.mark.parametrize("stop, code", [(KeyboardInterrupt, 130), (RuntimeError("boom"), 3)])
def test_embed_stopped_mid_run_keeps_the_rows_printed(
    capsys, retrieval_checkpoints, photos, tmp_path, monkeypatch, stop, code
):
    from blip2.embeddings_io import read_embeddings
    from blip2.tasks.api import Blip2

    path, out = str(retrieval_checkpoints["plain"]), tmp_path / "E.npy"
    calls, embed_images = [], Blip2.embed_images

    def embed_then_stop(self, images):
        calls.append(1)
        if len(calls) == 3:
            raise stop
        return embed_images(self, images)

    monkeypatch.setattr(Blip2, "embed_images", embed_then_stop)
    images = [str(p) for p in photos]
    exit_code, stdout, err = run(
        capsys, "embed", *images, "-m", path, "-o", str(out), "--json", "--batch-size", "1"
    )
    printed = [json.loads(line) for line in stdout.splitlines()]
    assert exit_code == code and [p["row"] for p in printed] == [0, 1]
    assert "stopped early: wrote 2 embeddings" in err and "Traceback" not in err
    paths, array = read_embeddings(out)
    assert paths == [p["image"] for p in printed] == images[:2] and len(array) == 2
    assert sorted(os.listdir(tmp_path)) == ["E.npy", "E.npy.paths.jsonl"]


def test_embed_ctrl_c_in_a_real_process(retrieval_checkpoints, photos, tmp_path):
    import signal

    from blip2.embeddings_io import read_embeddings

    out = tmp_path / "E.npy"
    images = [str(photos[i % len(photos)]) for i in range(400)]
    command = [sys.executable, "-m", "blip2", "embed", *images, "-m", str(retrieval_checkpoints["plain"])]
    process = subprocess.Popen(
        [*command, "-o", str(out), "--json", "--batch-size", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # SIGINT as a terminal's Ctrl-C delivers it, even where this test runs with it ignored (started in the
        # background by a shell without job control), which the child would inherit
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    printed = [process.stdout.readline()]  # the first row is written: interrupt the run
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    printed += stdout.splitlines()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    paths, array = read_embeddings(out)
    assert 1 <= len(paths) < len(images)
    assert paths == [json.loads(line)["image"] for line in printed] and len(array) == len(paths)


# -- errors: one line, exit 2, before the model loads ---------------------------------------------------------
@pytest.mark.parametrize("device", ["foo", "cuda:99", "meta", "cuda"])
def test_bad_device_is_a_usage_error_before_loading(capsys, photos, tmp_path, device):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = run(
        capsys, "caption", str(photos[0]), "--device", device, "-m", str(tmp_path / "nowhere")
    )
    assert code == 2 and out == "" and "--device" in err and "nowhere" not in err
    assert "Traceback" not in err and "internal error" not in err


def test_help_lists_the_exit_codes(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for line in [
        "0    every input",
        "1    some inputs failed",
        "2    usage error",
        "3    internal error",
        "130  ",
    ]:
        assert line in out


def test_cli_checks_the_options_once_and_passes_them_on(capsys, checkpoints, photos, monkeypatch):
    """The flags become one GenerationOptions before the model loads; the task takes it as is."""
    from blip2.generation import GenerationOptions

    checks: list = []
    validate = GenerationOptions.validate
    monkeypatch.setattr(GenerationOptions, "validate", lambda self: checks.append(1) or validate(self))
    images = [str(p) for p in photos[:2]]
    code, _, _ = run(
        capsys, "caption", *images, "-m", str(checkpoints["opt"]), "--beams", "2", "--max-new-tokens", "3"
    )
    assert code == 0 and checks == [1]
