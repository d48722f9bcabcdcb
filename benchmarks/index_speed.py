"""The search index's ANN stage at scale: build speed, RAM, query latency (warm and cold), recall@10 against
exact MaxSim, and mean pooling for comparison, on synthetic clustered vectors in the on-disk layout.

    python benchmarks/index_speed.py --images 100000 --configs default --nprobe 64 128 256
    python benchmarks/index_speed.py --images 100000 --data blip2 --configs default ivf4096-flat-np64 --nprobe 32 64
    python benchmarks/index_speed.py --images 1000000 --configs default --rescore 0 100
    python benchmarks/index_speed.py --images 1000000 --data lowrank --threads 1 --configs default --nprobe 128 256 \
        --candidates 2000 8000 --profile --keep

Vectors: `--images` x 32 x 256 unit vectors, float16, written once (in chunks) as `vectors.f16` under
`--dir`/IMAGES-DATA exactly as the index stores them, and memory-mapped from there (`--keep` keeps the file for
a later run, whose `--configs` with no name reuses the saved default ANN). `--data` chooses the geometry (`Data`):
"topics" (isotropic: each image shows 12 of `--topics` topics, each of its 32 vectors one of them plus noise)
or "blip2" (anisotropic like BLIP-2's Q-Former outputs: a mean direction per query slot shared by every image,
6 topics per image on top) or "lowrank" (blip2's slot directions, 2 topics per image, and topic centres and
noises drawn with a power-law spectrum: low effective rank, as CLIP-style embeddings are). Text queries are a
topic's centre plus noise. We do not know which of them real embeddings resemble most (no BLIP-2 weights on
this machine): all are reported. `--candidates` with several values searches the variants at each (vector hits
per query). The script reports the median gap between the 10th and 11th exact
score (near-ties are what makes quantised scores alone lose recall). Exact ground truth: MaxSim over every image,
float32, one pass over the file for all queries, done last (it is the slowest part at a million images).

Latency is one query at a time through `ann.search` (ANN candidates, then exact fp16 rescoring of their
images from the memmap, then top 10), after one warm-up pass, `--threads` threads (faiss follows torch).
"Cold" is a fresh process that loads ann.faiss and maps vectors.f16 and answers one query, first with the page
cache as it is, then after asking the kernel to drop both files from it (posix_fadvise DONTNEED: the nearest
thing to dropping caches without root; pages other processes hold may stay).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import faiss
import numpy as np
import torch

from blip2.index.ann import AnnIndex, AnnParams, search, vector_hits
from blip2.index.exact import CHUNK_BYTES, maxsim, top_k
from blip2.index.resident import populate

Q, D, K = 32, 256, 10
CHUNK = 4096  # images per generation / scoring chunk: 4096 x 32 x 256 float32 = 128 MiB

# The alternatives measured against the defaults: what each choice costs in build time, recall and latency.
CONFIGS = {
    "default": AnnParams(),
    "ivf8192-flat-np64": AnnParams(nlist=8192, nprobe=64, train_size=327_680),  # the feasibility run's
    "ivf8192-hnsw-np64": AnnParams(nlist=8192, nprobe=64, train_size=327_680, hnsw=32),
    "ivf2048-flat-np32": AnnParams(nlist=2048, nprobe=32),
    "default-pq32": AnnParams(m=32),
    "ivf4096-flat-np64": AnnParams(nlist=4096, nprobe=64, train_size=163_840),
}


# -- data ------------------------------------------------------------------------------------------------------
def unit(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.einsum("...i,...i->...", x, x))[..., None]


def topic_centres(topics: int, seed: int, shape: np.ndarray | None = None) -> np.ndarray:
    """(topics, D) unit topic centres: isotropic, or drawn with the covariance `shape`.T @ `shape`."""
    centres = np.random.default_rng(seed).standard_normal((topics, D)).astype(np.float32)
    return unit(centres if shape is None else centres @ shape)


def noise(
    rng: np.random.Generator, shape: tuple[int, ...], scale: float, spectrum: np.ndarray | None = None
) -> np.ndarray:
    """Uniform noise of expected length `scale` per D-vector (so the level does not depend on D). Uniform
    rather than Gaussian: twice as fast to draw, and 16 GB of it are drawn at a million images. With
    `spectrum` (D, D) (`spectrum_shape`), the noise is x @ spectrum: the same expected length, its variance
    spread over the directions as the spectrum says."""
    x = rng.random(shape, dtype=np.float32)
    x -= 0.5
    x *= scale * np.sqrt(12 / D, dtype=np.float32)  # U(-1/2, 1/2) has variance 1/12
    return x if spectrum is None else x @ spectrum


@dataclass(frozen=True)
class Data:
    """A synthetic geometry. Each image shows `aspects` of the topics (its own noisy copy of each topic's
    centre); each of its Q vectors describes one of them: unit(slot_weight * slot mean + aspect + noise). A
    text query is a topic's centre plus noise, so it matches a few of an image's vectors well and the rest
    poorly: the max picks them out, the mean dilutes them (why mean pooling loses recall).

    slot_weight = 0 ("topics"): isotropic vectors. slot_weight > 0 ("blip2"): each query slot q has its own
    mean direction, shared by every image, with the content on top, as in BLIP-2's Q-Former outputs (each
    learned query token has its own typical output); its parameters were chosen from a grid at 100k images
    (`--configs --set FIELD=VALUE ...` reports both figures without building an ANN) so that mean pooling's
    recall@10 (0.865) and the median 10th/11th gap (0.0008) are near the issue's feasibility data (0.82-0.86,
    ~0.001; RESULTS.md).

    spectrum > 0 ("lowrank"): the topic centres and every noise are drawn with a fast-decaying spectrum, the
    variance along the i-th of D random orthonormal directions proportional to (i + 1) ** -spectrum (the same
    expected lengths), as real CLIP / BLIP-style embeddings are: strongly anisotropic, of low effective rank
    (the "narrow cone"). The slot means stay as in "blip2". Calibrated like "blip2" (RESULTS.md, session 6)."""

    aspects: int = 12  # topics per image
    slot_weight: float = 0.0  # length of the per-slot mean direction against a unit-length aspect
    noise: float = 0.8  # expected length of the per-vector noise
    aspect_noise: float = 0.8  # ... of an image's copy of a topic centre
    query_noise: float = 0.8  # ... of a text query's noise
    images_per_topic: int = 10  # topics = images / this, unless --topics says
    spectrum: float = 0.0  # power-law exponent of the content's and noises' variance spectrum (0: isotropic)


DATA = {
    "topics": Data(),
    "blip2": Data(aspects=6, slot_weight=2.0, images_per_topic=25),
    "lowrank": Data(aspects=2, slot_weight=2.0, query_noise=0.5, images_per_topic=100, spectrum=1.0),
}


def with_fields(data: Data, assignments: list[str]) -> Data:
    """`data` with FIELD=VALUE overrides, each VALUE of the field's type."""
    fields = {}
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        if not hasattr(data, key):
            raise SystemExit(f"--set: Data has no field {key!r}")
        fields[key] = type(getattr(data, key))(value)
    return replace(data, **fields)


