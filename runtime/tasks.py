"""Task kinds: all that differs between classification, regression, token classification and
multi-label classification, as one record per kind.

Training (the loss's targets, the loss, the evaluation metrics and the one that picks the best
epoch), the exporter (the Hugging Face head and ``problem_type``) and the runtime (how a row of
logits becomes an answer, and when two rows give the same one) ask the kind, :func:`kind`,
instead of comparing task names. Adding a kind is one class here, registered in ``KINDS``, plus
how the data reader reads its labels.

Importing this module imports no torch (the runtime's boundary): the training-side methods
import it when called.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

IGNORE = -100  # the target of a token the loss skips (a word's later sub-tokens, specials, padding)


def _torch():
    import torch

    return torch


def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


class TaskKind:
    """The record of one task kind; subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    pipeline: ClassVar[str]  # the Hugging Face pipeline an export loads as
    head_mapping: ClassVar[str]  # transformers' auto mapping whose class names the head
    problem_type: ClassVar[str | None]  # config.json ``problem_type``
    token_level: ClassVar[bool] = False  # one row of logits per token, else per text
    has_labels: ClassVar[bool] = True  # class names (regression: none)
    one_label: ClassVar[bool] = False  # exactly one class per text (argmax): gold labels score an accuracy
    answers: ClassVar[str]  # what a model of the kind says about a text, for people (the model card)
    probe: ClassVar[str | None] = "classification"  # what the ridge-fitted skip fits (side/ridge.py); None: no probe
    selection: ClassVar[tuple[str, int]]  # (metric, +1 larger is better / -1 smaller) that picks the best epoch
    count_names: ClassVar[tuple[str, ...]] = ("right",)  # what :meth:`counts` sums per batch

    def num_outputs(self, labels: Sequence[str]) -> int:
        return len(labels)

    def score(self, metrics: dict[str, float]) -> float:
        """The validation metric that picks the best epoch, signed so that larger is better."""
        metric, sign = self.selection
        return sign * metrics[metric]

    def check_labels(self, labels: Sequence[str]) -> None:
        if len(labels) < 2:
            raise ValueError(f"a {self.name} model needs at least 2 labels, got {list(labels)}")

    # ---- training (torch) ---------------------------------------------------------------
    def targets(self, encs: list, values: list, labels: Sequence[str]):
        """The loss's targets (a tensor) for rows tokenized as ``encs`` whose labels are ``values``."""
        return _torch().tensor(values, dtype=_torch().long)

    def loss_sum(self, logits, target):
        """``(summed loss, scored count)`` of a batch, in fp32: ranks' shards of a batch add up."""
        torch = _torch()
        return (
            torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum"),
            target.new_tensor(target.numel()),
        )

    def counts(self, logits, target, labels: Sequence[str]) -> list[float]:
        """One batch's sums, named by :attr:`count_names`, that :meth:`metrics` turns into scores
        (added over batches and ranks first)."""
        return [float((logits.argmax(-1) == target).sum().item())]

    def metrics(self, loss: float, scored: float, counts: dict[str, float], labels: Sequence[str]) -> dict[str, float]:
        return {"loss": loss, "accuracy": counts["right"] / max(scored, 1)}

    def answer(self, logits: np.ndarray, labels: Sequence[str]) -> Any:
        """The short answer for one text's logits (``model.predict``): a label name here."""
        return labels[int(np.argmax(logits))]

    # ---- runtime (numpy) ----------------------------------------------------------------
    def read(self, logits: np.ndarray, labels: Sequence[str], text: str = "", enc: Any = None) -> dict[str, Any]:
        """One text's logits as the runtime returns them."""
        probs = softmax(logits)
        return {"label": labels[int(probs.argmax())], "probabilities": {n: float(p) for n, p in zip(labels, probs)}}

    def decisions(self, logits: np.ndarray) -> np.ndarray | None:
        """What two models must agree on (parity's label agreement), one row per scored unit; None: nothing."""
        return np.asarray(logits).argmax(-1)


class Classification(TaskKind):
    name = "classification"
    pipeline = "text-classification"
    head_mapping = "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"
    problem_type = "single_label_classification"
    one_label = True
    answers = "one label per text"
    selection = ("accuracy", 1)


