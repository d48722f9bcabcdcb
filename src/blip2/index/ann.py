"""The index's ANN stage: FAISS IVF-PQ fast-scan over every image's flattened query vectors, and `search`.

Each image contributes its Q vectors (Q = 32 in the released checkpoints) under the ids slot * Q + q. A query
asks for its best `n_vectors` vector hits; their images are the candidates, which the exact stage re-scores
from the stored fp16 vectors (`exact.maxsim`). The ANN's approximate, 4-bit quantised scores only choose the
candidates, never the order: near-ties are common (the 10th and 11th best images of a million often differ by
~0.001), and quantised scores alone would lose several recall points.

faiss is an optional dependency (the `index` extra), imported when an ANN is built or loaded. The ANN is a
cache of the vectors file: `AnnIndex.load` returns None for anything it cannot trust (absent, checksum or
dimension mismatch, unreadable, implausibly large), and the caller rebuilds it or searches by brute force.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Blip2Error, InputError
from ..files import read_json
from .exact import maxsim, top_k

# Below this many images the index is exact brute force, without an ANN.
BRUTE_FORCE_BELOW = 10_000
# Vector hits per query row: their images are the candidates. With every candidate re-scored, recall@10 on
# the benchmark's anisotropic ("blip2") vectors at 100k was 0.978 / 0.989 / 0.996 with 500 / 1,000 / 2,000
# hits at a quarter of the lists (RESULTS.md, session 5); 2,000 costs ~2x the candidates to re-score.
VECTOR_HITS = 2000
# ... and more in larger indexes: with ten times the images, ten times as many lie within the 4-bit codes'
# error of the 10th best score. At 1M, 2,000 hits gave recall@10 0.952 / 0.967 (lowrank / blip2 geometry),
# 8,000 gave 0.996 / 0.989 (RESULTS.md, session 6): one hit per IMAGES_PER_HIT images, at least VECTOR_HITS.
IMAGES_PER_HIT = 125


def vector_hits(n_images: int) -> int:
    """The default vector hits per query row for an index of `n_images`: VECTOR_HITS up to 250,000 images,
    then one per IMAGES_PER_HIT (8,000 at a million)."""
    return max(VECTOR_HITS, n_images // IMAGES_PER_HIT)


ANN_FILE, ANN_META = "ann.faiss", "ann.json"
FORMAT = "blip2-ann/1"
INSTALL_HINT = "pip install 'blip2[index]'"


@dataclass(frozen=True)
class AnnParams:
    """How the ANN is built and searched (the defaults: benchmarks/index_speed.py, RESULTS.md).

    nlist: inverted lists (None: chosen from the number of vectors by `nlist_for`); m: PQ sub-quantizers of 4
    bits (m / 2 bytes per vector); nprobe: lists scanned per query vector (None: a quarter of them, which
    recall@10 >= 0.99 needed on the benchmark's synthetic vectors); train_size: vectors sampled to
    train the coarse centroids and the PQ codebooks; hnsw: neighbours per node of an HNSW coarse quantizer (0:
    exact assignment by one matrix product, which is what the build spends its time on: ~nlist x D
    multiply-adds per vector); seed: of the training sample; rescore: how many candidate images `search`
    re-scores exactly, the best by approximate score (None: all of them, at most one per vector hit).

    Fewer, larger lists (2048 at a million images rather than the feasibility run's 8192) make the build ~4x
    cheaper; recall depends on the fraction of lists probed, which depends on the data: the feasibility run's
    vectors needed 64 of 8192, the benchmark's harder (isotropic) ones a quarter (RESULTS.md). m = 32 (16
    bytes per vector) halves the scan, the RAM and the build cost, with the same recall at 100k but 1-1.5
    points less at 1M (0.982 against 0.994 at nprobe 512): 64 is the default, for recall.

    Re-scoring every candidate (~4 µs per image: ~800-1,000 images with 1,000 hits at 100k) rather than the
    best 200 by their 4-bit score is what recall@10 >= 0.99 needs on the anisotropic ("blip2") benchmark
    geometry (0.942 -> 0.989 at 300k): there the codes' error is large against the small differences between
    images. PQ32 loses most of the recall there (0.40 at 100k, session 5): not an option for such data."""

    nlist: int | None = None
    m: int = 64
    nprobe: int | None = None
    train_size: int = 131_072
    hnsw: int = 0
    seed: int = 0
    rescore: int | None = None

    def nlist_for(self, n_vectors: int) -> int:
        """The number of lists for `n_vectors`: the power of two nearest sqrt(n) / 2 within [16, 2048], and
        at most one per ~40 training vectors (faiss's k-means warns below 39)."""
        if self.nlist is not None:
            return self.nlist
        target = math.sqrt(max(n_vectors, 1)) / 2
        nlist = 2 ** round(math.log2(max(target, 16)))
        cap = max(16, min(self.train_size, n_vectors) // 40)
        return int(min(nlist, 2048, 2 ** int(math.log2(cap))))

    def factory(self, nlist: int | None) -> str:
        quantizer = f"_HNSW{self.hnsw}" if self.hnsw else ""
        return f"IVF{nlist}{quantizer},PQ{self.m}x4fs"


def _faiss() -> Any:
    """The faiss module, with its OpenMP threads set to torch's (what the rest of blip2 uses)."""
    try:
        import faiss
    except ImportError:
        raise Blip2Error(
            f"the search index's ANN stage needs faiss, which is not installed: {INSTALL_HINT}"
        ) from None
    import torch

    faiss.omp_set_num_threads(max(1, torch.get_num_threads()))
    return faiss


class AnnIndex:
    """FAISS IVF-PQ fast-scan (inner product) over the flattened query vectors, id = slot * Q + q.

    `covered`: slots [0, covered) were considered when it was built or extended (the live ones among them are
    in it); slots from `covered` on are the tail that `search` scores exactly."""

    def __init__(self, index: Any, params: AnnParams, num_query: int, dim: int, covered: int):
        self.index, self.params = index, params
        self.num_query, self.dim, self.covered = num_query, dim, covered
        _faiss().extract_index_ivf(index).nprobe = params.nprobe or 1

    @classmethod
    def build(cls, vectors: np.ndarray, slots: np.ndarray, params: AnnParams | None = None) -> AnnIndex:
        """Train and fill an ANN over the images at `slots` (sorted, live) of `vectors` (N, Q, D), the store's
        array indexed by slot (an fp16 memmap is read a chunk at a time). It covers slots [0, N)."""
        faiss, params = _faiss(), params or AnnParams()
        _, num_query, dim = _check_vectors(vectors)
        slots = _check_slots(slots, len(vectors), 0)
        if not len(slots):
            raise InputError("cannot build an ANN over no images")
        # Saved as chosen: PQ needs m to divide D (the tiny test checkpoints have small D).
        nlist = params.nlist_for(len(slots) * num_query)
        nprobe = params.nprobe or max(1, nlist // 4)
        params = replace(params, nlist=nlist, m=math.gcd(params.m, dim), nprobe=nprobe)
        index = faiss.index_factory(dim, params.factory(params.nlist), faiss.METRIC_INNER_PRODUCT)
        index.train(_training_sample(vectors, slots, params))
        ann = cls(index, params, num_query, dim, covered=0)
        ann.add(vectors, slots)
        return ann

    def add(self, vectors: np.ndarray, slots: np.ndarray, chunk: int = 4096) -> None:
        """Add the images at `slots` (sorted, >= covered) of `vectors` (N, Q, D); afterwards covered = N."""
        _faiss()
        n_slots, num_query, dim = _check_vectors(vectors)
        if (num_query, dim) != (self.num_query, self.dim):
            raise InputError(f"vectors are {num_query}x{dim}, the ANN is {self.num_query}x{self.dim}")
        slots = _check_slots(slots, n_slots, self.covered)
        offsets = np.arange(num_query, dtype=np.int64)
        for start in range(0, len(slots), chunk):
            part = slots[start : start + chunk]
            block = np.ascontiguousarray(vectors[part], dtype=np.float32).reshape(-1, dim)  # (c*Q, D)
            self.index.add_with_ids(block, (part[:, None] * num_query + offsets).reshape(-1))
        self.covered = max(self.covered, n_slots)

    def candidates(self, query: np.ndarray, n_vectors: int = VECTOR_HITS) -> np.ndarray:
        """Sorted unique slots (int64) of the best `n_vectors` vector hits of each query row, (m, D) or (D,)."""
        return self.scored_candidates(query, n_vectors)[0]

    def scored_candidates(
        self, query: np.ndarray, n_vectors: int = VECTOR_HITS
    ) -> tuple[np.ndarray, np.ndarray]:
        """`candidates` (u,) and each one's approximate score (u,) float32 from the 4-bit codes: per query row
        its best hit, or the row's worst hit where it has none (an optimistic guess), averaged over rows; for
        a text query simply its best hit. Good enough to choose which candidates to re-score, not to rank."""
        _faiss()
        q = np.ascontiguousarray(np.atleast_2d(query), dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise InputError(f"query must be (D,) or (m, D) with D = {self.dim}, got shape {np.shape(query)}")
        k = min(n_vectors, self.index.ntotal)
        if k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        sims, ids = self.index.search(q, k)  # (m, k) approximate inner products, best first; id -1: no hit
        rows, cols = np.nonzero(ids >= 0)
        slots, image = np.unique(ids[rows, cols] // self.num_query, return_inverse=True)
        if not len(slots):
            return slots, np.zeros(0, dtype=np.float32)
        hit = sims[rows, cols]
        floor = np.full(len(q), np.inf, dtype=np.float32)  # (m,) each row's worst hit
        np.minimum.at(floor, rows, hit)
        floor[np.isinf(floor)] = hit.min()  # a row without any hit: the worst of all
        best = np.repeat(floor[:, None], len(slots), axis=1)  # (m, u)
        np.maximum.at(best, (rows, image), hit)
        return slots, best.mean(axis=0).astype(np.float32)

    # -- files ---------------------------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write `ann.faiss` and then `ann.json` (parameters, covered, dims, sha256 of ann.faiss) into
        `directory`, each through a temporary file and a rename, so a crash leaves the old pair, or a pair
        that `load` rejects (the checksum), never a half-written file that it trusts."""
        faiss, directory = _faiss(), Path(directory)
        tmp = directory / (ANN_FILE + ".tmp")
        faiss.write_index(self.index, str(tmp))
        _fsync(tmp)
        os.replace(tmp, directory / ANN_FILE)
        meta = {
            "format": FORMAT,
            "params": asdict(self.params),
            "covered": self.covered,
            "ntotal": int(self.index.ntotal),
            "num_query": self.num_query,
            "dim": self.dim,
            "sha256": _sha256(directory / ANN_FILE),
        }
        tmp = directory / (ANN_META + ".tmp")
        tmp.write_text(json.dumps(meta, indent=1))
        _fsync(tmp)
        os.replace(tmp, directory / ANN_META)

    @classmethod
    def load(cls, directory: Path, num_query: int, dim: int, n_slots: int | None = None) -> AnnIndex | None:
        """The ANN saved in `directory`, or None when it is absent, unreadable, larger than its parameters
        allow, its checksum or dimensions do not match, or faiss reads something else than was saved. With
        `n_slots` (the slots in the vectors file), also None when it covers more slots than there are (an
        ANN of another vectors file, e.g. from before a compaction), which bounds the file size too."""
        directory = Path(directory)
        meta_file, file = directory / ANN_META, directory / ANN_FILE
        if any(f.is_symlink() or not f.is_file() for f in (meta_file, file)):
            return None  # a link could point outside the index; a FIFO would block
        try:
            meta = read_json(meta_file)
            params, covered, ntotal = _parse_meta(meta, num_query, dim)
            if n_slots is not None and (covered > n_slots or ntotal > n_slots * num_query):
                return None
            if file.stat().st_size > max_file_bytes(params, ntotal, dim) or _sha256(file) != meta["sha256"]:
                return None
            faiss = _faiss()
            index = faiss.read_index(str(file))
        except (Blip2Error, OSError, RuntimeError, KeyError, TypeError, ValueError):
            return None  # faiss raises RuntimeError on a file it cannot parse
        if not _is_expected(faiss, index, params, ntotal, dim):
            return None
        return cls(index, params, num_query, dim, covered)


def search(
    vectors: np.ndarray,
    live_slots: np.ndarray,
    query: np.ndarray,
    k: int,
    ann: AnnIndex | None = None,
    n_candidates: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best live images for `query` (D,) or (m, D) as (slots int64, scores float32), exact MaxSim
    order (score descending, ties by slot). Without `ann`: brute force over `live_slots` (sorted). With it: the images
    of its best `n_candidates` vector hits per query row (None: `vector_hits` of the live images) that are live (a stale ANN may name removed slots),
    at most `ann.params.rescore` of them, the best by approximate score (None: all), plus the live slots it
    does not cover yet, all re-scored exactly from `vectors` (N, Q, D)."""
    live = np.asarray(live_slots, dtype=np.int64)
    if ann is not None:
        # live is sorted: binary searches, O(candidates log n) rather than a pass over a million slots.
        tail = live[np.searchsorted(live, ann.covered) :]
        hits = vector_hits(len(live)) if n_candidates is None else n_candidates
        found, approx = ann.scored_candidates(query, hits)
        at = np.minimum(np.searchsorted(live, found), max(len(live) - 1, 0))
        keep = live[at] == found if len(live) else np.zeros(len(found), dtype=bool)
        found, approx = found[keep], approx[keep]
        rescore = ann.params.rescore
        if rescore is not None and len(found) > rescore:
            found = np.sort(top_k(approx, rescore, found)[0])
        live = np.union1d(found, tail)
    return top_k(maxsim(vectors, query, live), k, live)


def max_file_bytes(params: AnnParams, ntotal: int, dim: int) -> int:
    """An upper bound on the size of a genuine ann.faiss: codes and ids per vector (fast-scan pads each list
    to blocks of 32), the coarse centroids and their HNSW graph, the PQ codebooks, with slack."""
    nlist = params.nlist or 8192
    per_vector = params.m // 2 + 8
    lists = nlist * (32 * per_vector + dim * 4 + 8 * max(params.hnsw, 1) * 4 + 64)
    return 2 * (ntotal * per_vector + lists) + (16 << 20)


def _parse_meta(meta: dict[str, Any], num_query: int, dim: int) -> tuple[AnnParams, int, int]:
    if meta.get("format") != FORMAT or (meta.get("num_query"), meta.get("dim")) != (num_query, dim):
        raise ValueError("another format or other dimensions")
    params = AnnParams(**meta["params"])
    covered, ntotal = meta["covered"], meta["ntotal"]
    numbers = [
        covered,
        ntotal,
        params.m,
        params.nprobe,
        params.train_size,
        params.hnsw,
        params.seed,
        params.nlist,
    ]
    if params.rescore is not None:  # absent (None) in the files of the first version: re-score all
        numbers.append(params.rescore)
    if not all(type(x) is int and 0 <= x < 1 << 48 for x in numbers) or not isinstance(meta["sha256"], str):
        raise ValueError("bad numbers")
    return params, covered, ntotal


def _is_expected(faiss: Any, index: Any, params: AnnParams, ntotal: int, dim: int) -> bool:
    """Whether faiss read an IVF-PQ fast-scan inner-product index of the saved size and dimension."""
    return (
        isinstance(index, faiss.IndexIVFPQFastScan)
        and index.d == dim
        and index.ntotal == ntotal
        and index.metric_type == faiss.METRIC_INNER_PRODUCT
        and index.pq.M == params.m
        and index.nlist == params.nlist
    )


def _check_vectors(vectors: np.ndarray) -> tuple[int, int, int]:
    if vectors.ndim != 3 or 0 in vectors.shape[1:]:
        raise InputError(f"vectors must be (n, Q, D) with Q, D > 0, got shape {vectors.shape}")
    n, num_query, dim = vectors.shape
    return n, num_query, dim


def _check_slots(slots: np.ndarray, n_slots: int, first: int) -> np.ndarray:
    """`slots` as int64, required sorted, unique and within [first, n_slots)."""
    slots = np.asarray(slots, dtype=np.int64).reshape(-1)
    if len(slots) and (slots[0] < first or slots[-1] >= n_slots or np.any(np.diff(slots) <= 0)):
        raise InputError(f"slots must be sorted, unique and within [{first}, {n_slots})")
    return slots


def _training_sample(vectors: np.ndarray, slots: np.ndarray, params: AnnParams) -> np.ndarray:
    """(t, D) float32: every query vector of about train_size / Q images drawn at random (sorted, so that a
    memmap is read in order)."""
    num_query, dim = vectors.shape[1:]
    count = min(len(slots), max(1, params.train_size // num_query))
    rng = np.random.default_rng(params.seed)
    chosen = np.sort(rng.choice(slots, size=count, replace=False))
    return np.ascontiguousarray(vectors[chosen], dtype=np.float32).reshape(-1, dim)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _fsync(file: Path) -> None:
    with open(file, "rb+") as f:
        os.fsync(f.fileno())
