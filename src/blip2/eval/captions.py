"""Caption metrics as the COCO caption evaluation (pycocoevalcap) computes them: BLEU-1..4, ROUGE-L, CIDEr-D
(METEOR, which needs java, is in `meteor.py`).

Each metric is a pure function of `refs` {image_id: [reference, ...]} and `cands` {image_id: [candidate]}
(one candidate per image), both already tokenized (`tokenize.tokenize`: lower-cased, tokens one space
apart), over the same image ids; images are taken in the order of `refs`. Each returns the corpus score and
the per-image scores, equal to pycocoevalcap's Bleu, Rouge and Cider to floating-point noise (tested).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

from ..errors import InputError

Refs = Mapping[Hashable, Sequence[str]]
Cands = Mapping[Hashable, Sequence[str]]

# BLEU's smoothing constants (pycocoevalcap's bleu_scorer): a precision with no match is tiny, not zero.
_TINY, _SMALL = 1e-15, 1e-9
ROUGE_BETA = 1.2
CIDER_SIGMA = 6.0


def pairs(refs: Refs, cands: Cands) -> list[tuple[list[str], str]]:
    """(references, candidate) per image in the order of `refs`, checked: the same ids, one candidate each,
    at least one reference."""
    if not refs:
        raise InputError("no images to evaluate")
    if set(refs) != set(cands):
        missing, extra = set(refs) - set(cands), set(cands) - set(refs)
        raise InputError(
            f"references and candidates are for different images ({len(missing)} without a candidate, e.g. "
            f"{sorted(map(str, missing))[:3]}; {len(extra)} without references, e.g. {sorted(map(str, extra))[:3]})"
        )
    out = []
    for key, references in refs.items():
        if len(cands[key]) != 1:
            raise InputError(f"image {key!r}: {len(cands[key])} candidates, expected exactly one")
        if not references:
            raise InputError(f"image {key!r}: no reference caption")
        out.append((list(references), cands[key][0]))
    return out


def ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    """Counts of every 1..n-gram of `words`."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


# -- BLEU ---------------------------------------------------------------------------------------------------
def bleu(refs: Refs, cands: Cands, n: int = 4) -> tuple[list[float], list[list[float]]]:
    """BLEU-1..n (Papineni et al. 2002) as pycocoevalcap: clipped n-gram precisions summed over the corpus,
    their geometric mean, the brevity penalty against the "closest" reference length (the shorter on a tie).
    Returns ([BLEU-1, ..., BLEU-n] of the corpus, per image [[BLEU-k of each image] for k in 1..n])."""
    per_image: list[list[float]] = [[] for _ in range(n)]
    total_correct, total_guess, total_test, total_ref = [0] * n, [0] * n, 0, 0
    for references, candidate in pairs(refs, cands):
        correct, guess, test_len, ref_len = _bleu_counts(
            [r.split() for r in references], candidate.split(), n
        )
        for k, score in enumerate(_bleu_scores(correct, guess, test_len, ref_len)):
            per_image[k].append(score)
        total_correct = [a + b for a, b in zip(total_correct, correct)]
        total_guess = [a + b for a, b in zip(total_guess, guess)]
        total_test, total_ref = total_test + test_len, total_ref + ref_len
    return _bleu_scores(total_correct, total_guess, total_test, total_ref), per_image


def _bleu_counts(
    references: list[list[str]], candidate: list[str], n: int
) -> tuple[list[int], list[int], int, int]:
    """Clipped matches and candidate n-grams per order, candidate length, closest reference length."""
    max_ref: Counter[tuple[str, ...]] = Counter()
    for ref in references:
        max_ref |= ngrams(ref, n)  # the most times each n-gram occurs in one reference
    correct = [0] * n
    for gram, count in ngrams(candidate, n).items():
        correct[len(gram) - 1] += min(max_ref[gram], count)
    guess = [max(0, len(candidate) - k) for k in range(n)]
    ref_len = min((abs(len(r) - len(candidate)), len(r)) for r in references)[1]
    return correct, guess, len(candidate), ref_len


