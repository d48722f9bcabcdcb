"""The shipped demo model is right on held-out scenes: semantic checks with the issue's thresholds.

The scenes are drawn from the held-out seed sequence (never trained on); every expected value is the scene's
ground truth. `python -m blip2.demo.evaluate` prints the same numbers on more scenes.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import blip2
from blip2.cli import main
from blip2.demo import evaluate, scenes, texts
from blip2.demo.build import SAMPLE_FOLDER, SAMPLES, WEIGHTS

SCENES = 200
# The checks the shipped weights do not pass yet, by score: they stay at the issue's thresholds and are expected
# to fail until a build reaches them. strict: a build that passes one makes its test fail, so that its mark is
# removed. Since session 8's build (benchmarks/RESULTS.md, "Demo model, session 8"), with ask scored on every
# question of each scene, none: a rebuild that falls below a threshold again goes here, with the reason.
NOT_YET: set[str] = set()


@pytest.fixture(scope="module")
def caption_model():
    return blip2.load("demo", "cpu")


@pytest.fixture(scope="module")
def retrieval_model():
    return blip2.load("demo-itm", "cpu")


@pytest.fixture(scope="module")
def heldout():
    scene_list = evaluate.heldout(SCENES)
    return scene_list, evaluate.images(scene_list)


# (what, the score function of blip2.demo.evaluate, the model it reads, the score, the issue's threshold)
CHECKS = [
    ("captions name the shapes and colours", evaluate.caption_scores, "caption_model", "names_objects", 0.9),
    ("ask: colour, shape and count questions", evaluate.ask_scores, "caption_model", "all", 0.9),
    ("match: true vs false captions (AUC)", evaluate.match_scores, "retrieval_model", "auc", 0.95),
    ("search: a matching image first", evaluate.search_scores, "retrieval_model", "top1", 0.9),
]
BELOW = pytest.mark.xfail(strict=True, reason="the shipped demo weights are below the issue's threshold")


@pytest.mark.parametrize(
    "what, scores_of, model, key, threshold",
    [pytest.param(*check, id=check[3], marks=[BELOW] if check[3] in NOT_YET else []) for check in CHECKS],
)
def test_the_issues_semantic_checks(request, heldout, what, scores_of, model, key, threshold):
    scores = scores_of(request.getfixturevalue(model), *heldout)
    print(f"{what}: {scores}")
    assert scores[key] >= threshold


def test_the_weights_fit_the_package_budget():
    total = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert total <= 20 * 1024 * 1024


@pytest.mark.parametrize("index", SAMPLES)
def test_cli_captions_the_shipped_samples(capsys, index):
    """The README's offline quickstart: `blip2 caption --model demo blip2/demo/samples/scene-N.png`, a
    held-out scene."""
    sample = SAMPLE_FOLDER / f"scene-{index}.png"
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", "--model", "demo", "--device", "cpu", str(sample)])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    caption = out.rstrip("\n")  # one image: the caption alone on its line
    assert "\n" not in caption
    # a scene caption: counted coloured shapes (that they are the right ones is what the checks above measure)
    groups = texts.parse_groups(caption)
    assert groups and all(g.shape in scenes.SHAPES for g in groups), caption


def test_the_samples_are_the_heldout_scenes():
    for index in SAMPLES:
        shipped = np.asarray(Image.open(SAMPLE_FOLDER / f"scene-{index}.png"))
        assert np.array_equal(shipped, np.asarray(scenes.render(scenes.scene("heldout", index))))
