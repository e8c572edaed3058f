"""Calibration: sensitivities on layer outputs, exact bit allocation, report, CLI (tiny random models)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import sys

import pytest
import torch
from torch import nn

from mpismoe_edge.calibration import (
    allocate,
    capture_inputs,
    layer_bytes,
    measure_sensitivities,
    output_error,
    solve_mckp,
)
from mpismoe_edge.calibration.allocate import MB
from mpismoe_edge.calibration.report import build_report, write_report
from mpismoe_edge.calibration.sensitivity import LayerSensitivity, layer_sensitivity, text_batches
from mpismoe_edge.config import QuantConfig
from mpismoe_edge.quant.api import quantize_model, quantize_weight, selected_linears
from mpismoe_edge.quant.embedding import QuantEmbedding
from mpismoe_edge.quant.linear import QuantLinear

# RTN keeps the suite fast; the code under test is method-agnostic, and one test runs GNP-IQ.
QUANT = QuantConfig(group_size=32, method="rtn")
GNPIQ = QuantConfig(group_size=32, iters=2, restarts=1)
WORDS = ["good", "bad", "fine", "movie", "day", "sad", "happy", "not", "very", "the", "a", "is"]


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
    )
    return BertModel(cfg).eval()


def tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok.to_str()


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(2, 12))) for _ in range(n)]


def padded_batches(n_batches: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return text_batches(tiny_tokenizer_json(), random_texts(8 * n_batches, seed), max_length=16, batch_size=8)


# ---------------------------------------------------------------- sensitivity


def test_output_error_is_relative_output_error():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(50, 32, generator=g), torch.randn(16, 32, generator=g)
    wq = w + 0.1 * torch.randn(16, 32, generator=g)
    want = ((x @ w.T - x @ wq.T) ** 2).sum() / ((x @ w.T) ** 2).sum()
    assert output_error(x, w, wq) == pytest.approx(float(want), rel=1e-5)
    assert output_error(x, w, w) == 0.0
    # inputs that never excite the perturbed columns give no output error, whatever the weight error
    x0 = x.clone()
    x0[:, 16:] = 0
    wq2 = w.clone()
    wq2[:, 16:] += 1.0
    assert output_error(x0, w, wq2) == 0.0


def test_text_batches_pad_and_mask():
    batches = text_batches(
        tiny_tokenizer_json(), ["good day", "not a very good movie at all"], max_length=5, batch_size=2
    )
    (b,) = batches
    assert b["input_ids"].shape == (2, 5)
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert b["input_ids"][0, 4] == 0  # [PAD]


@pytest.mark.slow
def test_capture_inputs_drops_padding_caps_rows_and_is_seeded():
    model, batches = tiny_bert(), padded_batches()
    layers = selected_linears(model, QUANT)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert tokens < sum(b["attention_mask"].numel() for b in batches)  # there is padding to drop
    full = capture_inputs(model, layers, batches, max_rows=10_000)
    assert full["encoder.layer.0.attention.self.query"].shape == (tokens, 64)
    assert full["encoder.layer.1.output.dense"].shape == (tokens, 128)
    assert full["pooler.dense"].shape == (sum(b["input_ids"].shape[0] for b in batches), 64)
    assert all(not m._forward_pre_hooks for m in layers.values())

    capped = capture_inputs(model, layers, batches, max_rows=20, seed=3)
    again = capture_inputs(model, layers, batches, max_rows=20, seed=3)
    other = capture_inputs(model, layers, batches, max_rows=20, seed=4)
    name = "encoder.layer.0.intermediate.dense"
    assert capped[name].shape == (20, 64)
    assert torch.equal(capped[name], again[name]) and not torch.equal(capped[name], other[name])
    # a sample of the real rows, no duplicates
    ref = {tuple(r.tolist()) for r in full[name]}
    assert all(tuple(r.tolist()) in ref for r in capped[name])
    assert len({tuple(r.tolist()) for r in capped[name]}) == 20


def test_layer_sensitivity_measures_outputs_and_falls_back_to_weights():
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(64, 16)
    x = torch.randn(40, 64, generator=g)
    s = layer_sensitivity("fc", lin, x, GNPIQ, widths=(2, 4))
    for b in (2, 4):
        wq = quantize_weight(lin.weight.detach(), b, GNPIQ, "fc").dequantize()
        assert s.errors[b] == pytest.approx(output_error(x, lin.weight.detach(), wq), rel=1e-6)
    assert s.rows == 40 and s.bias and (s.out_features, s.in_features) == (16, 64)
    w = layer_sensitivity("fc", lin, None, QUANT, widths=(2,))
    wq = quantize_weight(lin.weight.detach(), 2, QUANT, "fc").dequantize()
    assert w.rows == 0
    w0 = lin.weight.detach()
    assert w.errors[2] == pytest.approx(float(((w0 - wq) ** 2).sum() / (w0**2).sum()), rel=1e-5)


def test_measure_sensitivities_every_layer_decreasing_in_width_with_gains():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = measure_sensitivities(model, QUANT, padded_batches(), max_rows=256, gain_batches=padded_batches(1, seed=5))
    assert [s.name for s in sens] == list(selected_linears(model, QUANT))
    for s in sens:
        assert s.rows > 0 and s.energy > 0
        e = [s.errors[b] for b in (2, 3, 4, 8)]
        assert e[0] > e[1] > e[2] > e[3] > 0, (s.name, e)
        assert e[3] < 1e-3
    gains = {s.name: s.gain for s in sens}
    assert gains.pop("pooler.dense") == 0.0  # its output is no hidden state: quantizing it changes none
    assert all(g > 0 for g in gains.values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # probed weights restored


def test_gain_is_hidden_state_error_per_unit_of_layer_error():
    from mpismoe_edge.calibration.sensitivity import _state_rows, hidden_error

    model, batches = tiny_bert(), padded_batches(1, seed=5)
    name = "encoder.layer.0.intermediate.dense"
    (s,) = [
        s
        for s in measure_sensitivities(model, QUANT, padded_batches(1), gain_batches=batches, widths=(2, 4))
        if s.name == name
    ]
    ref = _state_rows(model, batches)
    layer = model.get_submodule(name)
    layer.weight.data.copy_(quantize_weight(layer.weight.detach(), 2, QUANT, name).dequantize())
    assert s.gain * s.errors[2] == pytest.approx(hidden_error(_state_rows(model, batches), ref), rel=1e-6)


def test_measure_sensitivities_rejects_bad_input():
    model = tiny_bert()
    with pytest.raises(ValueError, match="widths"):
        measure_sensitivities(model, QUANT, padded_batches(1), widths=(2, 5))
    with pytest.raises(ValueError, match="empty calibration data"):
        measure_sensitivities(model, QUANT, [])
    quantize_model(model, QUANT, progress=False)
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        measure_sensitivities(model, QUANT, padded_batches(1))


# ---------------------------------------------------------------- allocation


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_layer_bytes_is_what_quantlinear_stores(bits):
    lin = nn.Linear(96, 40)
    q = QuantLinear.from_quantized(quantize_weight(lin.weight, bits, QUANT), lin.bias)
    stored = sum(t.numel() * t.element_size() for t in q.buffers())
    assert layer_bytes(40, 96, bits, QUANT.group_size, bias=True) == stored


def _brute_force(costs, sizes, capacity):
    best = float("inf")
    for pick in itertools.product(*(range(len(c)) for c in costs)):
        if sum(s[j] for s, j in zip(sizes, pick)) <= capacity:
            best = min(best, sum(c[j] for c, j in zip(costs, pick)))
    return best


def test_mckp_is_optimal_against_brute_force():
    rng = random.Random(0)
    for case in range(150):
        n_layers = rng.randint(1, 5)
        shapes = [(16 * rng.randint(1, 6), 16 * rng.randint(1, 6)) for _ in range(n_layers)]
        sizes = [[round(layer_bytes(n, k, b, 16)) for b in (2, 3, 4, 8)] for n, k in shapes]
        if case % 2:  # sensitivities falling with width, as measured
            costs = [sorted((rng.random() for _ in range(4)), reverse=True) for _ in shapes]
        else:  # any costs at all
            costs = [[rng.random() for _ in range(4)] for _ in shapes]
        lo, hi = sum(r[0] for r in sizes), sum(r[-1] for r in sizes)
        capacity = rng.randint(lo, hi + 100)
        picks, exact = solve_mckp(costs, sizes, capacity)
        assert exact
        assert sum(s[j] for s, j in zip(sizes, picks)) <= capacity
        assert sum(c[j] for c, j in zip(costs, picks)) == pytest.approx(_brute_force(costs, sizes, capacity), abs=1e-12)


def test_mckp_coarse_grid_stays_within_budget():
    rng = random.Random(1)
    sizes = [[rng.randint(1, 10_000) for _ in range(4)] for _ in range(6)]
    costs = [[rng.random() for _ in range(4)] for _ in range(6)]
    capacity = sum(min(r) for r in sizes) + 12_345
    picks, exact = solve_mckp(costs, sizes, capacity, max_cells=600)
    assert not exact
    assert sum(s[j] for s, j in zip(sizes, picks)) <= capacity
    with pytest.raises(ValueError, match="below the smallest"):
        solve_mckp(costs, sizes, sum(min(r) for r in sizes) - 1)


def _fake_sens(n_layers: int = 6, seed: int = 0) -> list[LayerSensitivity]:
    rng = random.Random(seed)
    out = []
    for i in range(n_layers):
        n, k = rng.choice([(64, 64), (128, 64), (64, 128)])
        e2 = rng.uniform(0.05, 0.5)
        out.append(
            LayerSensitivity(
                f"l{i}",
                n,
                k,
                True,
                100,
                rng.uniform(0.1, 10),
                {2: e2, 3: e2 / 4, 4: e2 / 16, 8: e2 / 4096},
                gain=rng.uniform(0.01, 2),
            )
        )
    return out


def test_allocate_meets_budget_and_reports_sizes():
    sens = _fake_sens()
    g = QUANT.group_size
    a = allocate(sens, g, avg_bits=3.0)
    assert a.exact and a.avg_bits <= 3.0 and a.total_bytes <= a.budget_bytes
    assert a.total_bytes == round(
        sum(layer_bytes(s.out_features, s.in_features, a.bits_map[s.name], g, True) for s in sens)
    )
    # the optimum is never worse than uniform 3 bits, which fits the same budget
    assert a.objective <= sum(s.gain * s.errors[3] for s in sens) + 1e-15
    assert a.weights == {s.name: s.gain for s in sens}
    assert set(allocate(sens, g, avg_bits=2).bits_map.values()) == {2}
    assert set(allocate(sens, g, avg_bits=8).bits_map.values()) == {8}
    assert set(allocate(sens, g, budget_mb=1e6).bits_map.values()) == {8}
    mid = allocate(sens, g, budget_mb=a.budget_bytes / MB)
    assert mid.bits_map == a.bits_map
    for weighting in ("energy", "relative"):
        other = allocate(sens, g, avg_bits=3.0, weighting=weighting)
        assert other.total_bytes <= other.budget_bytes and other.weighting == weighting
    assert allocate(sens, g, avg_bits=3.0, weighting="relative").weights == {s.name: 1.0 for s in sens}
    with pytest.raises(ValueError, match="needs propagation gains"):
        allocate([dataclasses.replace(s, gain=None) for s in sens], g, avg_bits=3.0)


def test_allocate_budget_too_small_names_minimum():
    sens = _fake_sens()
    lo = allocate(sens, QUANT.group_size, avg_bits=2).min_bytes
    with pytest.raises(ValueError, match=rf"below the minimum of {lo / MB:.3f} MB"):
        allocate(sens, QUANT.group_size, budget_mb=(lo - 1) / MB)
    with pytest.raises(ValueError, match="below the minimum of 2 bits"):
        allocate(sens, QUANT.group_size, avg_bits=1.5)
    with pytest.raises(ValueError, match="exactly one"):
        allocate(sens, QUANT.group_size, avg_bits=3, budget_mb=1.0)


def test_allocation_feeds_quantize_model_and_apply_bits_matches_it():
    from mpismoe_edge.calibration.sensitivity import apply_bits

    model, twin = tiny_bert(), tiny_bert()
    kept: dict = {}
    sens = measure_sensitivities(model, QUANT, padded_batches(2), max_rows=128, quantized=kept)
    assert set(kept) == {s.name for s in sens} and all(set(v) == {2, 3, 4, 8} for v in kept.values())
    a = allocate(sens, QUANT.group_size, avg_bits=3.5, weighting="relative")
    linears_only = QuantConfig(**{**QUANT.to_dict(), "bits_map": a.bits_map, "embeddings": False})
    applied = quantize_model(model, linears_only, progress=False)
    assert applied == a.bits_map
    stored = sum(
        t.numel() * t.element_size() for m in model.modules() if isinstance(m, QuantLinear) for t in m.buffers()
    )
    assert stored == a.total_bytes
    apply_bits(twin, kept, a.bits_map)
    ours, ref = twin.state_dict(), model.state_dict()
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)


# ---------------------------------------------------------------- report


def test_report_json_and_png(tmp_path):
    sens = _fake_sens()
    a = allocate(sens, QUANT.group_size, avg_bits=3.0)
    report = build_report(sens, a, QUANT.group_size, samples=7)
    js, png = write_report(report, tmp_path / "rep")
    data = json.loads(js.read_text())
    assert data["samples"] == 7 and data["bits_map"] == a.bits_map
    assert len(data["layers"]) == len(sens)
    layer = data["layers"][0]
    assert set(layer) >= {"name", "shape", "sensitivity", "bits", "bytes"}
    assert sum(lay["bytes"] for lay in data["layers"]) == a.total_bytes


def test_report_png_is_a_picture_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    sens = _fake_sens()
    _, png = write_report(
        build_report(sens, allocate(sens, QUANT.group_size, avg_bits=3.0), QUANT.group_size), tmp_path
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_report_without_matplotlib_writes_the_json_and_no_png(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    sens = _fake_sens()
    js, png = write_report(
        build_report(sens, allocate(sens, QUANT.group_size, avg_bits=3.0), QUANT.group_size), tmp_path
    )
    assert png is None and not (tmp_path / "calibration.png").exists()
    assert json.loads(js.read_text())["layers"]


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from mpismoe_edge.config import ModelConfig, SideConfig
    from mpismoe_edge.model import build_model, save_checkpoint

    root = tmp_path_factory.mktemp("calib")
    tiny_bert().save_pretrained(root / "backbone")
    config = ModelConfig(
        backbone=str(root / "backbone"),
        labels=["neg", "pos"],
        max_length=16,
        side=SideConfig(num_experts=2, top_k=1, num_heads=2, expert_bits=None),
        quant=QuantConfig(**{**QUANT.to_dict(), "bits": 4}),
    )
    from transformers import AutoModel

    model = build_model(AutoModel.from_pretrained(root / "backbone"), config, tiny_tokenizer_json(), progress=False)
    save_checkpoint(model, root / "model.pt")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": i % 2}) + "\n" for i, t in enumerate(random_texts(40))))
    return root


def _run_cli(capsys, *args):
    from mpismoe_edge.calibration.cli import main

    rc = main([str(a) for a in args] + ["--quiet"])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow
def test_cli_without_matplotlib_writes_the_calibrated_model_and_the_json(checkpoint, capsys, monkeypatch):
    from mpismoe_edge.model import load_checkpoint

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as installed without the 'bench' extra
    out, rep = checkpoint / "model.nompl.pt", checkpoint / "report-nompl"
    rc, stdout, err = _run_cli(
        capsys,
        checkpoint / "model.pt",
        "--avg-bits",
        "3",
        "-o",
        out,
        "--data",
        checkpoint / "train.jsonl",
        "--samples",
        "8",
        "--report-dir",
        rep,
    )
    assert rc == 0, err
    assert load_checkpoint(out).config.quant.bits_map
    assert (rep / "calibration.json").is_file() and not (rep / "calibration.png").exists()
    assert "needs matplotlib" in err


@pytest.mark.slow
def test_cli_calibrates_checkpoint(checkpoint, capsys):
    from mpismoe_edge.model import load_checkpoint

    out, rep = checkpoint / "model.calibrated.pt", checkpoint / "report"
    rc, stdout, err = _run_cli(
        capsys,
        checkpoint / "model.pt",
        "--avg-bits",
        "2.5",
        "-o",
        out,
        "--data",
        checkpoint / "train.jsonl",
        "--samples",
        "24",
        "--report-dir",
        rep,
    )
    assert rc == 0, err
    assert "average bits" in stdout
    report = json.loads((rep / "calibration.json").read_text())
    assert report["avg_bits"] <= 2.5 and report["total_mb"] <= report["budget_mb"] and report["samples"] == 24
    model = load_checkpoint(out)
    bits = {n: m.bits for n, m in model.backbone.named_modules() if isinstance(m, QuantLinear)}
    assert bits == report["bits_map"] == model.config.quant.bits_map
    assert len(set(bits.values())) > 1  # mixed precision
    stored = sum(
        t.numel() * t.element_size()
        for m in model.backbone.modules()
        if isinstance(m, QuantLinear)
        for t in m.buffers()
    )
    assert stored == report["total_bytes"]
    # embeddings stay packed (at the config's width; they are outside the calibrated budget)
    assert isinstance(model.backbone.embeddings.word_embeddings, QuantEmbedding)
    batch = text_batches(model.tokenizer_json, ["good movie", "bad day"], 16)[0]
    assert torch.isfinite(model(**batch)).all()


@pytest.mark.parametrize("case", ["budget", "no_text_column", "binary", "empty", "missing"])
def test_cli_bad_input_exit_2_writes_nothing(checkpoint, capsys, case):
    out, rep = checkpoint / f"bad-{case}.pt", checkpoint / f"rep-{case}"
    data = checkpoint / f"{case}.csv"
    budget = ["--avg-bits", "3"]
    if case == "budget":
        budget = ["--budget-mb", "0.001"]
        data = checkpoint / "train.jsonl"
    elif case == "no_text_column":
        data.write_text("sentence,label\nhello,1\n")
    elif case == "binary":
        data.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    elif case == "empty":
        data.write_text("")
    rc, _, err = _run_cli(capsys, checkpoint / "model.pt", *budget, "-o", out, "--data", data, "--report-dir", rep)
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert {
        "budget": "minimum of 0.",
        "no_text_column": "line 2: 'text' missing",
        "binary": "not valid UTF-8",
        "empty": "holds no rows",
        "missing": "not found",
    }[case] in err
    assert not out.exists() and not rep.exists()


def test_cli_needs_a_budget(checkpoint, capsys):
    with pytest.raises(SystemExit) as exc:
        _run_cli(capsys, checkpoint / "model.pt", "-o", checkpoint / "x.pt")
    assert exc.value.code == 2


@pytest.mark.slow
def test_cli_calibrates_a_token_classification_checkpoint(checkpoint, tmp_path, capsys):
    from transformers import AutoModel

    from mpismoe_edge.config import ModelConfig, SideConfig
    from mpismoe_edge.model import build_model, save_checkpoint

    config = ModelConfig(
        backbone=str(checkpoint / "backbone"),
        task="token-classification",
        labels=["O", "X"],
        max_length=16,
        side=SideConfig(num_experts=2, top_k=1, num_heads=2, expert_bits=None),
        quant=QuantConfig(**{**QUANT.to_dict(), "bits": 4}),
    )
    model = build_model(
        AutoModel.from_pretrained(checkpoint / "backbone"), config, tiny_tokenizer_json(), progress=False
    )
    save_checkpoint(model, tmp_path / "model.pt")
    rc, stdout, err = _run_cli(
        capsys,
        tmp_path / "model.pt",
        "--avg-bits",
        "3",
        "-o",
        tmp_path / "calibrated.pt",
        "--data",
        checkpoint / "train.jsonl",
        "--samples",
        "24",
        "--batch-size",
        "4",
    )
    assert rc == 0, err
    assert "% of predictions on calibration texts unchanged" in stdout
