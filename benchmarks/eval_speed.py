"""Caption-metric speed at the COCO Karpathy test size (5,000 images, 5 references each): our Python PTB
tokenization and BLEU / ROUGE-L / CIDEr-D against pycocoevalcap's (java tokenizer, its Python scorers), on the
same synthetic captions; the scores are checked equal on the way.

    python benchmarks/eval_speed.py [--images 5000] [--repeats 3]

Best of --repeats for each step (wall clock). Needs pycocoevalcap and java (the `test` extra).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

from blip2.eval.captions import bleu, cider_d, rouge_l
from blip2.eval.tokenize import tokenize

NOUNS = ["skier", "horse", "laptop", "sandwich", "clock tower", "boat", "kitchen", "teddy bear", "umbrella"]
PHRASES = [
    "on a snowy hill",
    "in a field",
    "on a desk",
    "next to the river",
    "under a bridge",
    "by the window",
]


def corpus(images: int, seed: int = 0) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """{image: 5 references}, {image: [candidate]}: short COCO-like sentences with some punctuation."""
    rng = random.Random(seed)

    def sentence() -> str:
        count = rng.choice(["A", "The", "Two", "Some", "an old"])
        mark = rng.choice(["", ".", " .", "!", ", isn't it?", " (left)."])
        return f"{count} {rng.choice(NOUNS)} {rng.choice(PHRASES)}{mark}"

    return {i: [sentence() for _ in range(5)] for i in range(images)}, {
        i: [sentence()] for i in range(images)
    }


def best(repeats: int, fn):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs, cands = corpus(args.images)
    both = {**{("r", k): v for k, v in refs.items()}, **{("c", k): v for k, v in cands.items()}}

    def ours_tokenize():
        return {k: [tokenize(c) for c in v] for k, v in both.items()}

    def java_tokenize():
        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in both.items()})

    rows = []
    t_ours, tokens = best(args.repeats, ours_tokenize)
    t_java, java_tokens = best(args.repeats, java_tokenize)
    assert tokens == java_tokens, "tokenizations differ"
    rows.append(("PTB tokenization (30k captions)", t_ours, t_java))
    gts = {k: tokens["r", k] for k in refs}
    res = {k: tokens["c", k] for k in cands}
    for name, ours, theirs in [
        ("BLEU-1..4", lambda: bleu(gts, res)[0], lambda: Bleu(4).compute_score(gts, res, verbose=0)[0]),
        ("ROUGE-L", lambda: rouge_l(gts, res)[0], lambda: Rouge().compute_score(gts, res)[0]),
        ("CIDEr-D", lambda: cider_d(gts, res)[0], lambda: Cider().compute_score(gts, res)[0]),
    ]:
        t_a, a = best(args.repeats, ours)
        t_b, b = best(args.repeats, theirs)
        assert abs(sum(a) - sum(b) if isinstance(a, list) else a - b) < 1e-12, name
        rows.append((name, t_a, t_b))
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}"
    )
    print(f"| step ({args.images} images x 5 refs) | ours (s) | pycocoevalcap (s) |")
    print("|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:.2f} | {b:.2f} |")


if __name__ == "__main__":
    main()
