"""Per-layer sensitivity: how much each quantizable Linear's OUTPUT degrades at each width.

For a layer with float weight ``W`` ``[N, K]`` and calibration inputs ``X`` ``[R, K]`` (token
rows captured with forward hooks on the float model), the sensitivity at width ``b`` is

    err(b) = ||X W^T - X Wq(b)^T||_F^2 / ||X W^T||_F^2

with ``Wq(b)`` the dequantized weight that ``quantize_weight`` (the model's own method,
group size and seed) gives at ``b`` bits. The bias cancels. Padding tokens are left out
(rows are selected with the batch's attention mask) and at most ``max_rows`` rows are kept
per layer: a uniform sample without replacement, seeded (smallest random keys win), so
memory stays bounded however much data passes through.

Relative errors of different layers are not worth the same: 10% error on a small attention
output barely moves the network, 1% on the first FFN output moves it a lot. So each layer
also gets a propagation gain: with only that layer's weight replaced by its smallest-width
``Wq``, the mean relative error of the model's hidden states (every layer's output: what the
side network reads) on a few calibration texts, divided by the layer's ``err`` at that width.
``gain * err(b)`` then estimates the hidden-state error that width ``b`` of that layer causes
(first order: output error scales with the injected noise power), one forward pass per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from mpismoe_edge.config import QuantConfig
from mpismoe_edge.quant.api import quantize_weight, selected_linears
from mpismoe_edge.quant.linear import QuantLinear
from mpismoe_edge.quant.pack import SUPPORTED_BITS
from mpismoe_edge.quant.rtn import GroupQuant


@dataclass
class LayerSensitivity:
    """What calibration measured for one layer."""

    name: str
    out_features: int
    in_features: int
    bias: bool
    rows: int  # calibration token rows the errors were measured on (0: weights only)
    energy: float  # mean ||x W^T||^2 per row (||W||_F^2 when rows == 0)
    errors: dict[int, float] = field(default_factory=dict)  # width -> relative output error
    gain: float | None = None  # hidden-state error per unit of errors[min width]; None: not measured

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


def _keep_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Token rows of a Linear's input ``[..., K]``, without padding where the mask lines up."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


class _Reservoir:
    """Uniform sample of at most ``cap`` rows from a stream: keep the rows with the smallest random keys."""

    def __init__(self, cap: int, gen: torch.Generator):
        self.cap, self.gen = cap, gen
        self.rows: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().float().cpu()
        keys = torch.rand(rows.shape[0], generator=self.gen)
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        if rows.shape[0] > self.cap:
            keys, idx = keys.topk(self.cap, largest=False)
            rows = rows[idx]
        self.rows, self.keys = rows, keys


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    max_rows: int = 4096,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Input rows ``[R <= max_rows, K]`` of each layer in ``layers`` while ``model(**batch)`` runs.

    Rows at padded positions (``attention_mask == 0``) are dropped. Layers that never ran are
    missing from the result. Hooks are removed even if a forward pass fails.
    """
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    stores = {name: _Reservoir(max_rows, torch.Generator().manual_seed(seed + i)) for i, name in enumerate(layers)}
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str):
        def fn(_module, args):
            stores[name].add(_keep_rows(args[0], state["mask"]))

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="calibration forward", disable=not progress, leave=False):
            state["mask"] = batch.get("attention_mask")
            model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: s.rows for n, s in stores.items() if s.rows is not None and s.rows.shape[0] > 0}


def output_error(x: torch.Tensor, weight: torch.Tensor, wq: torch.Tensor) -> float:
    """``||X W^T - X Wq^T||_F^2 / ||X W^T||_F^2`` (0 when the float output is all zero and so is the error)."""
    x, weight, wq = x.float(), weight.float(), wq.float()
    ref = (x @ weight.T).double().square().sum()
    err = (x @ (weight - wq).T).double().square().sum()  # the difference first: no cancellation
    if ref == 0:
        return 0.0 if err == 0 else float("inf")
    return float(err / ref)


@torch.no_grad()
def _state_rows(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """The model's hidden states after the embeddings (``last_hidden_state`` alone when it gives
    none), unpadded token rows of all batches concatenated, one tensor per state."""
    per_batch = []
    for batch in batches:
        out = model(**batch, output_hidden_states=True)
        states = getattr(out, "hidden_states", None)
        states = states[1:] if states else [out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]]
        per_batch.append([_keep_rows(h, batch.get("attention_mask")).float() for h in states])
    return [torch.cat(rows) for rows in zip(*per_batch)]