class Regression(TaskKind):
    name = "regression"
    pipeline = "text-classification"  # transformers' pipeline returns the raw score of a regression head
    head_mapping = "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"
    problem_type = "regression"
    has_labels = False
    probe = "regression"
    answers = "one number per text (the `logits` output itself; no softmax)"
    selection = ("mse", -1)
    count_names = ()

    def num_outputs(self, labels: Sequence[str]) -> int:
        return 1

    def check_labels(self, labels: Sequence[str]) -> None:
        pass

    def targets(self, encs: list, values: list, labels: Sequence[str]):
        return _torch().tensor(values, dtype=_torch().float32)

    def loss_sum(self, logits, target):
        torch = _torch()
        return (
            torch.nn.functional.mse_loss(logits.float().squeeze(-1), target, reduction="sum"),
            target.new_tensor(target.numel()),
        )

    def counts(self, logits, target, labels: Sequence[str]) -> list[float]:
        return []

    def metrics(self, loss: float, scored: float, counts: dict[str, float], labels: Sequence[str]) -> dict[str, float]:
        return {"loss": loss, "mse": loss}

    def answer(self, logits: np.ndarray, labels: Sequence[str]) -> Any:
        return float(np.asarray(logits).reshape(-1)[0])

    def read(self, logits: np.ndarray, labels: Sequence[str], text: str = "", enc: Any = None) -> dict[str, Any]:
        row = np.asarray(logits).reshape(-1)
        return {"score": float(row[0]) if row.size == 1 else row.tolist()}

    def decisions(self, logits: np.ndarray) -> np.ndarray | None:
        return None


class TokenClassification(TaskKind):
    """Per-word tags, each word scored at its first sub-token; entity F1 picks the epoch for BIO tags."""

    name = "token-classification"
    pipeline = "token-classification"
    head_mapping = "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"
    problem_type = None
    token_level = True
    answers = "one label per token (entities as BIO tags)"
    selection = ("entity_f1", 1)  # BIO tags; other tag sets: the accuracy over words (score)
    count_names = ("right", "gold", "found", "matched")  # words right; entities gold, found, matched

    def score(self, metrics: dict[str, float]) -> float:
        return metrics["entity_f1"] if "entity_f1" in metrics else metrics["accuracy"]

    def targets(self, encs: list, values: list, labels: Sequence[str]):
        """``[batch, seq]``: each word's tag on its first sub-token, :data:`IGNORE` elsewhere;
        words cut off by truncation are not scored."""
        torch = _torch()
        out = torch.full((len(encs), max(1, max(len(e.ids) for e in encs))), IGNORE, dtype=torch.long)
        for b, (enc, word_tags) in enumerate(zip(encs, values)):
            prev = None
            for t, w in enumerate(enc.word_ids):
                if w is not None and w != prev:
                    out[b, t] = word_tags[w]
                prev = w
        return out

    def loss_sum(self, logits, target):
        torch = _torch()
        flat = target.flatten()
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), flat, ignore_index=IGNORE, reduction="sum"
        )
        return loss, (flat != IGNORE).sum()

    def counts(self, logits, target, labels: Sequence[str]) -> list[float]:
        from mpismoe_edge.metrics import entities, is_bio

        scored = target != IGNORE
        pred = logits.argmax(-1)
        out = [float((pred[scored] == target[scored]).sum().item()), 0.0, 0.0, 0.0]
        if is_bio(list(labels)):
            for t, p, m in zip(target.tolist(), pred.tolist(), scored.tolist()):
                gold = entities([labels[x] for x, keep in zip(t, m) if keep])
                found = entities([labels[x] for x, keep in zip(p, m) if keep])
                out[1:] = [out[1] + len(gold), out[2] + len(found), out[3] + len(gold & found)]
        return out

    def metrics(self, loss: float, scored: float, counts: dict[str, float], labels: Sequence[str]) -> dict[str, float]:
        from mpismoe_edge.metrics import f1_from_counts, is_bio

        out = {"loss": loss, "accuracy": counts["right"] / max(scored, 1)}
        if is_bio(list(labels)):
            out["entity_f1"] = f1_from_counts(int(counts["gold"]), int(counts["found"]), int(counts["matched"]))["f1"]
        return out

    def word_labels(self, logits: np.ndarray, labels: Sequence[str], enc: Any) -> list[str]:
        """A label per word of ``enc``, from its first sub-token's logits."""
        ids, seen, words = np.asarray(logits).argmax(-1), set(), []
        for t, w in enumerate(enc.word_ids):
            if w is not None and w not in seen:
                seen.add(w)
                words.append(labels[int(ids[t])])
        return words

    def read(self, logits: np.ndarray, labels: Sequence[str], text: str = "", enc: Any = None) -> dict[str, Any]:
        return {"words": _words(text, enc, softmax(logits), labels)}