def slot_means(seed: int) -> np.ndarray:
    """(Q, D) unit per-slot mean directions (a stream no topic or chunk uses)."""
    return unit(np.random.default_rng([seed, 1 << 41]).standard_normal((Q, D)).astype(np.float32))


def spectrum_shape(data: Data, seed: int) -> np.ndarray | None:
    """(D, D) diag(s) @ R, R random orthonormal, s_i ** 2 = D (i + 1) ** -spectrum / sum(...): x @ it turns
    isotropic x into x with s_i ** 2 times the variance along R's i-th row, of the same expected length.
    None for an isotropic geometry (spectrum 0)."""
    if not data.spectrum:
        return None
    rng = np.random.default_rng([seed, 1 << 42])  # a stream no topic, chunk or query uses
    basis, _ = np.linalg.qr(rng.standard_normal((D, D)))
    variance = np.arange(1, D + 1, dtype=np.float64) ** -data.spectrum
    scale = np.sqrt(D * variance / variance.sum())
    return (scale[:, None] * basis.T).astype(np.float32)


def image_vectors(
    data: Data,
    rng: np.random.Generator,
    count: int,
    centres: np.ndarray,
    means: np.ndarray,
    shape: np.ndarray | None = None,
) -> np.ndarray:
    """(count, Q, D) float32 unit vectors of `count` images drawn from `rng`; `shape`: `spectrum_shape`."""
    picked = centres[rng.integers(0, len(centres), (count, data.aspects))]
    aspects = unit(picked + noise(rng, (count, data.aspects, D), data.aspect_noise, shape))
    which = rng.integers(0, data.aspects, (count, Q))  # the aspect each query vector describes
    vectors = noise(rng, (count, Q, D), data.noise, shape)
    vectors += np.take_along_axis(aspects, which[..., None], 1)
    if data.slot_weight:
        vectors += data.slot_weight * means
    return unit(vectors)


