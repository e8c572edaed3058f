"""Inference with a PyTorch model: tokenizer, batching by length, logits, scores, labels.

Training uses these to score each epoch; a user predicts with ``model.predict(texts)``
(:func:`predict_labels`). Scoring can be sharded over the ranks of a distributed run: each
rank scores its share of the rows and the sums are added up across ranks (:func:`evaluate`).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from .data import Dataset
from .runtime.tasks import kind
from .runtime.text import TextEncoder


def make_tokenizer(tokenizer_json: str, max_length: int) -> TextEncoder:
    """The model's own tokenizer (the same JSON the exporter ships and the runtime reads)."""
    return TextEncoder(Tokenizer.from_str(tokenizer_json), max_length)


def tokenize(tok: TextEncoder, texts: list[str] | list[list[str]]) -> list:
    """Encodings of strings, or of lists of words (token classification)."""
    return tok.tokenize_words(texts) if texts and isinstance(texts[0], list) else tok.tokenize(texts)


def feed(
    tok: TextEncoder, encs: list, input_names: list[str], device: torch.device | str | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded model inputs of ``encs`` (only the tensors the model takes), on ``device``."""
    arrays = tok.pad(encs).arrays()
    return {k: torch.from_numpy(arrays[k]).to(device) for k in input_names if k in arrays}


def encode(
    tok: TextEncoder,
    texts: list[str] | list[list[str]],
    input_names: list[str],
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize and right-pad a batch to its longest text; only the tensors the model takes."""
    return feed(tok, tokenize(tok, texts), input_names, device)


def token_lengths(tok: TextEncoder, texts: list[str] | list[list[str]]) -> list[int]:
    return [len(e.ids) for e in tokenize(tok, texts)]


def _device(model: torch.nn.Module) -> torch.device:
    return next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))


@torch.no_grad()
def logits_by_length(
    model: torch.nn.Module,
    tok: TextEncoder,
    texts: list[str] | list[list[str]],
    input_names: list[str],
    batch_size: int,
    progress: str | None = None,
) -> list[tuple[list[int], list, torch.Tensor]]:
    """``(row indices, their encodings, logits)`` per batch of similar-length texts, in eval mode
    (each text tokenized once), on the model's device; ``progress`` names a progress bar."""
    from tqdm.auto import tqdm

    was = model.training
    model.eval()
    device = _device(model)
    encs = tokenize(tok, texts)
    order = sorted(range(len(texts)), key=lambda i: len(encs[i].ids))
    out = []
    starts = range(0, len(order), batch_size)
    for i in tqdm(starts, desc=progress, disable=progress is None, leave=False):
        idx = order[i : i + batch_size]
        batch = [encs[j] for j in idx]
        out.append((idx, batch, model(**feed(tok, batch, input_names, device))))
    model.train(was)
    return out


def predict(
    model: torch.nn.Module,
    tok: TextEncoder,
    texts: list[str],
    input_names: list[str],
    batch_size: int = 64,
    progress: str | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Logits for ``texts`` in eval mode (batched by length, returned in input order, on the CPU):
    ``[len(texts), outputs]``, or for token-level logits a list with one ``[tokens, labels]``
    tensor per text (its real tokens, special tokens included)."""
    out = None
    rows: list[torch.Tensor] = [torch.empty(0)] * len(texts)
    for idx, encs, logits in logits_by_length(model, tok, texts, input_names, batch_size, progress):
        logits = logits.float().cpu()
        if logits.ndim == 3:
            for b, (j, enc) in enumerate(zip(idx, encs)):
                rows[j] = logits[b, : len(enc.ids)]
            continue
        if out is None:
            out = logits.new_empty(len(texts), logits.shape[-1])
        out[idx] = logits
    return rows if out is None else out


def evaluate(
    model,
    tok: TextEncoder,
    data: Dataset,
    batch_size: int = 64,
    shard: tuple[int, int] = (0, 1),
    progress: str | None = None,
) -> dict[str, float]:
    """The loss and the task's metrics (``runtime.tasks``: accuracy; for token classification
    over words, each scored at its first sub-token, and entity F1 for BIO tags; MSE; micro-F1).
    ``shard=(rank, world)``: this rank scores rows ``rank::world`` and the sums are added over the
    process group (every rank gets the whole data's figures)."""
    from . import distributed

    rank, world = shard
    rows = list(range(rank, len(data), world))
    task, labels = kind(model.config.task), model.config.labels
    sums = torch.zeros(2 + len(task.count_names), dtype=torch.float64)  # loss, scored, the kind's counts
    texts = [data.texts[j] for j in rows]
    for idx, encs, logits in logits_by_length(model, tok, texts, model.input_names, batch_size, progress):
        target = task.targets(encs, [data.targets[rows[j]] for j in idx], labels).to(logits.device)
        loss, count = task.loss_sum(logits, target)
        sums += torch.tensor([loss.item(), count.item(), *task.counts(logits, target, labels)], dtype=torch.float64)
    if world > 1:
        sums = distributed.all_sum(sums)
    loss, scored, *counts = sums.tolist()
    return task.metrics(loss / max(scored, 1), scored, dict(zip(task.count_names, counts)), labels)


def predict_labels(model, texts: list[str] | list[list[str]], batch_size: int = 64) -> list:
    """What a trained model says about ``texts``: a label name per text (classification), a
    number (regression), the label names that apply (multi-label), or for token classification a
    label name per word of each text (given as a list of words; each word labelled at its first
    sub-token)."""
    if model.tokenizer_json is None:
        raise ValueError("the model has no tokenizer; predicting from texts needs the backbone's tokenizer.json")
    tok = make_tokenizer(model.tokenizer_json, model.config.max_length)
    task, labels = kind(model.config.task), model.config.labels
    out = predict(model, tok, texts, model.input_names, batch_size)
    if task.token_level:
        return [task.word_labels(logits.numpy(), labels, enc) for enc, logits in zip(tokenize(tok, texts), out)]
    return [task.answer(row, labels) for row in out.numpy()]
