"""Configs validate when built, round-trip through JSON, and build_model leaves them alone."""

import json
import subprocess
import sys

import pytest

from mpismoe_edge.config import ModelConfig, QuantConfig, SideConfig

BAD_CONFIGS = [
    (QuantConfig, {"method": "awq"}, "QuantConfig.method must be one of 'gnpiq', 'rtn', got 'awq'"),
    (QuantConfig, {"bits": 5}, "QuantConfig.bits must be one of 2, 3, 4, 8, got 5"),
    (QuantConfig, {"bits": 4.0}, "QuantConfig.bits must be one of 2, 3, 4, 8, got 4.0"),
    (QuantConfig, {"bits": True}, "QuantConfig.bits must be one of 2, 3, 4, 8, got True"),
    (QuantConfig, {"group_size": 0}, "QuantConfig.group_size must be a positive integer, got 0"),
    (QuantConfig, {"bits_map": {"fc": 6}}, "QuantConfig.bits_map: unsupported bit width for {'fc': 6}"),
    (SideConfig, {"init": "zeros"}, "SideConfig.init must be one of 'pruned', 'random', got 'zeros'"),
    (SideConfig, {"expert_bits": 5}, "SideConfig.expert_bits must be one of 2, 3, 4, 8, None, got 5"),
    (SideConfig, {"num_experts": 0}, "SideConfig.num_experts must be a positive integer, got 0"),
    (SideConfig, {"top_k": 3, "num_experts": 2}, r"SideConfig.top_k \(3\) must be <= num_experts \(2\)"),
    (SideConfig, {"dropout": 1.0}, r"SideConfig.dropout must lie in \[0, 1\), got 1.0"),
    (SideConfig, {"router_noise": -1.0}, "SideConfig.router_noise must be a number >= 0, got -1.0"),
    (
        ModelConfig,
        {"task": "ner"},
        "ModelConfig.task must be one of 'classification', 'regression', 'token-classification', "
        "'multi-label-classification', got 'ner'",
    ),
    (ModelConfig, {"max_length": 1}, "ModelConfig.max_length must be an integer >= 2, got 1"),
]


@pytest.mark.parametrize(
    "cls, fields, message", BAD_CONFIGS, ids=[f"{c.__name__}-{next(iter(f))}" for c, f, _ in BAD_CONFIGS]
)
def test_a_bad_field_is_refused_when_the_config_is_built(cls, fields, message):
    with pytest.raises(ValueError, match=message):
        cls(**fields)


def test_a_bad_field_in_json_is_refused_when_read():
    text = json.dumps({**ModelConfig().to_dict(), "quant": {**QuantConfig().to_dict(), "method": "awq"}})
    with pytest.raises(ValueError, match="QuantConfig.method"):
        ModelConfig.from_json(text)


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(),
        ModelConfig(
            task="token-classification", labels=["O", "X"], quant=None, side=SideConfig(expert_bits=None, layers=[1, 2])
        ),
        ModelConfig(task="regression", quant=QuantConfig(bits=2, method="rtn", bits_map={"*.query": 8})),
    ],
    ids=["defaults", "token-float", "regression-rtn"],
)
def test_json_round_trip_gives_an_equal_config(config):
    assert ModelConfig.from_json(config.to_json()) == config


def test_experts_are_4_bit_by_default():
    assert SideConfig().expert_bits == 4


def test_the_training_cli_defaults_are_the_config_defaults():
    from mpismoe_edge.cli import _parser

    args = _parser().parse_args([])
    assert args.expert_bits == SideConfig.expert_bits
    assert (args.bits, args.group_size, args.quant_method) == (
        QuantConfig.bits,
        QuantConfig.group_size,
        QuantConfig.method,
    )


def test_plain_mpismoe_train_is_the_quickstarts_command():
    from mpismoe_edge.cli import _parser

    assert _parser().parse_args([]) == _parser().parse_args(["--expert-bits", "4"])


@pytest.mark.parametrize("flag, bits", [([], 4), (["--expert-bits", "0"], None), (["--expert-bits", "8"], 8)])
def test_the_training_cli_builds_the_expert_bits_it_is_given(monkeypatch, tiny_jsonl, tmp_path, flag, bits):
    from mpismoe_edge.cli import train_main

    built = []

    def build_model(backbone, config, *args, **kwargs):
        built.append(config)
        raise FileNotFoundError("stop once the config is built")

    monkeypatch.setattr("mpismoe_edge.model.load_backbone", lambda path: (None, None))
    monkeypatch.setattr("mpismoe_edge.model.build_model", build_model)
    args = [
        "--data",
        str(tiny_jsonl),
        "--eval-data",
        str(tiny_jsonl),
        "--backbone",
        "b",
        "-o",
        str(tmp_path / "o"),
        *flag,
    ]
    assert train_main(args) == 2
    assert built[0].side.expert_bits == bits


def test_build_model_does_not_change_the_callers_config():
    from conftest import tiny_backbone

    from mpismoe_edge.model import build_model

    config = ModelConfig(labels=["a", "b"], side=SideConfig(reduction=4, num_heads=2, num_experts=2), quant=None)
    before = config.to_json()
    model = build_model(tiny_backbone(), config, progress=False)
    assert config.to_json() == before and config.backbone_config == {}
    assert model.config.backbone_config["hidden_size"] == 64


MAIN_NAMES = [
    "ModelConfig",
    "QuantConfig",
    "SideConfig",
    "Task",
    "TASKS",
    "TARGETS",
    "Dataset",
    "load_default",
    "load_file",
    "MPISMoEModel",
    "build_model",
    "load_backbone",
    "load_checkpoint",
    "save_checkpoint",
    "quantize_model",
    "TrainConfig",
    "export_model",
    "Predictor",
]


def test_main_names_import_from_the_package():
    import mpismoe_edge

    assert sorted(mpismoe_edge.__all__) == sorted(MAIN_NAMES)
    from mpismoe_edge import build_model
    from mpismoe_edge.model import build_model as defined

    assert build_model is defined


def test_importing_the_package_and_its_configs_loads_no_torch():
    code = (
        "import sys, mpismoe_edge; from mpismoe_edge import ModelConfig, Task, TASKS; "
        "assert ModelConfig(task=Task.REGRESSION).task == 'regression'; "
        "print(sorted(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
