"""Training-process memory: no lingering weight-file mapping, freed activations go back."""

import gc
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_backbone, tiny_tokenizer

pytestmark = pytest.mark.slow  # measures the resident memory of whole processes

linux_only = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")


def _mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


@linux_only
@pytest.mark.parametrize("bits", [4, None])
def test_build_model_releases_the_memory_mapped_weight_file(tmp_path, bits):
    from mpismoe_edge.config import ModelConfig, QuantConfig, SideConfig
    from mpismoe_edge.model import build_model, load_backbone

    tiny_backbone("bert").save_pretrained(tmp_path)
    tiny_tokenizer().save(str(tmp_path / "tokenizer.json"))
    weights = tmp_path / "model.safetensors"
    backbone, tok_json = load_backbone(tmp_path)
    if not _mapped(weights):
        pytest.skip("this transformers version copies weights instead of mapping the file")
    quant = QuantConfig(bits=bits, group_size=32, method="rtn") if bits else None
    config = ModelConfig(
        labels=["a", "b"], side=SideConfig(reduction=4, num_heads=2, num_experts=2, expert_bits=None), quant=quant
    )
    model = build_model(backbone, config, tok_json, progress=False)
    del backbone
    gc.collect()
    assert not _mapped(weights)
    assert model(input_ids=torch.ones(1, 3, dtype=torch.long)).shape == (1, 2)  # still works on its own copies


_CHURN = textwrap.dedent("""
    import sys, torch
    from mpismoe_edge.memory import return_freed_memory
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    if sys.argv[1] == "on":
        assert return_freed_memory()
    blocks = [torch.ones(256 * 1024) for _ in range(64)]    # 64 x 1 MiB
    del blocks                                               # glibc now serves 1 MiB blocks from the heap
    base = rss()
    blocks = [torch.ones(256 * 1024) for _ in range(64)]
    del blocks[::2]                                          # free every other block: holes in the heap
    print((rss() - base) / 2**20)
""")


def _resident_after(script: str, mode: str) -> float:
    """The MB that ``script`` (run in a fresh interpreter with ``mode``) prints last."""
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@linux_only
def test_return_freed_memory_gives_freed_blocks_back_to_the_system():
    kept_default, kept_on = _resident_after(_CHURN, "off"), _resident_after(_CHURN, "on")
    assert kept_on < 40  # only the 32 live blocks stay resident
    assert kept_default > 56  # glibc's own policy keeps the holes (so the setting is what matters)


_HOLES = textwrap.dedent("""
    import sys, torch
    from mpismoe_edge.memory import release_free_pages, return_freed_memory
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * 4096
    assert return_freed_memory()
    base = rss()
    blocks = [torch.ones(16 * 1024) for _ in range(2048)]   # 2048 x 64 KiB: below the mmap threshold, on the heap
    del blocks[::2]                                          # 64 MiB of holes between live blocks
    if sys.argv[1] == "on":
        assert release_free_pages()
    print((rss() - base) / 2**20)
""")


@linux_only
def test_release_free_pages_gives_heap_holes_back_to_the_system():
    kept_without, kept_with = _resident_after(_HOLES, "off"), _resident_after(_HOLES, "on")
    assert kept_without > 120  # the holes stay resident: freeing alone does not return them
    assert kept_with < 80  # the 64 MiB of live blocks (and their headers) stay


def test_bound_kernel_cache_caps_onednn_unless_the_environment_says_otherwise(monkeypatch):
    from mpismoe_edge.memory import ONEDNN_CACHE_ENV, bound_kernel_cache

    monkeypatch.delenv(ONEDNN_CACHE_ENV, raising=False)
    bound_kernel_cache(16)
    assert os.environ[ONEDNN_CACHE_ENV] == "16"
    monkeypatch.setenv(ONEDNN_CACHE_ENV, "1024")
    bound_kernel_cache(16)
    assert os.environ[ONEDNN_CACHE_ENV] == "1024"
