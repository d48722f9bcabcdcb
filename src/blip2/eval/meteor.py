"""METEOR 1.5 (Denkowski & Lavie 2014) through its jar, as pycocoevalcap runs it: `java -jar -Xmx2G
meteor-1.5.jar - - -stdio -l en -norm`, one SCORE line per image (its statistics), then one EVAL line over
them all, which gives each image's score and the corpus score (not the mean of the images').

The jar (6 MB, with its 60 MB paraphrase table in `data/` beside it) is not ours to ship: it is found at
`--meteor-jar` / `jar=`, then `$BLIP2_METEOR_JAR`, then in an installed pycocoevalcap (found without
importing it). Without java or the jar, `MeteorUnavailable` says which is missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ..errors import Blip2Error

JAR_NAME = "meteor-1.5.jar"
JAR_ENV = "BLIP2_METEOR_JAR"


class MeteorUnavailable(Blip2Error):
    """METEOR cannot be computed here (no java, no jar, or the jar failed); the message says why."""


def find_jar(jar: str | os.PathLike | None = None) -> Path:
    """The METEOR jar: `jar`, else $BLIP2_METEOR_JAR, else the one in pycocoevalcap's package folder."""
    given = jar or os.environ.get(JAR_ENV)
    if given:
        path = Path(given)
        if not path.is_file():
            raise MeteorUnavailable(f"{path}: no such file (the METEOR jar)")
        return path
    spec = importlib.util.find_spec("pycocoevalcap")  # locates the package without running it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "meteor" / JAR_NAME
        if path.is_file():
            return path
    raise MeteorUnavailable(f"java/jar not found: give --meteor-jar or ${JAR_ENV}, or install pycocoevalcap")


def find_java() -> str:
    java = shutil.which("java")
    if java is None:
        raise MeteorUnavailable("java/jar not found: no java on PATH")
    return java


def meteor(
    pairs: Sequence[tuple[Sequence[str], str]], jar: str | os.PathLike | None = None
) -> tuple[float, list[float]]:
    """METEOR of tokenized (references, candidate) pairs: (corpus score, per-pair scores)."""
    path = find_jar(jar).resolve()
    command = [find_java(), "-jar", "-Xmx2G", str(path), "-", "-", "-stdio", "-l", "en", "-norm"]
    try:
        with subprocess.Popen(
            command,
            cwd=path.parent,  # the jar reads data/paraphrase-en.gz beside it
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            encoding="utf-8",
        ) as process:
            try:
                return _score(process, pairs)
            finally:
                process.kill()
    except (OSError, ValueError) as e:  # ValueError: a line that is not a number (the jar failed)
        raise MeteorUnavailable(f"the METEOR jar failed ({e})") from None


def _score(
    process: subprocess.Popen, pairs: Sequence[tuple[Sequence[str], str]]
) -> tuple[float, list[float]]:
    """Talk the jar's stdio protocol: a SCORE line per pair gives its statistics; one EVAL line over them
    gives a score per pair, then the corpus score."""
    stdin, stdout = process.stdin, process.stdout
    assert stdin is not None and stdout is not None

    def ask(line: str) -> str:
        stdin.write(line + "\n")
        stdin.flush()
        return stdout.readline().strip()

    stats = []
    for references, candidate in pairs:
        candidate = candidate.replace("|||", "").replace("  ", " ")  # the separator, as pycocoevalcap
        stats.append(ask(" ||| ".join(("SCORE", " ||| ".join(references), candidate))))
    scores = [float(ask("EVAL ||| " + " ||| ".join(stats)))]
    scores += [float(stdout.readline().strip()) for _ in range(len(pairs))]
    return scores[-1], scores[:-1]