def _bleu_scores(correct: list[int], guess: list[int], test_len: int, ref_len: int) -> list[float]:
    """BLEU-1..n from the counts: cumulative geometric means of smoothed precisions, times the brevity
    penalty exp(1 - r/c) when the candidate is shorter."""
    scores, product = [], 1.0
    for k, (c, g) in enumerate(zip(correct, guess)):
        product *= (c + _TINY) / (g + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


# -- ROUGE-L ------------------------------------------------------------------------------------------------
def rouge_l(refs: Refs, cands: Cands, beta: float = ROUGE_BETA) -> tuple[float, list[float]]:
    """ROUGE-L (Lin 2004) as pycocoevalcap: the F-measure (recall weighted by beta) of the best precision and
    the best recall of the longest common subsequence over the references; the mean over images."""
    scores = [_rouge_l(references, candidate, beta) for references, candidate in pairs(refs, cands)]
    return _mean(scores), scores


def _rouge_l(references: list[str], candidate: str, beta: float) -> float:
    # Split on single spaces, as pycocoevalcap does: an empty caption is one empty token.
    cand = candidate.split(" ")
    lcs = [(_lcs(ref.split(" "), cand), len(ref.split(" "))) for ref in references]
    precision = max(common / len(cand) for common, _ in lcs)
    recall = max(common / length for common, length in lcs)
    if precision == 0 or recall == 0:
        return 0.0
    return ((1 + beta**2) * precision * recall) / (recall + beta**2 * precision)


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, one row)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


# -- CIDEr-D ------------------------------------------------------------------------------------------------
def cider_d(refs: Refs, cands: Cands, sigma: float = CIDER_SIGMA, n: int = 4) -> tuple[float, list[float]]:
    """CIDEr-D (Vedantam et al. 2015) as pycocoevalcap's Cider: per n-gram order, the cosine of TF-IDF
    vectors with the candidate's weights clipped at the reference's, times a Gaussian penalty
    exp(-delta^2 / 2 sigma^2) on the length difference; averaged over orders and references, times 10.
    Document frequencies come from the references of the evaluated images (so a score depends on the set)."""
    items = [
        ([ngrams(r.split(), n) for r in references], ngrams(c.split(), n))
        for references, c in pairs(refs, cands)
    ]
    frequency: Counter[tuple[str, ...]] = Counter()
    for references, _ in items:
        frequency.update({gram for counts in references for gram in counts})
    log_images = math.log(float(len(items)))
    scores = []
    for references, candidate in items:
        vec, norm, length = _tfidf(candidate, frequency, log_images, n)
        total = [0.0] * n
        for reference in references:
            ref_vec, ref_norm, ref_length = _tfidf(reference, frequency, log_images, n)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(w, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and ref_norm[k] != 0:
                    dot /= norm[k] * ref_norm[k]
                total[k] += dot * penalty
        scores.append(sum(total) / n / len(references) * 10.0)
    return _mean(scores), scores


def _tfidf(
    counts: Counter[tuple[str, ...]], frequency: Counter[tuple[str, ...]], log_images: float, n: int
) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
    """Per order, the TF-IDF weights {n-gram: tf * (log #images - log df)} and their norm, and the "length".

    The length is the number of bigrams, not of words: pycocoevalcap counts `n == 1` with n the order minus
    one. It differs from the word count only for captions of 0 or 1 word; we keep it, to give its scores."""
    vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
    squares = [0.0] * n
    for gram, tf in counts.items():
        weight = float(tf) * (log_images - math.log(max(1.0, frequency[gram])))
        vec[len(gram) - 1][gram] = weight
        squares[len(gram) - 1] += weight**2
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vec, [math.sqrt(s) for s in squares], length


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")