def generate(path: Path, images: int, topics: int, seed: int, data: Data, workers: int = 2) -> None:
    """Write `images` x Q x D float16 unit vectors of `data` to `path`, chunk by chunk (never all in RAM),
    `workers` processes writing alternate chunks in place. Each chunk depends on (seed, its start) only."""
    partial = path.with_suffix(".partial")  # renamed when complete: a killed run leaves no full-size file
    with open(partial, "wb") as f:
        f.truncate(images * Q * D * 2)
    with ProcessPoolExecutor(workers) as pool:
        jobs = [(partial, images, topics, seed, data, i, workers) for i in range(workers)]
        list(pool.map(_generate_chunks, jobs))
    os.replace(partial, path)


def _generate_chunks(job: tuple[Path, int, int, int, Data, int, int]) -> None:
    path, images, topics, seed, data, first, every = job
    shape = spectrum_shape(data, seed)
    centres, means = topic_centres(topics, seed, shape), slot_means(seed)
    fd = os.open(path, os.O_WRONLY)
    try:
        for start in range(first * CHUNK, images, every * CHUNK):
            rng = np.random.default_rng([seed, start])
            vectors = image_vectors(data, rng, min(CHUNK, images - start), centres, means, shape)
            os.pwrite(fd, vectors.astype("<f2").tobytes(), start * Q * D * 2)
    finally:
        os.close(fd)


def text_queries(count: int, topics: int, seed: int, data: Data) -> np.ndarray:
    rng = np.random.default_rng([seed, 1 << 40])  # a stream no chunk of `generate` uses
    shape = spectrum_shape(data, seed)
    centres = topic_centres(topics, seed, shape)
    return unit(
        centres[rng.integers(0, topics, count)] + noise(rng, (count, D), data.query_noise, shape)
    )  # (count, D)


def vectors_at(path: Path) -> np.memmap:
    n = path.stat().st_size // (Q * D * 2)
    return np.memmap(path, dtype="<f2", mode="r", shape=(n, Q, D))