def hidden_error(states: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """Mean over states of ``||state - ref||_F^2 / ||ref||_F^2``."""
    errs = [
        float((s - r).double().square().sum() / r.double().square().sum().clamp(min=1e-30)) for s, r in zip(states, ref)
    ]
    return sum(errs) / len(errs)


def layer_sensitivity(
    name: str,
    layer: nn.Linear,
    x: torch.Tensor | None,
    config: QuantConfig,
    widths: Sequence[int] = SUPPORTED_BITS,
    probe: Callable[[torch.Tensor], float] | None = None,
    keep: dict[int, GroupQuant] | None = None,
) -> LayerSensitivity:
    """Sensitivity of one Linear at each width; with ``x is None`` the weights stand in for the
    inputs (``X = I``: relative weight error), for a layer that saw no calibration data.

    ``probe(wq)``, if given, returns the model's hidden-state error with this layer's weight
    set to ``wq``; it is called once, with the smallest width, to measure the gain. ``keep``, if
    given, receives the quantized weight at each width (what ``quantize_model`` would make)."""
    w = layer.weight.detach().float().cpu()
    widths = sorted(widths)
    errors, lowest = {}, None
    for b in widths:
        q = quantize_weight(w, b, config, name)
        if keep is not None:
            keep[b] = q
        wq = q.dequantize()
        lowest = wq if lowest is None else lowest
        errors[b] = (
            output_error(x, w, wq)
            if x is not None
            else float((w - wq).square().sum() / w.square().sum().clamp(min=1e-30))
        )
    if x is None:
        rows, energy = 0, float(w.square().sum())
    else:
        rows, energy = x.shape[0], float((x @ w.T).double().square().sum() / x.shape[0])
    gain = None
    if probe is not None:
        gain = probe(lowest) / errors[widths[0]] if errors[widths[0]] > 0 else 0.0
    n, k = w.shape
    return LayerSensitivity(name, n, k, layer.bias is not None, rows, energy, errors, gain)


def measure_sensitivities(
    model: nn.Module,
    config: QuantConfig,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    widths: Sequence[int] = SUPPORTED_BITS,
    max_rows: int = 4096,
    seed: int = 0,
    gain_batches: Sequence[dict[str, torch.Tensor]] | None = None,
    quantized: dict[str, dict[int, GroupQuant]] | None = None,
    progress: bool = False,
) -> list[LayerSensitivity]:
    """Sensitivities of every Linear of the float ``model`` that ``config`` selects, in module order.

    With ``gain_batches`` (a few batches of calibration inputs), each layer's propagation gain
    is measured too (one forward pass over them per layer; the weight is restored after).
    ``quantized``, if given, is filled with every layer's quantized weight at every width, so
    that any allocation can be applied without quantizing again."""
    bad = [b for b in widths if b not in SUPPORTED_BITS]
    if bad or not widths:
        raise ValueError(f"candidate widths {list(widths)} must be a non-empty subset of {SUPPORTED_BITS}")
    layers = selected_linears(model, config)
    if not layers:
        raise ValueError("the quantization config selects no nn.Linear layer of the model (is it already quantized?)")
    inputs = capture_inputs(model, layers, batches, max_rows=max_rows, seed=seed, progress=progress)
    if not inputs:
        raise ValueError("no calibration rows reached the model's layers (empty calibration data?)")
    widths = sorted(set(widths))
    was_training = model.training
    model.eval()
    try:
        ref = _state_rows(model, gain_batches) if gain_batches else None

        def probe_for(layer: nn.Linear) -> Callable[[torch.Tensor], float] | None:
            if ref is None:
                return None

            def probe(wq: torch.Tensor) -> float:
                saved = layer.weight.data.clone()
                layer.weight.data.copy_(wq)
                try:
                    return hidden_error(_state_rows(model, gain_batches), ref)
                finally:
                    layer.weight.data.copy_(saved)

            return probe

        return [
            layer_sensitivity(
                n,
                m,
                inputs.get(n),
                config,
                widths,
                probe_for(m),
                None if quantized is None else quantized.setdefault(n, {}),
            )
            for n, m in tqdm(layers.items(), desc="sensitivity", disable=not progress, leave=False)
        ]
    finally:
        model.train(was_training)


@torch.no_grad()
def apply_bits(model: nn.Module, quantized: dict[str, dict[int, GroupQuant]], bits_map: dict[str, int]) -> None:
    """Swap each Linear named in ``bits_map`` for a ``QuantLinear`` of the width it maps to, from the
    weights ``measure_sensitivities(quantized=...)`` kept: what ``quantize_model`` would make with
    that bits map (the quantizer is deterministic), without quantizing again."""
    for name, bits in bits_map.items():
        lin = model.get_submodule(name)
        model.set_submodule(name, QuantLinear.from_quantized(quantized[name][bits], lin.bias).to(lin.weight.device))


def text_batches(
    tokenizer_json: str, texts: Sequence[str], max_length: int, batch_size: int = 32
) -> list[dict[str, torch.Tensor]]:
    """Backbone inputs for ``texts`` with the model's own tokenizer: truncated to ``max_length``,
    padded per batch to its longest text."""
    from mpismoe_edge.inference import encode, make_tokenizer
    from mpismoe_edge.runtime.spec import TEXT_INPUTS

    tok = make_tokenizer(tokenizer_json, max_length)
    return [encode(tok, list(texts[i : i + batch_size]), list(TEXT_INPUTS)) for i in range(0, len(texts), batch_size)]
