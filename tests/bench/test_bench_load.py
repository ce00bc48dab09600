"""The load average beside every benchmark row: this process's own share is taken out, rows measured beside
other work are flagged 'not evidence', and a report holding such rows is only written with --allow-busy."""

from __future__ import annotations

import importlib.util
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from diffusekit.bench import harness, timing
from diffusekit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


class FakeMachine:
    """A clock, this process's CPU seconds and the 1-minute load average, all set by the test."""

    def __init__(self) -> None:
        self.t, self.cpu, self.load = 0.0, 0.0, 0.0

    def meter(self) -> timing.LoadMeter:
        return timing.LoadMeter(load=lambda: self.load, cpu=lambda: self.cpu, clock=lambda: self.t)

    def run(self, seconds: float, threads: float, others: float) -> None:
        """``seconds`` of this process keeping ``threads`` cores busy beside ``others`` runnable threads of other
        programs, with the load average damped as the kernel damps it."""
        decay = math.exp(-seconds / 60)
        self.load = self.load * decay + (threads + others) * (1 - decay)
        self.t += seconds
        self.cpu += threads * seconds


def test_the_meter_takes_out_the_benchmarks_own_load():
    m = FakeMachine()
    meter = m.meter()
    m.run(120, threads=2, others=0)  # a 2-thread benchmark alone on the machine
    raw, others = meter.read()
    assert raw == pytest.approx(2 * (1 - math.exp(-2)))  # the raw figure looks busy...
    assert others == pytest.approx(0, abs=1e-9)  # ...but none of it is other work
    m.run(30, threads=0, others=0)  # idle gap while the next workload builds: both decay together
    assert meter.read()[1] == pytest.approx(0, abs=1e-9)
    m.run(90, threads=2, others=3)  # now three other threads run beside it
    raw, others = meter.read()
    assert others == pytest.approx(3 * (1 - math.exp(-1.5)))
    assert raw > others


def test_no_load_average_leaves_the_row_unflagged():
    meter = timing.LoadMeter(load=lambda: None)
    settings = harness.Settings(workloads=[], dtypes=[], meter=meter)
    row = harness.under_load(settings, lambda: {"workload": "W1", "dtype": "float32", "note": None})
    assert row["load_before"] is None and "busy" not in row


@pytest.mark.parametrize(("others", "busy"), [(0.0, False), (1.0, False), (3.0, True)])
def test_rows_measured_beside_other_work_are_flagged(others, busy):
    m = FakeMachine()
    settings = harness.Settings(workloads=[], dtypes=[], meter=m.meter())

    def measure():
        m.run(120, threads=2, others=others)
        return {"workload": "W3", "dtype": "bfloat16", "note": "single run (counts its warm-up)"}

    row = harness.under_load(settings, measure)
    assert row["load_before"] == 0.0 and row["load_after"] == pytest.approx(m.load)
    assert row["load"] == pytest.approx(others * (1 - math.exp(-2)), abs=0.01)
    assert row["busy"] is busy
    if busy:
        assert row["note"] == f"load {row['load']:.1f} - not evidence; single run (counts its warm-up)"
        assert "not evidence" in harness.table([row])
    else:
        assert row["note"] == "single run (counts its warm-up)"


def _report(*loads: float) -> dict:
    rows = [{"workload": f"W{i + 1}", "dtype": "float32", "ours_s": 1.0, "load": load, "busy": load > 1.5}
            for i, load in enumerate(loads)]  # fmt: skip
    machine = {"date": "2026-01-01T00:00:00+00:00", "cpu": "test CPU", "cpu_count": 2, "threads": 2, "torch": "x"}
    return {"machine": machine, "workloads": {}, "rows": rows}


def test_a_report_with_busy_rows_is_refused_unless_allowed(tmp_path):
    path = tmp_path / "results" / "compare.json"
    with pytest.raises(ConfigError, match=r"--allow-busy") as e:
        harness.write_report(path, _report(0.2, 2.3))
    assert "W2 float32 at 2.3" in str(e.value) and "W1" not in str(e.value)
    assert not path.exists()
    harness.write_report(path, _report(0.2, 2.3), allow_busy=True)
    assert [r["busy"] for r in json.loads(path.read_text())["rows"]] == [False, True]
    harness.write_report(path, _report(0.2, 1.4))  # all idle: written without asking


def test_compare_merge_refuses_busy_rows_without_allow_busy(tmp_path, capsys):
    compare = _script("compare")
    part = tmp_path / "part.json"
    part.write_text(json.dumps(_report(0.3, 4.2)))
    out = tmp_path / "merged.json"
    assert compare.main(["--merge", str(part), "--json", str(out)]) == 2
    captured = capsys.readouterr()
    assert "compare.py: error:" in captured.err and "--allow-busy" in captured.err
    assert "W2" in captured.out  # the table was still printed
    assert not out.exists()
    assert compare.main(["--merge", str(part), "--json", str(out), "--allow-busy"]) == 0
    assert json.loads(out.read_text())["rows"][1]["busy"] is True


def _script(name: str):
    module_spec = importlib.util.spec_from_file_location(f"{name}_under_test", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_autotune_layers_finds_the_shapes_a_real_forward_pass_offers(monkeypatch):
    """The meta-device shape census of benchmarks/autotune_layers.py against the convolutions that reach the
    fast-path check in a real forward pass of the tiny W1 and W4 models."""
    from diffusekit.bench.workloads import ours, spec
    from diffusekit.runtime import fastconv

    if not fastconv.ENABLED:
        pytest.skip("the fast convolutions are switched off (DIFFUSEKIT_FAST_CONV=0)")
    layers = _script("autotune_layers")
    for workload in ("W1", "W4"):
        seen: Counter = Counter()
        real = fastconv.qualifies

        def spy(x, weight, *args, _seen=seen, _real=real):
            ok = _real(x, weight, *args)
            if ok:
                _seen[(tuple(x.shape), weight.shape[0])] += 1
            return ok

        monkeypatch.setattr(fastconv, "qualifies", spy)
        ours(workload, spec(workload, tiny=True), torch.float32).run()
        monkeypatch.setattr(fastconv, "qualifies", real)
        assert seen and layers.conv_shapes(workload, tiny=True) == seen, workload


def test_autotune_layers_rows_say_what_autotune_picks(monkeypatch):
    from diffusekit.runtime import autotune

    layers = _script("autotune_layers")
    costs = {"direct": 2e-3, "winograd": 1e-3, "gemm": 3e-3}
    tuner = autotune.Tuner(mode="measure", path=None, seconds=lambda kernel, call: costs[kernel])
    monkeypatch.setattr(autotune, "MIN_MACS", 0)
    row = layers.measure_layer("W1", ((1, 8, 8, 8), 8), 3, tuner)
    assert (row["rule"], row["fastest"], row["autotune"]) == ("direct", "winograd", "winograd")
    assert row["gain"] == pytest.approx(2.0) and row["direct_ms"] == pytest.approx(2.0)
    assert layers.summary([row])[0].startswith("W1: 3x3 convolutions of one forward 6.0 ms by the size rules, 3.0 ms")
    monkeypatch.setattr(autotune, "MIN_MACS", 1e12)  # too small to measure: autotune keeps the rule
    row = layers.measure_layer("W1", ((1, 8, 8, 8), 8), 3, tuner)
    assert (row["fastest"], row["autotune"]) == ("winograd", "direct")