class MultiLabelClassification(TaskKind):
    """Any number of labels per text: a sigmoid per label, each decided by its own threshold."""

    name = "multi-label-classification"
    pipeline = "text-classification"  # with function_to_apply="sigmoid" (transformers picks it from problem_type)
    head_mapping = "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"
    problem_type = "multi_label_classification"
    probe = None
    answers = "any number of labels per text (a sigmoid per label)"
    selection = ("micro_f1", 1)
    count_names = ("exact", "gold", "found", "matched")  # rows with every label right; (row, label) pairs
    threshold = 0.5  # a label is on when its probability is above this (logit > 0)

    def check_labels(self, labels: Sequence[str]) -> None:
        if len(labels) < 1:
            raise ValueError("a multi-label-classification model needs at least 1 label")

    def targets(self, encs: list, values: list, labels: Sequence[str]):
        """``[batch, labels]`` 0/1 floats from each row's list of label ids."""
        out = _torch().zeros(len(values), len(labels))
        for b, row in enumerate(values):
            out[b, list(row)] = 1.0
        return out

    def loss_sum(self, logits, target):
        torch = _torch()
        logits = logits.float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum")
        return loss / logits.shape[-1], target.new_tensor(target.shape[0])  # mean over labels, summed over rows

    def counts(self, logits, target, labels: Sequence[str]) -> list[float]:
        target = target > 0.5
        pred = logits > math.log(self.threshold / (1 - self.threshold))
        sums = ((pred == target).all(-1), target, pred, pred & target)
        return [float(x.sum().item()) for x in sums]

    def metrics(self, loss: float, scored: float, counts: dict[str, float], labels: Sequence[str]) -> dict[str, float]:
        from mpismoe_edge.metrics import f1_from_counts

        f1 = f1_from_counts(int(counts["gold"]), int(counts["found"]), int(counts["matched"]))["f1"]
        return {"loss": loss, "micro_f1": f1, "exact_match": counts["exact"] / max(scored, 1)}

    def answer(self, logits: np.ndarray, labels: Sequence[str]) -> Any:
        return [n for n, p in zip(labels, sigmoid(logits)) if p > self.threshold]

    def read(self, logits: np.ndarray, labels: Sequence[str], text: str = "", enc: Any = None) -> dict[str, Any]:
        probs = sigmoid(logits)
        return {
            "labels": [n for n, p in zip(labels, probs) if p > self.threshold],
            "probabilities": {n: float(p) for n, p in zip(labels, probs)},
        }

    def decisions(self, logits: np.ndarray) -> np.ndarray | None:
        return np.asarray(logits) > math.log(self.threshold / (1 - self.threshold))


KINDS: dict[str, TaskKind] = {
    k.name: k for k in (Classification(), Regression(), TokenClassification(), MultiLabelClassification())
}
TASKS: tuple[str, ...] = tuple(KINDS)
Task = enum.Enum("Task", {n.upper().replace("-", "_"): n for n in TASKS}, type=str)  # type: ignore[misc]


def kind(name: str) -> TaskKind:
    """The record of task ``name``; ValueError naming the known kinds otherwise."""
    try:
        return KINDS[str(getattr(name, "value", name))]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(KINDS)}") from None


def _words(text: str, enc: Any, probs: np.ndarray, labels: Sequence[str]) -> list[dict]:
    """The words of ``enc`` (by ``word_ids``; special tokens have none), each labelled by its
    first sub-word token, with its character span in ``text``."""
    spans: dict[int, list[int]] = {}  # word id -> [first token, end offset], in word order
    for t, (w, (_, end)) in enumerate(zip(enc.word_ids, enc.offsets)):
        if w is None:
            continue
        if w in spans:
            spans[w][1] = end
        else:
            spans[w] = [t, end]
    if spans and enc.overflowing:  # the last word may go on past max_length
        last = next(reversed(spans))
        for over in enc.overflowing:
            for w, (_, end) in zip(over.word_ids, over.offsets):
                if w == last:
                    spans[last][1] = end
    words = []
    for first, end in spans.values():
        start = enc.offsets[first][0]
        k = int(probs[first].argmax())
        words.append(
            {"word": text[start:end], "start": start, "end": end, "label": labels[k], "score": float(probs[first, k])}
        )
    return words
