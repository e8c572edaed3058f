"""Fit the ladder's linear skip in closed form before the side network trains (LP-FT style).

On small data the side network trained from scratch overfits, where a strongly regularized
ridge probe of the frozen states does not (docs/benchmarks.md). ``TrainConfig.skip_init =
"ridge"`` therefore starts training from that probe: the skip gets the ridge map of the frozen
backbone's pooled states (``side/ridge.py``, strength and logit scale chosen on validation)
and is frozen; the side network's head starts at zero, so the model before the first step *is*
the probe, and the side network learns only what the probe leaves. The probe is scored as
epoch 0, so a side network that never beats it on validation is not chosen.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .data import Dataset
from .inference import feed, tokenize
from .runtime.tasks import kind
from .runtime.text import TextEncoder
from .side.ridge import Probe, fit_probe


@torch.no_grad()
def skip_features(
    model, tok: TextEncoder, data: Dataset, batch_size: int, device: torch.device, desc: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, targets)`` of every scored row (token classification: every scored word's
    first sub-token) as the skip sees them, in eval mode."""
    was = model.training
    model.eval()
    task = kind(model.config.task)
    xs, ys = [], []
    for start in tqdm(range(0, len(data), batch_size), desc=desc, disable=desc is None, leave=False):
        encs = tokenize(tok, data.texts[start : start + batch_size])
        inputs = feed(tok, encs, model.input_names, device)
        mask = inputs.get("attention_mask")
        x = model.side.skip_features(model.backbone_states(**inputs), mask).float().cpu()
        y = task.targets(encs, data.targets[start : start + batch_size], model.config.labels)
        if task.token_level:
            keep = y != -100
            x, y = x[keep], y[keep]
        xs.append(x)
        ys.append(y)
    model.train(was)
    return torch.cat(xs), torch.cat(ys)


def fit_skip(
    model,
    tok: TextEncoder,
    train_data: Dataset,
    eval_data: Dataset,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> Probe:
    """Put the ridge probe into ``model.side.skip``, freeze it, and zero the side network's head."""
    side = model.side
    if side.skip is None:
        raise ValueError("skip_init='ridge' needs a side network with the linear skip (SideConfig.skip=True)")
    probe_kind = kind(model.config.task).probe
    if probe_kind is None:
        raise ValueError(f"no ridge probe fits a {model.config.task} skip; train it from zero (skip_init='zero')")
    x_train, y_train = skip_features(
        model, tok, train_data, batch_size, device, "skip features (train)" if progress else None
    )
    x_val, y_val = skip_features(
        model, tok, eval_data, batch_size, device, "skip features (validation)" if progress else None
    )
    probe = fit_probe(probe_kind, x_train, y_train, x_val, y_val, model.config.num_outputs)
    install_probe(side, probe)
    return probe


@torch.no_grad()
def install_probe(side, probe: Probe) -> None:
    """The fitted probe into the side network's skip, frozen, and the head zeroed: before its
    first step the side network computes the probe alone."""
    side.skip.weight.copy_(probe.weight)
    side.skip.bias.copy_(probe.bias)
    side.head.weight.zero_()
    side.head.bias.zero_()
    side.skip.requires_grad_(False)
