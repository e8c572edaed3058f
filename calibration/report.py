"""Calibration report: the numbers as JSON and a picture (bits per layer, sensitivity curves) as PNG."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .allocate import MB, Allocation, layer_bytes
from .sensitivity import LayerSensitivity


def build_report(sens: Sequence[LayerSensitivity], alloc: Allocation, group_size: int, **meta: Any) -> dict[str, Any]:
    """Plain-JSON dict: totals, every uniform width for comparison, and per layer its
    sensitivity at each width, the chosen width and its bytes. ``meta`` is copied in."""
    widths = sorted(sens[0].errors)
    layers = []
    for s in sens:
        b = alloc.bits_map[s.name]
        layers.append(
            {
                "name": s.name,
                "shape": [s.out_features, s.in_features],
                "rows": s.rows,
                "energy": s.energy,
                "sensitivity": {str(w): s.errors[w] for w in widths},
                "gain": s.gain,
                "weight": alloc.weights[s.name],
                "bits": b,
                "bytes": round(layer_bytes(s.out_features, s.in_features, b, group_size, s.bias)),
            }
        )
    uniform = {
        str(w): {
            "mb": sum(layer_bytes(s.out_features, s.in_features, w, group_size, s.bias) for s in sens) / MB,
            "objective": sum(alloc.weights[s.name] * s.errors[w] for s in sens),
            "sum_sensitivity": sum(s.errors[w] for s in sens),
        }
        for w in widths
    }
    return {
        **meta,
        "group_size": group_size,
        "widths": widths,
        "weighting": alloc.weighting,
        "budget_mb": alloc.budget_bytes / MB,
        "total_mb": alloc.total_mb,
        "total_bytes": alloc.total_bytes,
        "min_mb": alloc.min_bytes / MB,
        "max_mb": alloc.max_bytes / MB,
        "avg_bits": alloc.avg_bits,
        "objective": alloc.objective,
        "sum_sensitivity": sum(s.errors[alloc.bits_map[s.name]] for s in sens),
        "exact": alloc.exact,
        "uniform": uniform,
        "bits_map": dict(alloc.bits_map),
        "layers": layers,
    }


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Three panels over the layers: chosen width (bars); relative output error at each width
    (log scale) with the chosen one marked; each layer's weight in the objective (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    names = [layer["name"] for layer in layers]
    prefix = os.path.commonprefix(names).rpartition(".")[0] + "." if len(names) > 1 else ""
    prefix = "" if prefix == "." else prefix
    labels = [n[len(prefix) :] or n for n in names]
    x = list(range(len(layers)))
    fig, (ax1, ax2, ax3) = plt.subplots(
        3, 1, figsize=(max(8.0, 0.28 * len(layers) + 3), 9.5), sharex=True, gridspec_kw={"height_ratios": [1, 2, 1]}
    )
    ax1.bar(x, [layer["bits"] for layer in layers], color="tab:blue")
    ax1.set_ylabel("bits")
    ax1.set_yticks(report["widths"])
    ax1.set_title(
        f"{report['total_mb']:.3f} MB of {report['budget_mb']:.3f} MB budget, "
        f"{report['avg_bits']:.3f} average bits ({report['weighting']} weighting)"
    )
    floor = 1e-12
    for w in report["widths"]:
        ax2.plot(x, [max(layer["sensitivity"][str(w)], floor) for layer in layers], marker=".", label=f"{w} bits")
    ax2.plot(
        x,
        [max(layer["sensitivity"][str(layer["bits"])], floor) for layer in layers],
        "ko",
        fillstyle="none",
        markersize=8,
        label="chosen",
    )
    ax2.set_yscale("log")
    ax2.set_ylabel("relative output error")
    ax2.legend(fontsize=8, ncol=len(report["widths"]) + 1)
    weights = [layer["weight"] for layer in layers]
    ax3.bar(x, [max(w, floor) for w in weights], color="tab:gray")
    ax3.set_yscale("log")
    ax3.set_ylim(bottom=max(min(w for w in weights if w > 0) / 3, floor) if any(w > 0 for w in weights) else floor)
    ax3.set_ylabel(f"weight ({report['weighting']})")
    ax3.set_xticks(x)
    ax3.set_xticklabels(labels, rotation=90, fontsize=7)
    if prefix:
        ax3.set_xlabel(prefix + "...")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def can_plot() -> bool:
    """Whether matplotlib (the ``bench`` extra) is installed: the PNG is optional, the JSON is not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_report(report: dict[str, Any], directory: str | os.PathLike) -> tuple[Path, Path | None]:
    """Write ``calibration.json`` and, when matplotlib is installed, ``calibration.png`` into
    ``directory`` (created); the PNG's path is None without matplotlib."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    js, png = d / "calibration.json", d / "calibration.png"
    tmp = js.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, js)
    if not can_plot():
        return js, None
    plot_report(report, png)
    return js, png