# -- exact ground truth and mean pooling --------------------------------------------------------------------------
def exact_pass(vectors: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, nq) exact MaxSim scores of every image for every query, and (n, D) mean-pooled unit vectors (the
    seed's method), in one pass over the file."""
    n = len(vectors)
    scores = np.empty((n, len(queries)), dtype=np.float32)
    pooled = np.empty((n, D), dtype=np.float32)
    for start in range(0, n, CHUNK):
        chunk = np.asarray(vectors[start : start + CHUNK], dtype=np.float32)  # (c, Q, D)
        scores[start : start + len(chunk)] = (chunk @ queries.T).max(axis=1)
        pooled[start : start + len(chunk)] = unit(chunk.mean(axis=1))
    return scores, pooled


def truth(scores: np.ndarray) -> tuple[list[np.ndarray], float]:
    """Exact top 10 per query, and the median gap between the 10th and 11th best score."""
    tops, gaps = [], []
    for j in range(scores.shape[1]):
        ids, best = top_k(scores[:, j], K + 1)
        tops.append(ids[:K])
        gaps.append(float(best[K - 1] - best[K]))
    return tops, float(np.median(gaps))


def ground_truth(vectors, queries, saved: Path) -> tuple[list[np.ndarray], dict]:
    """The exact top 10 of each query, the median 10th/11th gap and mean pooling's recall@10, computed once
    per vectors file (an hour's pass at a million images on a busy machine) and kept in `saved` next to it."""
    if saved.exists():
        with np.load(saved) as f:
            return list(f["tops"]), dict(
                median_gap_10_11=float(f["gap"]), mean_pool_recall_at_10=float(f["pool"])
            )
    scores, pooled = exact_pass(vectors, queries)
    tops, gap = truth(scores)
    del scores
    pool = round(mean_pool_recall(vectors, pooled, queries, tops), 4)
    np.savez(saved, tops=np.array(tops), gap=gap, pool=pool)
    return tops, dict(median_gap_10_11=round(gap, 5), mean_pool_recall_at_10=pool)


def recall(found: list[np.ndarray], tops: list[np.ndarray]) -> float:
    return float(np.mean([len(np.intersect1d(f, t)) / K for f, t in zip(found, tops)]))


def mean_pool_recall(vectors, pooled, queries, tops, candidates: int = 1000) -> float:
    """Recall@10 of mean pooling: the best `candidates` images by pooled cosine, re-scored exactly."""
    found = []
    for q in queries:
        rows = np.sort(top_k(pooled @ q, candidates)[0])
        found.append(top_k(maxsim(vectors, q, rows), K, rows)[0])
    return recall(found, tops)


# -- the ANN --------------------------------------------------------------------------------------------------------
def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def latencies(vectors, live, queries, ann, n_candidates, passes: int = 3) -> tuple[list[float], list]:
    """Milliseconds of each query of the best of `passes` passes (by p50), after one warm-up pass; results."""
    found = [search(vectors, live, q, K, ann, n_candidates)[0] for q in queries]  # warm-up
    best: list[float] | None = None
    for _ in range(passes):
        times = []
        for q in queries:
            t = time.perf_counter()
            search(vectors, live, q, K, ann, n_candidates)
            times.append((time.perf_counter() - t) * 1e3)
        if best is None or np.median(times) < np.median(best):
            best = times
    assert best is not None
    return best, found


def measure(name, params, vectors, queries, workdir, n_candidates) -> tuple[dict, list]:
    """Build, save and query one configuration: its row (recall is added once the exact pass is done) and
    the top 10 of each query."""
    live = np.arange(len(vectors), dtype=np.int64)
    rss = rss_mib()
    t, cpu = time.perf_counter(), time.process_time()
    ann = AnnIndex.build(vectors, live, params)
    build_s, build_cpu_s = time.perf_counter() - t, time.process_time() - cpu
    ann_dir = workdir / f"ann-{name}"
    ann_dir.mkdir(exist_ok=True)
    ann.save(ann_dir)
    times, found = latencies(vectors, live, queries, ann, n_candidates)
    file_bytes = (ann_dir / "ann.faiss").stat().st_size
    row = dict(
        config=name,
        params=asdict(ann.params),
        build_s=round(build_s, 1),
        images_per_s=round(len(vectors) / build_s),
        build_cpu_s=round(build_cpu_s, 1),  # CPU seconds, all threads: less sensitive to a shared machine
        ann_mib=round(file_bytes / 2**20, 1),
        rss_growth_mib=round(rss_mib() - rss),
        p50_ms=round(float(np.percentile(times, 50)), 2),
        p95_ms=round(float(np.percentile(times, 95)), 2),
        ann_bytes_per_image=round(file_bytes / len(vectors)),
        load=os.getloadavg()[0],
    )
    print(json.dumps(row), flush=True)
    return row, found


def variants(workdir, name, vectors, queries, hits, nprobes, rescores) -> list[tuple[dict, list]]:
    """The saved ANN of configuration `name` searched at every combination of the nprobe values (none: its
    own), the rescore values (none: its own; 0: all candidates) and the vector hits per query (`hits`)."""
    saved = AnnIndex.load(workdir / f"ann-{name}", Q, D)
    assert saved is not None
    runs = []
    if not nprobes and not rescores and len(hits) < 2:
        return runs
    for nprobe, rescore, n_candidates in itertools.product(
        nprobes or [None], rescores or [saved.params.rescore], hits
    ):
        params = replace(saved.params, nprobe=nprobe or saved.params.nprobe, rescore=rescore or None)
        ann = AnnIndex(saved.index, params, Q, D, saved.covered)
        live = np.arange(len(vectors))
        times, found = latencies(vectors, live, queries, ann, n_candidates)
        row = dict(config=name, nprobe=params.nprobe, rescore=params.rescore, hits=n_candidates)
        row.update(p50_ms=round(float(np.median(times)), 2), p95_ms=round(float(np.percentile(times, 95)), 2))
        print(json.dumps(row), flush=True)
        runs.append((row, found))
    return runs


def stage_times(vectors, queries, ann, n_candidates, passes: int = 3) -> dict:
    """Median and p95 milliseconds of each stage of one text query, all candidates re-scored, the best of
    `passes` passes (by total) after a warm-up: the coarse quantizer, the fast-scan list scan (the index's
    search less the quantizer), grouping hits by image, then per block of images as `exact.maxsim` does it:
    gathering their fp16 rows from the memmap, converting them to float32, the product and max, and the top k.
    The `numpy_*` stages are the first version's (one gather, numpy's conversion of the whole block)."""
    ivf = faiss.extract_index_ivf(ann.index)
    step = max(1, CHUNK_BYTES // (Q * D * 4))

    def one(q: np.ndarray) -> list[float]:
        q2, qt = q[None, :], torch.from_numpy(q)
        t = [time.perf_counter()]
        ivf.quantizer.search(q2, ivf.nprobe)
        t.append(time.perf_counter())
        ann.index.search(q2, n_candidates)
        t.append(time.perf_counter())
        slots, _ = ann.scored_candidates(q, n_candidates)  # searches again: the grouping is the difference
        t.append(time.perf_counter())
        blocks, scores = np.zeros(3), np.empty(len(slots), np.float32)  # gather, convert, product seconds
        for i in range(0, len(slots), step):
            b0 = time.perf_counter()
            block = np.take(vectors, slots[i : i + step], axis=0)
            b1 = time.perf_counter()
            block32 = torch.from_numpy(block).float()
            b2 = time.perf_counter()
            scores[i : i + len(block)] = (block32 @ qt).amax(dim=1).numpy()
            blocks += np.diff([b0, b1, b2, time.perf_counter()])
        t.append(time.perf_counter())
        top_k(scores, K, slots)
        t.append(time.perf_counter())
        whole = vectors[slots]
        t.append(time.perf_counter())
        whole32 = whole.astype(np.float32)
        t.append(time.perf_counter())
        (whole32 @ q).max(axis=1)
        t.append(time.perf_counter())
        d = np.diff(t) * 1e3
        scan, group = d[1] - d[0], d[2] - d[1]
        return [d[0], scan, group, *(blocks * 1e3), *d[4:], len(slots)]

    names = "coarse scan group gather convert product top_k numpy_gather numpy_convert numpy_product images"
    for q in queries:
        one(q)
    best = None
    for _ in range(passes):
        rows = np.array([one(q) for q in queries])  # (queries, stages)
        if best is None or np.median(rows[:, :7].sum(1)) < np.median(best[:, :7].sum(1)):
            best = rows
    assert best is not None
    out = {
        name: [round(float(np.median(best[:, i])), 3), round(float(np.percentile(best[:, i], 95)), 3)]
        for i, name in enumerate(names.split())
    }
    return dict(out, nprobe=ivf.nprobe, nlist=ivf.nlist, load=os.getloadavg()[0])


def cold(workdir: Path, name: str, query: list[float], drop: bool) -> dict:
    """In a fresh process: load ann.faiss, map vectors.f16, answer one query; times and RSS."""
    code = (
        "import json,sys; sys.path.insert(0, 'benchmarks'); import index_speed as b; "
        f"print(json.dumps(b.cold_child({str(workdir)!r}, {name!r}, {query!r}, {drop})))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cold_child(workdir: str, name: str, query: list[float], drop: bool) -> dict:
    root = Path(workdir)
    files = [root / "vectors.f16", root / f"ann-{name}" / "ann.faiss"]
    if drop:
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    rss = rss_mib()
    t0 = time.perf_counter()
    vectors = vectors_at(files[0])
    ann = AnnIndex.load(files[1].parent, Q, D)
    assert ann is not None
    t1 = time.perf_counter()
    search(vectors, np.arange(len(vectors)), np.array(query, np.float32), K, ann)
    t2 = time.perf_counter()
    return dict(
        load_ms=round((t1 - t0) * 1e3, 1),
        first_query_ms=round((t2 - t1) * 1e3, 1),
        ann_rss_mib=round(rss_mib() - rss),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--topics", type=int, help="default: images / Data.images_per_topic")
    parser.add_argument("--generate-only", action="store_true", help="write the vectors file and stop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", choices=list(DATA), default="topics", help="the synthetic geometry (Data)")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override Data fields (calibration)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--candidates",
        type=int,
        nargs="+",
        default=None,
        help="vector hits per query (n_candidates; default: ann.vector_hits of --images); more than one: the variants are searched at each",
    )
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--nprobe", type=int, nargs="*", default=[], help="also search each config at these")
    parser.add_argument(
        "--rescore",
        type=int,
        nargs="*",
        default=[],
        help="... at each of these rescore values (0: all candidates)",
    )
    parser.add_argument("--reuse", nargs="*", default=[], choices=list(CONFIGS), help="saved ANNs to search")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/blip2-index-speed"))
    parser.add_argument("--keep", action="store_true", help="keep the vectors file for a later run")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--profile", action="store_true", help="time each stage of a query (stage_times)")
    parser.add_argument(
        "--resident",
        action="store_true",
        help="map the whole vectors file in first, as Index(resident=True) does (blip2.index.resident)",
    )
    args = parser.parse_args()
    args.candidates = args.candidates or [vector_hits(args.images)]
    torch.set_num_threads(args.threads)
    workdir = args.dir / f"{args.images}-{args.data}"
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "vectors.f16"
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()}")
    data = with_fields(DATA[args.data], args.set)
    topics = args.topics or max(10, args.images // data.images_per_topic)

    # The vectors file is reused only when it was made by the same geometry, topics and seed.
    made_by, made_by_file = dict(asdict(data), topics=topics, seed=args.seed), path.with_suffix(".json")
    if not path.exists() or not made_by_file.exists() or json.loads(made_by_file.read_text()) != made_by:
        t = time.perf_counter()
        for stale in workdir.glob("truth-*.npz"):  # of the vectors being replaced
            stale.unlink()
        generate(path, args.images, topics, args.seed, data)
        made_by_file.write_text(json.dumps(made_by))
        print(f"# generated {path} ({path.stat().st_size / 1e9:.1f} GB) in {time.perf_counter() - t:.0f} s")
    if args.generate_only:
        return
    vectors = vectors_at(path)
    if args.resident:
        t = time.perf_counter()
        advice = populate(vectors)
        print(
            f"# resident: madvise({advice}) over {path.name} in {time.perf_counter() - t:.1f} s", flush=True
        )
    queries = text_queries(args.queries, topics, args.seed, data)
    summary: dict = dict(images=args.images, queries=args.queries, disk_bytes_per_image=Q * D * 2)
    summary.update(data=args.data, **made_by)
    # Speed first, recall last: on a busy machine the exact pass over a million images takes the longest.
    runs = [
        measure(name, CONFIGS[name], vectors, queries, workdir, args.candidates[0]) for name in args.configs
    ]
    if args.profile:
        for name in args.configs + args.reuse:
            ann = AnnIndex.load(workdir / f"ann-{name}", Q, D)
            assert ann is not None
            print(
                json.dumps(dict(config=name, **stage_times(vectors, queries, ann, args.candidates[0]))),
                flush=True,
            )
    for name in args.configs + args.reuse or ["default"]:  # built now, or by an earlier run
        if (workdir / f"ann-{name}").exists():
            runs += variants(workdir, name, vectors, queries, args.candidates, args.nprobe, args.rescore)
    built = [name for name in args.configs + args.reuse + ["default"] if (workdir / f"ann-{name}").exists()]
    if built:  # cold start with the first configuration of this run (else a saved default)
        for drop in (False, True):
            summary[f"cold{'_dropped' if drop else ''}"] = cold(workdir, built[0], queries[0].tolist(), drop)
        print(json.dumps(dict(summary, cold_config=built[0])), flush=True)
    t = time.perf_counter()
    tops, figures = ground_truth(vectors, queries, workdir / f"truth-{args.queries}.npz")
    summary.update(figures)
    print(json.dumps(summary), f"# exact pass {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    for row, found in runs:
        rows.append(dict(row, recall_at_10=round(recall(found, tops), 4)))
        print(json.dumps(rows[-1]), flush=True)
    summary.update(rows=rows, load_after=os.getloadavg())
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    if not args.keep:
        path.unlink()
        made_by_file.unlink()
        (workdir / f"truth-{args.queries}.npz").unlink()


if __name__ == "__main__":
    main()
