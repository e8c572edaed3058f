"""Dataclass configs that round-trip through JSON (nested dataclasses included)."""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T", bound="JsonConfig")


class JsonConfig:
    """Mixin: ``to_dict``/``from_dict``/``to_json``/``from_json`` for a dataclass tree."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        kwargs = {}
        for key, value in data.items():
            sub = _config_class(hints[key])
            kwargs[key] = sub.from_dict(value) if sub is not None and isinstance(value, dict) else value
        return cls(**kwargs)

    @classmethod
    def from_json(cls: type[T], text: str) -> T:
        return cls.from_dict(json.loads(text))


def _config_class(hint: Any) -> type[JsonConfig] | None:
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and issubclass(candidate, JsonConfig):
            return candidate
    return None


@dataclass
class QuantConfig(JsonConfig):
    """How to quantize Linear (and Embedding) weights: default width, per-layer widths, method and its knobs.

    ``bits_map`` maps a layer name, or an fnmatch pattern of names, to a width; an exact name
    wins over patterns, and the first matching pattern over later ones.
    """

    bits: int = 4
    group_size: int = 64
    method: str = "gnpiq"  # "gnpiq" | "rtn"
    bits_map: dict[str, int] = field(default_factory=dict)
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    embeddings: bool = True  # also pack nn.Embedding tables (groups along the embedding dim)
    iters: int = 6
    restarts: int = 4
    noise: float = 1.0
    seed: int = 0


TASKS = ("classification", "regression", "token-classification")  # ModelConfig.task (Hugging Face pipeline names)
SIDE_INITS = ("pruned", "random")  # SideConfig.init: slices of the backbone (side/prune.py), or random weights


@dataclass
class SideConfig(JsonConfig):
    """The ladder side network and its interactive side mixture-of-experts (ISMoE)."""

    reduction: int = 8            # side width = backbone hidden / reduction
    layers: list[int] | None = None  # backbone layers to tap (1-based hidden_states index); None: all
    num_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    expert_ratio: int = 4         # expert hidden = expert_ratio * side width
    shared_expert: bool = False
    salient_tau: float = 0.1      # softmax temperature of the router's salient-token pooling
    interactive: bool = True      # router sees backbone features (False: side token only)
    dense_ffn: bool = False       # one dense FFN instead of experts (the LST baseline)
    expert_bits: int | None = None  # quantization-aware training of experts, then packed
    expert_group_size: int = 16
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    dropout: float = 0.1
    init: str = "pruned"          # "pruned": down-projections and FFNs start as slices of the backbone (side/prune.py); "random"


@dataclass
class ModelConfig(JsonConfig):
    """Everything needed to rebuild an MP-ISMoE model without downloads."""

    backbone: str = ""                       # where it came from (provenance only)
    backbone_config: dict[str, Any] = field(default_factory=dict)  # HF config.to_dict()
    task: str = "classification"             # one of TASKS
    labels: list[str] = field(default_factory=list)
    max_length: int = 128
    side: SideConfig = field(default_factory=SideConfig)
    quant: QuantConfig | None = field(default_factory=QuantConfig)  # backbone; None keeps fp32

    @property
    def num_outputs(self) -> int:
        return 1 if self.task == "regression" else len(self.labels)
