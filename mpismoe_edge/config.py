"""Dataclass configs that validate when built and round-trip through JSON (nested dataclasses included).

Fields with a fixed set of values are typed ``Literal[...]`` (or ``Literal[...] | None``) and
checked against it on construction, so ``QuantConfig(method="awq")`` raises at once; the other
checks live in each class's ``__post_init__``. Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .runtime.tasks import TASKS, kind

T = TypeVar("T", bound="JsonConfig")

BitWidth = Literal[2, 3, 4, 8]  # packed widths (quant/pack.py); 2/4/8 also run as MatMulNBits
QuantMethod = Literal["gnpiq", "rtn"]
SideInit = Literal["pruned", "random"]  # slices of the backbone (side/prune.py), or random weights
Device = Literal["auto", "cpu", "cuda"]  # auto: CUDA when PyTorch sees one (device.py)
Precision = Literal["fp32", "bf16", "fp16"]  # bf16/fp16: autocast of the forward pass (device.py)
SkipInit = Literal["ridge", "zero"]  # ridge: the closed-form probe, frozen (skip_fit.py); zero: trained from zero
BITS: tuple[int, ...] = typing.get_args(BitWidth)
QUANT_METHODS: tuple[str, ...] = typing.get_args(QuantMethod)
SIDE_INITS: tuple[str, ...] = typing.get_args(SideInit)
DEVICES: tuple[str, ...] = typing.get_args(Device)
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
SKIP_INITS: tuple[str, ...] = typing.get_args(SkipInit)
__all__ = [
    "BITS",
    "DEVICES",
    "PRECISIONS",
    "QUANT_METHODS",
    "SIDE_INITS",
    "SKIP_INITS",
    "TASKS",
    "JsonConfig",
    "ModelConfig",
    "QuantConfig",
    "SideConfig",
    "TrainConfig",
]


class JsonConfig:
    """Mixin: ``to_dict``/``from_dict``/``to_json``/``from_json`` for a dataclass tree, and the
    check of every ``Literal``-typed field when an instance is built."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            choices = _literal_choices(hints[f.name])
            value = getattr(self, f.name)
            if choices is not None and not _is_choice(value, choices):
                raise ValueError(
                    f"{type(self).__name__}.{f.name} must be one of {', '.join(map(repr, choices))}, got {value!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

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


def _literal_choices(hint: Any) -> tuple | None:
    """The values of a ``Literal[...]`` hint (``None`` among them for ``Literal[...] | None``)."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    args = typing.get_args(hint)
    literals = [a for a in args if typing.get_origin(a) is Literal]
    if literals and all(typing.get_origin(a) is Literal or a is type(None) for a in args):
        return tuple(v for a in literals for v in typing.get_args(a)) + ((None,) if type(None) in args else ())
    return None


def _is_choice(value: Any, choices: tuple) -> bool:
    return any(value == c and type(value) is type(c) for c in choices)  # 4.0 and True are not 4 and 1


def _positive(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(owner).__name__}.{name} must be a positive integer, got {value!r}")


def _number(owner: object, name: str, low: float, high: float | None = None, above: bool = False) -> None:
    """A real-valued field within ``[low, high)`` (``(low, high)`` with ``above``)."""
    value = getattr(owner, name)
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and (value > low if above else value >= low) and (high is None or value < high)
    if not ok:
        bound = f"{'>' if above else '>='} {low:g}" + (f" and < {high:g}" if high is not None else "")
        raise ValueError(f"{type(owner).__name__}.{name} must be a number {bound}, got {value!r}")


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

    bits: BitWidth = 4
    group_size: int = 64
    method: QuantMethod = "gnpiq"
    bits_map: dict[str, int] = field(default_factory=dict)
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    embeddings: bool = True  # also pack nn.Embedding tables (groups along the embedding dim)
    iters: int = 6
    restarts: int = 4
    noise: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "group_size", "iters", "restarts")
        bad = {k: v for k, v in self.bits_map.items() if not _is_choice(v, BITS)}
        if bad:
            raise ValueError(f"QuantConfig.bits_map: unsupported bit width for {bad}; expected one of {BITS}")


@dataclass
class SideConfig(JsonConfig):
    """The ladder side network and its interactive side mixture-of-experts (ISMoE)."""

    reduction: int = 8  # side width = backbone hidden / reduction
    layers: list[int] | None = None  # backbone layers to tap (1-based hidden_states index); None: all
    num_heads: int = 4
    num_experts: int = 8
    top_k: int = 2
    expert_ratio: int = 4  # expert hidden = expert_ratio * side width
    shared_expert: bool = False
    salient_tau: float = 0.1  # softmax temperature of the router's salient-token pooling
    interactive: bool = True  # router sees backbone features (False: side token only)
    router_noise: float = 0.0  # std of Gaussian noise on the router's logits in training (noisy top-k)
    dense_ffn: bool = False  # one dense FFN instead of experts (the LST baseline)
    expert_bits: BitWidth | None = 4  # quantization-aware training of experts, then packed; None: float experts
    expert_group_size: int = 16
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    dropout: float = 0.1
    skip: bool = (
        False  # also a linear map from the backbone's mean-pooled tapped states to the outputs (side/ladder.py)
    )
    init: SideInit = (
        "pruned"  # "pruned": down-projections and FFNs start as slices of the backbone (side/prune.py); "random"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "reduction", "num_heads", "num_experts", "top_k", "expert_ratio", "expert_group_size")
        if self.top_k > self.num_experts:
            raise ValueError(f"SideConfig.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        _number(self, "router_noise", 0.0)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"SideConfig.dropout must lie in [0, 1), got {self.dropout!r}")


@dataclass
class ModelConfig(JsonConfig):
    """Everything needed to rebuild an MP-ISMoE model without downloads."""

    backbone: str = ""  # where it came from (provenance only)
    backbone_config: dict[str, Any] = field(default_factory=dict)  # HF config.to_dict()
    task: str = "classification"  # a kind of runtime/tasks.py (Task.REGRESSION is taken as "regression")
    labels: list[str] = field(default_factory=list)
    max_length: int = 64  # tokens per text, special tokens included; longer texts are cut
    side: SideConfig = field(default_factory=SideConfig)
    quant: QuantConfig | None = field(default_factory=QuantConfig)  # backbone; None keeps fp32

    def __post_init__(self) -> None:
        self.task = getattr(self.task, "value", self.task)  # Task.REGRESSION -> "regression": plain JSON values
        super().__post_init__()
        if self.task not in TASKS:
            raise ValueError(f"ModelConfig.task must be one of {', '.join(map(repr, TASKS))}, got {self.task!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"ModelConfig.max_length must be an integer >= 2, got {self.max_length!r}")

    @property
    def num_outputs(self) -> int:
        return kind(self.task).num_outputs(self.labels)


@dataclass
class TrainConfig(JsonConfig):
    """How the side network trains: optimizer, schedule, early stopping and where it runs.

    Checked when built, so a bad value stops a run before the backbone is loaded or quantized."""

    epochs: int = 3
    batch_size: int = 32  # the global batch: split over the ranks of a distributed run
    eval_batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    grad_clip: float = 1.0
    patience: int = 2  # epochs without a better (metric, -loss) on validation before stopping early
    min_steps: int = 200  # optimizer steps at least: small data trains more epochs (selection.py)
    seed: int = 0
    threads: int | None = None
    return_freed_memory: bool = True  # glibc: give freed activations and heap holes back to the system (memory.py)
    device: Device = "auto"  # a rank of a distributed run uses GPU LOCAL_RANK
    precision: Precision = "fp32"
    skip_init: SkipInit = "ridge"  # with SideConfig.skip

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "epochs", "batch_size", "eval_batch_size", "patience")
        if self.threads is not None:
            _positive(self, "threads")
        if isinstance(self.min_steps, bool) or not isinstance(self.min_steps, int) or self.min_steps < 0:
            raise ValueError(f"TrainConfig.min_steps must be an integer >= 0, got {self.min_steps!r}")
        _number(self, "lr", 0.0, above=True)
        _number(self, "grad_clip", 0.0, above=True)
        _number(self, "weight_decay", 0.0)
        _number(self, "warmup_ratio", 0.0, 1.0)
