"""Inference with a PyTorch model: tokenizer, batching by length, logits, scores, labels.

Training uses these to score each epoch; a user predicts with ``model.predict(texts)``
(:func:`predict_labels`). Scoring can be sharded over the ranks of a distributed run: each
rank scores its share of the rows and the sums are added up across ranks (:func:`evaluate`).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from .data import Dataset
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


def word_targets(encs: list, tags: list[list[int]]) -> torch.Tensor:
    """``[batch, seq]`` token targets from word tags: each word's tag on its first sub-token,
    -100 (ignored by the loss) on its other sub-tokens, special tokens and padding. Words cut
    off by truncation are not scored."""
    out = torch.full((len(encs), max(1, max(len(e.ids) for e in encs))), -100, dtype=torch.long)
    for b, (enc, word_tags) in enumerate(zip(encs, tags)):
        prev = None
        for t, w in enumerate(enc.word_ids):
            if w is not None and w != prev:
                out[b, t] = word_tags[w]
            prev = w
    return out


def targets(task: str, encs: list, values: list) -> torch.Tensor:
    """The loss's targets for rows tokenized as ``encs``: class ids, regression values, or for
    token classification ``word_targets``."""
    if task == "token-classification":
        return word_targets(encs, values)
    return torch.tensor(values, dtype=torch.float32 if task == "regression" else torch.long)


def loss_sum(task: str, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(summed loss, scored count)`` of a batch: the mean is their ratio; kept apart so that
    shards of a batch (ranks) add up to the whole batch's mean. Computed in fp32."""
    logits = logits.float()
    if task == "regression":
        return torch.nn.functional.mse_loss(logits.squeeze(-1), target, reduction="sum"), target.new_tensor(
            target.numel()
        )
    if task == "token-classification":
        flat = target.flatten()
        return (
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), flat, ignore_index=-100, reduction="sum"),
            (flat != -100).sum(),
        )
    return torch.nn.functional.cross_entropy(logits, target, reduction="sum"), target.new_tensor(target.numel())


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
    """Accuracy (classification; for token classification over words, each scored at its first
    sub-token) or MSE (regression), plus the loss; for BIO-tagged token classification also the
    entity-level F1 of the words scored (``metrics.entity_f1``). ``shard=(rank, world)``: this
    rank scores rows ``rank::world`` and the sums are added over the process group (every rank
    gets the whole data's figures)."""
    from . import distributed
    from .metrics import entities, f1_from_counts, is_bio

    rank, world = shard
    rows = list(range(rank, len(data), world))
    task = model.config.task
    labels = model.config.labels
    bio = task == "token-classification" and is_bio(labels)
    sums = torch.zeros(6, dtype=torch.float64)  # loss, right, scored; entities gold, found, matched
    texts = [data.texts[j] for j in rows]
    for idx, encs, logits in logits_by_length(model, tok, texts, model.input_names, batch_size, progress):
        target = targets(task, encs, [data.targets[rows[j]] for j in idx]).to(logits.device)
        loss, count = loss_sum(task, logits, target)
        sums[0] += loss.item()
        sums[2] += count.item()
        if task != "regression":
            scored = target != -100
            pred = logits.argmax(-1)
            sums[1] += (pred[scored] == target[scored]).sum().item()
        if bio:
            for t, p, m in zip(target.tolist(), pred.tolist(), scored.tolist()):
                gold = entities([labels[x] for x, keep in zip(t, m) if keep])
                found = entities([labels[x] for x, keep in zip(p, m) if keep])
                sums[3:] += torch.tensor([len(gold), len(found), len(gold & found)], dtype=torch.float64)
    if world > 1:
        sums = distributed.all_sum(sums)
    loss = sums[0].item() / max(sums[2].item(), 1)
    if task == "regression":
        return {"loss": loss, "mse": loss}
    out = {"loss": loss, "accuracy": sums[1].item() / max(sums[2].item(), 1)}
    if bio:
        out["entity_f1"] = f1_from_counts(*(int(x) for x in sums[3:].tolist()))["f1"]
    return out


def predict_labels(model, texts: list[str] | list[list[str]], batch_size: int = 64) -> list:
    """What a trained model says about ``texts``: a label name per text (classification), a
    number (regression), or for token classification a label name per word of each text (given
    as a list of words; each word labelled at its first sub-token)."""
    if model.tokenizer_json is None:
        raise ValueError("the model has no tokenizer; predicting from texts needs the backbone's tokenizer.json")
    tok = make_tokenizer(model.tokenizer_json, model.config.max_length)
    task, labels = model.config.task, model.config.labels
    out = predict(model, tok, texts, model.input_names, batch_size)
    if task == "regression":
        return out.squeeze(-1).tolist()
    if task != "token-classification":
        return [labels[i] for i in out.argmax(-1).tolist()]
    result = []
    for enc, logits in zip(tokenize(tok, texts), out):
        ids, seen = logits.argmax(-1).tolist(), set()
        words = []
        for t, w in enumerate(enc.word_ids):
            if w is not None and w not in seen:
                seen.add(w)
                words.append(labels[ids[t]])
        result.append(words)
    return result
