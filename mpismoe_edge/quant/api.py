"""``quantize_model(model, config)``: swap matching ``nn.Linear`` / ``nn.Embedding`` layers for packed ones."""

from __future__ import annotations

import fnmatch

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import QUANT_METHODS as METHODS
from ..config import QuantConfig
from .embedding import QuantEmbedding
from .gnpiq import gnpiq_quantize
from .linear import QuantLinear
from .rtn import GroupQuant, check_weight, rtn_quantize


def bits_for(name: str, config: QuantConfig) -> int:
    """The width ``config`` gives the layer ``name`` (exact name, then first matching pattern)."""
    if name in config.bits_map:
        return config.bits_map[name]
    for pattern, bits in config.bits_map.items():
        if fnmatch.fnmatchcase(name, pattern):
            return bits
    return config.bits


def quantize_weight(weight: torch.Tensor, bits: int, config: QuantConfig, name: str = "weight") -> GroupQuant:
    """One weight ``[N, K]`` with the config's method."""
    if config.method == "rtn":
        return rtn_quantize(weight, bits, config.group_size, name=name)
    if config.method == "gnpiq":
        return gnpiq_quantize(
            weight,
            bits,
            config.group_size,
            iters=config.iters,
            restarts=config.restarts,
            noise=config.noise,
            seed=config.seed,
            name=name,
        )
    raise ValueError(f"unknown quantization method {config.method!r}; expected one of {METHODS}")


def _chosen(name: str, config: QuantConfig) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in config.include) and not any(
        fnmatch.fnmatchcase(name, p) for p in config.exclude
    )


def selected_linears(model: nn.Module, config: QuantConfig) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of ``model`` that ``config`` includes and does not exclude."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and _chosen(n, config)}


def selected_layers(model: nn.Module, config: QuantConfig) -> dict[str, nn.Module]:
    """The layers ``quantize_model`` packs: selected Linears, plus selected ``nn.Embedding``
    tables when ``config.embeddings`` is set and their width is a multiple of the group size
    (a narrower table, like MPNet's 32 x 12 relative-attention bias, stays float: it is a few
    hundred numbers and cannot form one group)."""
    layers: dict[str, nn.Module] = dict(selected_linears(model, config))
    if config.embeddings:
        layers.update(
            (n, m)
            for n, m in model.named_modules()
            if isinstance(m, nn.Embedding) and _chosen(n, config) and m.embedding_dim % config.group_size == 0
        )
    return layers


def _packed(q: GroupQuant, layer: nn.Module) -> nn.Module:
    if isinstance(layer, nn.Embedding):
        return QuantEmbedding.from_quantized(q, layer.padding_idx).to(layer.weight.device)
    return QuantLinear.from_quantized(q, layer.bias).to(layer.weight.device)


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantConfig, progress: bool = True) -> dict[str, int]:
    """Quantize ``model`` in place; returns the bit map applied (layer name -> bits).

    Every layer is checked and quantized before any is swapped, so a bad layer raises a
    ValueError naming it and leaves the model untouched.
    """
    if config.method not in METHODS:
        raise ValueError(f"unknown quantization method {config.method!r}; expected one of {METHODS}")
    layers = selected_layers(model, config)
    unknown = [k for k in config.bits_map if k not in layers and not any(fnmatch.fnmatchcase(n, k) for n in layers)]
    if unknown:
        raise ValueError(f"bits_map names layers that are not quantized Linear/Embedding layers: {unknown}")
    for name, layer in layers.items():
        check_weight(layer.weight, bits_for(name, config), config.group_size, name)
    new: dict[str, nn.Module] = {}
    for name, layer in tqdm(layers.items(), desc="quantize", disable=not progress, leave=False):
        new[name] = _packed(quantize_weight(layer.weight, bits_for(name, config), config, name), layer)
    for name, qlin in new.items():
        model.set_submodule(name, qlin)
    return {name: q.bits for name, q in new.items()}


def load_quantized_state(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Turn the ``nn.Linear``/``nn.Embedding`` shells that ``state_dict`` stores packed into
    ``QuantLinear``/``QuantEmbedding``, then load it.

    Bits and group size follow from the tensor shapes (``qweight`` ``[N, K/G, G*bits/8]``),
    so a checkpoint needs no separate record of which layers are quantized.
    """
    for key, qweight in state_dict.items():
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        lin = model.get_submodule(name)
        if isinstance(lin, (QuantLinear, QuantEmbedding)):
            continue
        if isinstance(lin, nn.Embedding):
            group_size = lin.embedding_dim // qweight.shape[1]
            q = QuantEmbedding(
                lin.num_embeddings, lin.embedding_dim, qweight.shape[2] * 8 // group_size, group_size, lin.padding_idx
            )
        elif isinstance(lin, nn.Linear):
            group_size = lin.in_features // qweight.shape[1]
            bits = qweight.shape[2] * 8 // group_size
            q = QuantLinear(lin.in_features, lin.out_features, bits, group_size, bias=lin.bias is not None)
        else:
            raise ValueError(
                f"{name}: checkpoint holds a packed weight for a {type(lin).__name__}, not a Linear or Embedding"
            )
        model.set_submodule(name, q)
    model.load_state_dict(state_dict)
