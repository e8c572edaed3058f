"""Pure-numpy parity checks between two sets of logits (e.g. PyTorch vs the exported ONNX model).

Used by ``mpismoe-parity`` (torch side in ``mpismoe_edge.parity``) and usable on a device with
numpy only::

    report = compare_logits(torch_logits, onnx_logits, labels=y, atol=1e-3, min_agreement=0.99)
    print(report.summary()); assert report.passed

For ``task="token-classification"`` the logits are one ``[tokens, labels]`` array per text (real
tokens only, as ``Predictor.predict_logits`` returns them); they are compared token by token.

Routing flips: a text whose difference comes from one token's top-k expert choice falling the
other way on a near tie (confirmed by ``mpismoe_edge.route_flips``, which needs torch) may be
passed as ``routing_flips``. Such a text is counted and reported apart and judged by label
agreement with all the others; every other text must stay within ``atol``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from .records import label_ids
from .tasks import kind


@dataclass
class ParityReport:
    n: int
    max_abs_diff: float
    mean_abs_diff: float
    label_agreement: float | None  # fraction of rows (texts, or tokens) whose argmax agrees
    reference_accuracy: float | None  # vs the given labels, when labels are given
    candidate_accuracy: float | None
    atol: float | None
    min_agreement: float | None
    max_accuracy_drop: float | None
    passed: bool
    failures: list[str] = field(default_factory=list)
    tokens: int | None = None  # token classification: real tokens compared (n counts texts)
    over_atol: int | None = None  # texts whose max |diff| is past atol (routing flips included)
    routing_flips: list[int] = field(default_factory=list)  # texts whose diff is a confirmed routing flip
    max_abs_diff_without_flips: float | None = None  # over the other texts: what atol judges

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.tokens is None:  # sequence tasks: the report has no token count
            del d["tokens"]
        return d

    def past_atol(self) -> str:
        """How many texts crossed ``atol`` and why, e.g. '1 of 500 texts past atol 0.001, 1 by a
        routing flip (judged by labels)'; empty when none did."""
        if not self.over_atol:
            return ""
        flips = len(self.routing_flips)
        why = f", {flips} by a routing flip (judged by labels)" if flips else ""
        return f"{self.over_atol} of {self.n} texts past atol {self.atol:g}{why}"

    def summary(self) -> str:
        parts = [f"n={self.n}"] + ([f"tokens={self.tokens}"] if self.tokens is not None else [])
        parts += [f"max_abs_diff={self.max_abs_diff:.3g}", f"mean_abs_diff={self.mean_abs_diff:.3g}"]
        if self.routing_flips:
            parts.append(f"max_abs_diff_without_flips={self.max_abs_diff_without_flips:.3g}")
        if self.label_agreement is not None:
            parts.append(f"label_agreement={self.label_agreement:.4f}")
        if self.reference_accuracy is not None:
            parts.append(f"accuracy reference={self.reference_accuracy:.4f} candidate={self.candidate_accuracy:.4f}")
        if self.past_atol():
            parts.append(self.past_atol())
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        return ", ".join(parts) + " -> " + verdict


