"""How every method of a benchmark is scored: the task's metrics and loss, and the trivial baseline.

One function scores every method (full fine-tuning, LoRA, the side networks, ``mpismoe-train``'s
checkpoint) from its logits, so no method is scored by its own code. Metrics: accuracy;
entity-level F1 (seqeval's default mode) and word accuracy for token classification, each word
predicted at its first sub-token and a word cut off by ``max_length`` predicted ``O``; Pearson,
Spearman and MSE for regression. The loss comes too: it breaks ties when an epoch is chosen
(``mpismoe_edge.selection``).
"""

from __future__ import annotations

import statistics


def word_predictions(logits_per_text: list, encs: list, n_words: list[int], fill: int) -> list[list[int]]:
    """Per text, each word's predicted id at its first sub-token; ``fill`` for words cut off."""
    out = []
    for logits, enc, n in zip(logits_per_text, encs, n_words):
        pred, prev = [fill] * n, None
        for t, w in enumerate(enc.word_ids):
            if w is not None and w != prev:
                pred[w] = int(logits[t].argmax())
            prev = w
        out.append(pred)
    return out


def score(model, tok, data, info: dict, names: list[str]) -> dict[str, float]:
    """The task's metrics of ``model`` on ``data`` (``info``: the task's ``task.json``: its kind
    and labels) and the loss; ``names``: the inputs the model takes."""
    import torch
    import torch.nn.functional as F

    from mpismoe_edge import metrics
    from mpismoe_edge.inference import predict
    from mpismoe_edge.runtime.tasks import IGNORE, kind

    logits = predict(model, tok, data.texts, names)
    if info["task"] == "regression":
        pred = logits[:, 0].tolist()
        mse = statistics.fmean((p - y) ** 2 for p, y in zip(pred, data.targets))
        return {
            "pearson": metrics.pearson(pred, data.targets),
            "spearman": metrics.spearman(pred, data.targets),
            "mse": mse,
            "loss": mse,
        }
    if info["task"] == "token-classification":
        labels, task = data.labels, kind("token-classification")
        encs = tok.tokenize_words(data.texts)
        pred = word_predictions(logits, encs, [len(w) for w in data.texts], labels.index("O"))
        flat_true = [t for row in data.targets for t in row]
        flat_pred = [p for row in pred for p in row]
        f1 = metrics.entity_f1(
            [[labels[t] for t in row] for row in data.targets], [[labels[p] for p in row] for row in pred]
        )
        target = task.targets(encs, data.targets, labels)  # [texts, longest]: the word's tag at its first sub-token
        loss = sum(
            task.loss_sum(lg.unsqueeze(0), target[i : i + 1, : len(lg)])[0].item() for i, lg in enumerate(logits)
        ) / max(int((target != IGNORE).sum()), 1)
        return {
            "entity_f1": f1["f1"],
            "precision": f1["precision"],
            "recall": f1["recall"],
            "word_accuracy": metrics.accuracy(flat_true, flat_pred),
            "loss": loss,
        }
    target = torch.tensor(data.targets)
    return {
        "accuracy": (logits.argmax(-1) == target).float().mean().item(),
        "loss": F.cross_entropy(logits, target).item(),
    }


def baseline(info: dict, train, test) -> dict[str, float]:
    """The majority class (all ``O`` for NER) or the training mean, scored on ``test``."""
    from mpismoe_edge import metrics

    if info["task"] == "regression":
        mean = statistics.fmean(train.targets)
        return {"pearson": 0.0, "spearman": 0.0, "mse": statistics.fmean((mean - y) ** 2 for y in test.targets)}
    if info["task"] == "token-classification":
        o = info["labels"].index("O")
        pred = [["O"] * len(row) for row in test.targets]
        true = [[info["labels"][t] for t in row] for row in test.targets]
        return {
            "entity_f1": metrics.entity_f1(true, pred)["f1"],
            "word_accuracy": metrics.accuracy(
                [t for r in test.targets for t in r], [o for r in test.targets for _ in r]
            ),
        }
    top = statistics.mode(train.targets)
    return {"accuracy": metrics.accuracy(test.targets, [top] * len(test.targets))}
