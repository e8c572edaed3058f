"""benchmarks/multitask.py's arithmetic and table, on made-up numbers (no backbone, no export)."""

import pytest

from benchmarks.multitask import ARMS, added_task_cost, ratios, render, verdicts


def fake(multi: dict[int, float], single: float = 12.0, anchor: float = 10.0) -> dict[int, dict]:
    """N -> arm -> measure: the multi-task graph's 1x128 ms given, the rest linear in N."""
    out = {}
    for n, ms in multi.items():
        out[n] = {
            ARMS[0]: {"1x128": ms, "32x64": 10 * ms, "wasm": 5 * ms, "mb": 14.0 + 2.0 * n, "rss": 30.0 + 3 * n},
            ARMS[1]: {"1x128": single * n, "32x64": 100 * n, "wasm": 50 * n, "mb": 16.5 * n, "rss": 32.0 * n},
            ARMS[2]: {"1x128": anchor * n, "32x64": 100.0 * n, "wasm": 50.0 * n, "mb": 22.8 * n, "rss": 40.0 * n},
        }
    return out


def test_added_task_cost_is_per_task_between_measured_ns():
    cost = added_task_cost({1: 20.0, 2: 23.0, 4: 29.0}, anchor_ms=10.0)
    assert cost == pytest.approx({2: 0.3, 4: 0.3})  # (29 - 23) / 2 tasks / 10 ms


def test_ratios_skip_measures_the_anchor_lacks():
    assert ratios({"1x128": 4.0, "wasm": 9.0}, {"1x128": 8.0}) == {"1x128": 0.5}


def test_verdicts_at_four_tasks():
    res = fake({1: 12.0, 2: 13.0, 4: 15.0})
    got = {what: (value, bar, met) for what, value, bar, met in verdicts(res)}
    assert got["latency 1x128 vs 4 int8 anchors"] == (pytest.approx(15 / 40), 0.40, True)
    assert got["latency 32x64 vs 4 int8 anchors"][2] is True  # 150 / 400
    assert got["latency wasm vs 4 int8 anchors"][0] == pytest.approx(75 / 200)
    value, bar, met = got["graph files vs 4 int8 anchors"]
    assert value == pytest.approx(22.0 / 91.2) and bar == 0.25 and met
    assert got["added task's 1x128 latency vs one int8 anchor (N=4)"] == (pytest.approx(0.1), 0.15, True)
    assert got["added task's 1x128 latency vs one int8 anchor (N=2)"][2] is True


def test_verdicts_say_not_met():
    res = fake({1: 25.0, 2: 30.0, 4: 40.0})
    got = {what: met for what, _, _, met in verdicts(res)}
    assert not got["latency 1x128 vs 4 int8 anchors"]  # 40 / 40
    assert not got["added task's 1x128 latency vs one int8 anchor (N=2)"]  # 5 / 10


def test_render_has_a_row_per_n_and_arm_and_the_verdicts():
    res = fake({1: 12.0, 2: 13.0, 4: 15.0})
    parity = {n: {f"t{i}": 1e-7 * i for i in range(n)} for n in (1, 2, 4)}
    text = render("portable", res, parity)
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 9
    assert rows[-3].startswith("| 4 | multi-task graph | 15.0 | 150 | 75 | 22.0 | 42 | 0.38x | 0.38x | 0.38x |")
    assert rows[-3].endswith("| 3e-07 |")
    assert rows[-1].split(" | ")[-2] == "1.00x"  # the anchors against themselves
    assert "N=4: 10.0%" in text
    assert "* graph files vs 4 int8 anchors: 0.24x (target <= 0.25): met" in text
    assert "not met" not in text


def test_render_without_wasm():
    res = fake({1: 12.0, 2: 13.0, 4: 15.0})
    for per in res.values():
        for arm in per.values():
            del arm["wasm"]
    text = render("ort-int8", res, {n: {"t": 0.0} for n in (1, 2, 4)})
    assert "wasm" not in text
