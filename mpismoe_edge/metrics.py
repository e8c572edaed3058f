"""Task metrics on plain Python lists (no torch): accuracy, entity-level F1, Pearson, Spearman.

``entity_f1`` follows seqeval's default (conlleval-style) mode: an entity is a maximal run
that starts at a ``B-`` tag, or at an ``I-`` tag whose type differs from the previous tag's, and
continues over ``I-`` tags of its type; a prediction counts only when type and span match
exactly; micro-averaged over all entities.
"""

from __future__ import annotations

import math


def accuracy(true: list, pred: list) -> float:
    if len(true) != len(pred) or not true:
        raise ValueError(f"accuracy needs two equal, non-empty lists (got {len(true)} and {len(pred)})")
    return sum(t == p for t, p in zip(true, pred)) / len(true)


def _prefix_type(tag: str) -> tuple[str, str]:
    if tag == "O" or "-" not in tag:
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return prefix, kind


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """``(type, first, last)`` word spans of the entities in one BIO-tagged sequence."""
    out, start, kind = set(), None, ""
    for i, tag in enumerate([*tags, "O"]):
        prefix, t = _prefix_type(tag)
        inside = prefix == "I" and start is not None and t == kind
        if start is not None and not inside:
            out.add((kind, start, i - 1))
            start = None
        if prefix in ("B", "I") and not inside:
            start, kind = i, t
    return out


def is_bio(labels: list[str]) -> bool:
    """Whether a tag set names entities (``B-``/``I-`` prefixed tags), so that entity F1 means something."""
    return any(_prefix_type(t)[0] in ("B", "I") for t in labels)


def f1_from_counts(gold: int, found: int, right: int) -> dict[str, float]:
    """Micro precision, recall and F1 from the numbers of gold, predicted and matching entities."""
    p = right / found if found else 0.0
    r = right / gold if gold else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def entity_f1(true: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 of exact entity matches over sequences of BIO tags."""
    if len(true) != len(pred) or any(len(a) != len(b) for a, b in zip(true, pred)):
        raise ValueError("entity_f1 needs the same number of tags per sequence in true and pred")
    gold = {(n, *e) for n, tags in enumerate(true) for e in entities(tags)}
    found = {(n, *e) for n, tags in enumerate(pred) for e in entities(tags)}
    return f1_from_counts(len(gold), len(found), len(gold & found))


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation; 0.0 when either side is constant (a mean predictor)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"pearson needs two equal lists of at least 2 values (got {len(x)} and {len(y)})")
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def ranks(x: list[float]) -> list[float]:
    """1-based ranks, ties given the mean of their ranks."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    out = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (Pearson of the tie-averaged ranks)."""
    return pearson(ranks(x), ranks(y))
