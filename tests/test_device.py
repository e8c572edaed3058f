"""Devices and precision: bf16/fp16 autocast trains on the CPU; CUDA runs the same (skipped without a GPU)."""

import pytest
import torch
from conftest import LABELS, TEXTS, tiny_model

from mpismoe_edge.data import Dataset
from mpismoe_edge.quant.linear import QuantLinear
from mpismoe_edge.quant.rtn import rtn_quantize
from mpismoe_edge.train import TrainConfig, train

DATA = Dataset(TEXTS * 2, LABELS * 2, ["neg", "neu", "pos"])
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _layer() -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear.from_quantized(rtn_quantize(torch.randn(32, 64), 4, 32), torch.randn(32))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_on_the_cpu(tmp_path, precision):
    result = train(
        tiny_model(),
        DATA,
        DATA,
        TrainConfig(epochs=1, batch_size=8, min_steps=0, device="cpu", precision=precision),
        tmp_path,
        progress=False,
    )
    assert (tmp_path / "model.pt").is_file() and result.device == "cpu"
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert result.peak_cuda_allocated_mb is None


def test_packed_layer_computes_in_the_autocast_dtype():
    layer, x = _layer(), torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(x)
    exact = layer(x)
    err = (low.float() - exact).abs().max().item()
    assert 0 < err < 0.05 * exact.abs().max().item()  # rounded like bf16, close to fp32


def test_unknown_device_or_precision_is_refused_when_configured():
    with pytest.raises(ValueError, match="TrainConfig.device must be one of 'auto', 'cpu', 'cuda', got 'tpu'"):
        TrainConfig(device="tpu")
    with pytest.raises(ValueError, match="TrainConfig.precision must be one of 'fp32', 'bf16', 'fp16', got 'fp8'"):
        TrainConfig(precision="fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_one_line_error(tmp_path, tiny_jsonl, capsys):
    from mpismoe_edge.cli import train_main

    code = train_main(
        [
            "--backbone",
            str(tmp_path),
            "--data",
            str(tiny_jsonl),
            "--eval-data",
            str(tiny_jsonl),
            "--device",
            "cuda",
            "-o",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.startswith("error: --device cuda: no CUDA device")


@cuda
def test_custom_ops_on_cuda_match_the_cpu():
    from mpismoe_edge import ops

    layer, x, ids = _layer(), torch.randn(4, 64), torch.tensor([[0, 3], [5, 1]])
    ref = layer(x)
    rows = ops.qgather(ids, layer.qweight, layer.scales, layer.zeros, 4, 32)
    layer.cuda()
    torch.testing.assert_close(layer(x.cuda()).cpu(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ops.qgather(ids.cuda(), layer.qweight, layer.scales, layer.zeros, 4, 32).cpu(), rows)
    logits = torch.randn(6, 4)
    torch.testing.assert_close(ops.topk_route(logits.cuda(), 2).cpu(), ops.topk_route(logits, 2))


@cuda
def test_training_on_cuda_reports_peak_accelerator_memory(tmp_path):
    result = train(
        tiny_model(),
        DATA,
        DATA,
        TrainConfig(epochs=1, batch_size=8, min_steps=0, device="cuda", precision="bf16"),
        tmp_path,
        progress=False,
    )
    assert result.device.startswith("cuda") and result.peak_cuda_allocated_mb > 0