def _as_logits(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if a.ndim not in (1, 2) or a.shape[0] == 0:
        raise ValueError(f"{name} must have shape [n] or [n, classes] with n > 0, got {list(a.shape)}")
    return a.astype(np.float64)


def _token_logits(reference, candidate) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Both sides' per-text ``[tokens_i, labels]`` logits, checked pair by pair, as two
    ``[tokens, labels]`` arrays (texts concatenated); also each text's token count."""
    sides = []
    for name, x in (("reference", reference), ("candidate", candidate)):
        is_list = isinstance(x, (list, tuple, np.ndarray))
        rows = [_as_logits(r, f"{name}[{i}]") for i, r in enumerate(x)] if is_list else []
        if not rows or any(r.ndim != 2 for r in rows):
            raise ValueError(f"{name} must be a non-empty list of [tokens, labels] arrays, one per text")
        sides.append(rows)
    ref, cand = sides
    if len(ref) != len(cand):
        raise ValueError(f"reference has {len(ref)} texts, candidate {len(cand)}")
    for i, (r, c) in enumerate(zip(ref, cand)):
        if r.shape != c.shape:
            raise ValueError(f"shape mismatch at text {i}: reference {list(r.shape)} vs candidate {list(c.shape)}")
    return np.concatenate(ref), np.concatenate(cand), [len(r) for r in ref]


def _per_text(a: np.ndarray, b: np.ndarray, lengths: list[int] | None) -> np.ndarray:
    """Each text's max |a - b| (inf where either side is NaN/inf): a row of ``[n, ...]`` arrays,
    or consecutive ``lengths`` rows of token logits."""
    d = np.abs(a - b)
    d[~(np.isfinite(a) & np.isfinite(b))] = np.inf
    d = d.reshape(len(d), -1).max(-1) if d.size else np.zeros(len(d))
    if lengths is None:
        return d
    ends = np.cumsum(lengths)
    return np.array([d[e - k : e].max() if k else 0.0 for e, k in zip(ends, lengths)])


def text_abs_diffs(reference, candidate, task: str = "classification") -> np.ndarray:
    """Each text's max |reference - candidate| (``[n]``, float64; inf where NaN/inf), in the
    layouts :func:`compare_logits` takes."""
    if kind(task).token_level:
        a, b, lengths = _token_logits(reference, candidate)
        return _per_text(a, b, lengths)
    a, b = _as_logits(reference, "reference"), _as_logits(candidate, "candidate")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: reference {list(a.shape)} vs candidate {list(b.shape)}")
    return _per_text(a, b, None)


def abs_diff(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(max, mean) of |reference - candidate| in float64, for arrays of one shape; both are inf
    when either side holds NaN or inf, and 0 for empty arrays."""
    a, b = np.asarray(reference, dtype=np.float64), np.asarray(candidate, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: reference {list(a.shape)} vs candidate {list(b.shape)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf"), float("inf")
    if a.size == 0:
        return 0.0, 0.0
    d = np.abs(a - b)
    return float(d.max()), float(d.mean())


def max_abs_diff(reference, candidate) -> float:
    """Largest |reference - candidate| of two logit arrays; inf if either holds NaN/inf."""
    return abs_diff(_as_logits(reference, "reference"), _as_logits(candidate, "candidate"))[0]


def label_agreement(reference, candidate) -> float:
    """Fraction of rows where both logits pick the same class."""
    a, b = _as_logits(reference, "reference"), _as_logits(candidate, "candidate")
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two [n, classes] arrays of one shape, got {list(a.shape)} and {list(b.shape)}")
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def labels_to_indices(labels: Sequence, label_names: Sequence[str] | None = None) -> np.ndarray:
    """Gold labels -> int64 class indices: by ``records.label_ids`` when ``label_names`` are
    given; without them every label must be an integer class index."""
    if label_names is not None:
        return np.asarray(label_ids(list(labels), label_names), dtype=np.int64)
    for i, y in enumerate(labels):
        if not (isinstance(y, (int, np.integer)) and not isinstance(y, bool)):
            raise ValueError(f"label #{i}: label {y!r} is not a class index (pass label_names to map names)")
    return np.asarray([int(y) for y in labels], dtype=np.int64)


def accuracy(logits, labels: Sequence, label_names: Sequence[str] | None = None) -> float:
    a = _as_logits(logits, "logits")
    y = labels_to_indices(labels, label_names)
    if a.ndim != 2 or len(y) != a.shape[0]:
        raise ValueError(f"need [n, classes] logits and n labels, got {list(a.shape)} and {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() >= a.shape[1]):
        raise ValueError(f"labels must lie in [0, {a.shape[1]})")
    return float((a.argmax(-1) == y).mean())


def compare_logits(
    reference,
    candidate,
    labels: Sequence | None = None,
    *,
    label_names: Sequence[str] | None = None,
    task: str = "classification",
    atol: float | None = 1e-3,
    min_agreement: float | None = 0.99,
    max_accuracy_drop: float | None = None,
    routing_flips: Sequence[int] = (),
) -> ParityReport:
    """Compare ``candidate`` logits (e.g. ONNX) against ``reference`` (e.g. PyTorch).

    Passes when max |diff| <= ``atol`` (skip with None) on every text but those of
    ``routing_flips`` (indices of texts whose difference is a confirmed routing flip; they count
    in ``over_atol`` and in the label agreement), the argmax agreement is at least
    ``min_agreement`` (classification; skip with None), no value is NaN/inf, and, when labels
    and ``max_accuracy_drop`` are given, candidate accuracy >= reference accuracy - drop.

    token-classification: ``reference`` and ``candidate`` hold one ``[tokens_i, labels]`` array
    per text (real tokens only); diffs and the argmax agreement are over all their tokens, and
    ``n`` counts texts, ``tokens`` tokens. Gold labels are not taken for this task.
    """
    task_kind = kind(task)  # what the two sides must agree on (runtime/tasks.py)
    tokens = lengths = None
    if task_kind.token_level:
        if labels is not None:
            raise ValueError(f"gold labels are not supported for {task} (compare without them)")
        a, b, lengths = _token_logits(reference, candidate)
        n, tokens = len(lengths), int(a.shape[0])
    else:
        a, b = _as_logits(reference, "reference"), _as_logits(candidate, "candidate")
        if a.shape != b.shape:
            raise ValueError(f"shape mismatch: reference {list(a.shape)} vs candidate {list(b.shape)}")
        n = int(a.shape[0])
    flips = sorted({int(i) for i in routing_flips})
    if flips and not 0 <= flips[0] <= flips[-1] < n:
        raise ValueError(f"routing_flips must be text indices in [0, {n}), got {flips}")
    failures = [
        f"{name} logits contain NaN or inf"
        for name, x in (("reference", a), ("candidate", b))
        if not np.isfinite(x).all()
    ]
    mad, mean = abs_diff(a, b)
    per_text = _per_text(a, b, lengths)
    others = np.delete(per_text, flips)
    mad_others = float(others.max()) if others.size else 0.0
    over = None
    if atol is not None:
        over = int((~(per_text <= atol)).sum())
        if not mad_others <= atol:
            unexplained = over - sum(1 for i in flips if not per_text[i] <= atol)
            failures.append(
                f"max_abs_diff {mad_others:.3g} > atol {atol:g} "
                f"({unexplained} of {n} texts past atol{' not explained by a routing flip' if flips else ''})"
            )

    agree = ref_acc = cand_acc = None
    decided = task_kind.decisions(a) if a.ndim == 2 else None
    if decided is not None:
        same = decided == task_kind.decisions(b)
        agree = float(same.reshape(len(same), -1).all(-1).mean())  # a row agrees when all its decisions do
        if min_agreement is not None and agree < min_agreement:
            failures.append(f"label agreement {agree:.4f} < {min_agreement:g}")
        if labels is not None and not task_kind.one_label:
            raise ValueError(f"gold labels are not supported for {task} (compare without them)")
        if labels is not None:
            ref_acc, cand_acc = accuracy(a, labels, label_names), accuracy(b, labels, label_names)
            if max_accuracy_drop is not None and cand_acc < ref_acc - max_accuracy_drop:
                failures.append(f"accuracy dropped {ref_acc - cand_acc:.4f} > {max_accuracy_drop:g}")
    return ParityReport(
        n=n,
        max_abs_diff=mad,
        mean_abs_diff=mean,
        label_agreement=agree,
        reference_accuracy=ref_acc,
        candidate_accuracy=cand_acc,
        atol=atol,
        min_agreement=min_agreement,
        max_accuracy_drop=max_accuracy_drop,
        passed=not failures,
        failures=failures,
        tokens=tokens,
        over_atol=over,
        routing_flips=flips,
        max_abs_diff_without_flips=mad_others,
    )
