"""Kernel choice by measurement (runtime.autotune) and its wiring into runtime.fastconv.choose: the fastest
measured path is taken, choices survive in the cache file, a corrupt file is ignored and rebuilt, the pinned
mode is the size rules, and every chosen path computes the plain convolution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffusekit import user_cache
from diffusekit.errors import ConfigError
from diffusekit.io.atomic import write_bytes_atomic
from diffusekit.networks.layers import Conv2d
from diffusekit.runtime import autotune, fastconv
from diffusekit.runtime.policy import Plan, prepare


@pytest.fixture(autouse=True)
def fresh_tuner(monkeypatch):
    """Each test starts without a process tuner, and small layers count as worth measuring."""
    monkeypatch.setattr(autotune, "_tuner", None)
    monkeypatch.setattr(autotune, "MIN_MACS", 0)


def _fake(costs: dict[str, float], log: list[str] | None = None):
    """A timer that says each kernel takes ``costs[kernel]`` seconds, without running it."""

    def seconds(kernel, call):
        if log is not None:
            log.append(kernel)
        return costs[kernel]

    return seconds


def _never(kernel, call):
    raise AssertionError(f"{kernel} was measured")


def _layer(n=1, c=8, h=8, w=8, co=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g), torch.randn(co, c, 3, 3, generator=g)


@pytest.mark.parametrize("fastest", ["direct", "winograd", "gemm"])
def test_the_measured_fastest_kernel_is_chosen(tmp_path, fastest):
    costs = {"direct": 3e-3, "winograd": 2e-3, "gemm": 4e-3, fastest: 1e-3}
    autotune.configure("measure", path=tmp_path / "k.json", seconds=_fake(costs))
    x, w = _layer()
    # the size rules say "direct" here (8 channels), so anything else proves the measurement decided
    assert fastconv.size_rule(x, w) is None
    assert fastconv.choose(x, w) == (None if fastest == "direct" else fastest)
    assert autotune.current().choices[autotune.layer_key(x, w)]["kernel"] == fastest


def test_each_shape_is_measured_once_and_within_the_budget(tmp_path):
    log: list[str] = []
    costs = {"direct": 0.01, "winograd": 0.02, "gemm": 0.05}  # 3 calls of each pass PER_CANDIDATE_S
    tuner = autotune.configure("measure", path=tmp_path / "k.json", seconds=_fake(costs, log), budget_s=0.01)
    x, w = _layer()
    assert fastconv.choose(x, w) is None
    calls = len(log)
    # warm-up + MIN_REPEATS timed calls; gemm's warm-up is > 3x the best median: dropped after it
    assert log.count("direct") == log.count("winograd") == 1 + autotune.MIN_REPEATS and log.count("gemm") == 1
    assert fastconv.choose(x, w) is None and len(log) == calls  # remembered
    cheap_log: list[str] = []
    cheap = autotune.Tuner(seconds=_fake({"direct": 1e-4, "winograd": 2e-4, "gemm": 2e-4}, cheap_log))
    cheap.measure(fastconv.candidates(x, w))  # fast calls: REPEATS timed calls each
    assert cheap_log.count("direct") == cheap_log.count("gemm") == 1 + autotune.REPEATS
    # the budget is spent: a new shape takes the size rules without a measurement
    assert tuner.spent_s >= 0.01
    x2, w2 = _layer(n=2, c=1024, h=4, w=4, co=16)
    assert fastconv.choose(x2, w2) == fastconv.size_rule(x2, w2) == "gemm"
    assert len(log) == calls


def test_slow_calls_are_timed_once():
    log: list[str] = []
    tuner = autotune.Tuner(seconds=_fake({"direct": 2.0, "winograd": 1.5, "gemm": 0.5}, log))
    x, w = _layer()
    assert tuner.measure(fastconv.candidates(x, w)) == ("gemm", {"direct": 2000.0, "winograd": 1500.0, "gemm": 500.0})
    assert log == ["direct", "winograd", "gemm"]


def test_cache_round_trip(tmp_path):
    path = tmp_path / "cache" / "kernels.json"
    autotune.configure("measure", path=path, writer=write_bytes_atomic,
                       seconds=_fake({"direct": 5e-3, "winograd": 1e-3, "gemm": 9e-3}))  # fmt: skip
    x, w = _layer()
    assert fastconv.choose(x, w) == "winograd"
    data = json.loads(path.read_text())
    entry = data["machines"][autotune.machine_id(autotune.machine())]
    assert entry["machine"]["torch"] == torch.__version__
    assert entry["choices"][autotune.layer_key(x, w)] == {
        "kernel": "winograd", "ms": {"direct": 5.0, "winograd": 1.0, "gemm": 9.0}, "rule": "direct"}  # fmt: skip
    # a later process reads it back and measures nothing, also in the mode that never measures
    for mode in ("measure", "cached"):
        autotune.configure(mode, path=path, writer=write_bytes_atomic, seconds=_never)
        assert fastconv.choose(x, w) == "winograd"
    # a second layer is added to the file, the first kept
    autotune.configure("measure", path=path, writer=write_bytes_atomic,
                       seconds=_fake({"direct": 1e-3, "winograd": 2e-3, "gemm": 3e-3}))  # fmt: skip
    x2, w2 = _layer(c=16)
    assert fastconv.choose(x2, w2) is None
    assert set(autotune.read_cache(path)[autotune.machine_id(autotune.machine())]["choices"]) == {
        autotune.layer_key(x, w), autotune.layer_key(x2, w2)}  # fmt: skip


def test_choices_of_another_machine_or_thread_count_are_not_used(tmp_path):
    x, w = _layer()
    path = tmp_path / "kernels.json"
    other = {"cpu": "another CPU", "flags": "0", "torch": torch.__version__}
    choices = {autotune.layer_key(x, w): {"kernel": "gemm", "ms": {}}}
    path.write_bytes(autotune.encode_cache({autotune.machine_id(other): {"machine": other, "choices": choices}}))
    autotune.configure("cached", path=path, seconds=_never)
    assert fastconv.choose(x, w) is None  # the size rules
    assert autotune.layer_key(x, w).endswith(f"t{torch.get_num_threads()}")


@pytest.mark.parametrize(
    "text",
    [
        "{ not json",
        "\x00\xff\xfe",
        "[]",
        '{"format": 99, "machines": {}}',
        '{"format": 1, "machines": {"m": {"machine": {}, "choices": {"k": {"kernel": "fft"}}}}}',
        '{"format": 1, "machines": {"m": {"choices": 3}}}',
    ],
)
def test_a_corrupt_cache_is_ignored_and_rebuilt(tmp_path, text):
    path = tmp_path / "kernels.json"
    path.write_bytes(text.encode("latin-1"))
    assert autotune.read_cache(path) == {}
    x, w = _layer()
    autotune.configure("cached", path=path, seconds=_never)
    assert fastconv.choose(x, w) is None  # nothing usable: the size rules
    autotune.configure("measure", path=path, writer=write_bytes_atomic,
                       seconds=_fake({"direct": 2e-3, "winograd": 3e-3, "gemm": 1e-3}))  # fmt: skip
    assert fastconv.choose(x, w) == "gemm"
    rebuilt = autotune.read_cache(path)
    assert rebuilt[autotune.machine_id(autotune.machine())]["choices"][autotune.layer_key(x, w)]["kernel"] == "gemm"


def test_a_cache_that_cannot_be_written_warns_and_keeps_the_choice(tmp_path):
    def refuse(path: Path, data: bytes):
        raise PermissionError(13, "Permission denied")

    autotune.configure("measure", path=tmp_path / "k.json", writer=refuse,
                       seconds=_fake({"direct": 2e-3, "winograd": 1e-3, "gemm": 3e-3}))  # fmt: skip
    x, w = _layer()
    with pytest.warns(RuntimeWarning, match="kernel choices not saved"):
        assert fastconv.choose(x, w) == "winograd"
    assert fastconv.choose(x, w) == "winograd"  # no second warning: the writer is dropped
    assert not (tmp_path / "k.json").exists()


@pytest.mark.parametrize("shape", [(1, 8, 8, 8, 8), (2, 256, 32, 32, 256), (2, 1280, 8, 8, 1280), (1, 64, 16, 16, 64)])
def test_pinned_mode_is_the_size_rules(tmp_path, shape):
    n, c, h, w, co = shape
    x, weight = torch.zeros(n, c, h, w), torch.zeros(co, c, 3, 3)
    autotune.configure("rules", path=tmp_path / "k.json", writer=write_bytes_atomic, seconds=_never)
    assert fastconv.choose(x, weight) == fastconv.size_rule(x, weight)
    assert not (tmp_path / "k.json").exists()


def test_training_takes_the_size_rules(tmp_path):
    autotune.configure("measure", path=tmp_path / "k.json", seconds=_never)
    x, w = _layer(n=2, c=256, h=32, w=32, co=256)
    with torch.enable_grad():
        assert fastconv.choose(x, w.requires_grad_()) == "winograd"  # winograd by the rules, not measured


def test_off_in_tests():
    assert os.environ[autotune.ENV_MODE] == "rules"
    assert autotune.current().mode == "rules"
    code = "from diffusekit.runtime import autotune; print(autotune.current().mode)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "rules"  # inherited by the processes tests start


def test_modes_are_checked():
    assert autotune.parse_mode("off") == "rules" and autotune.parse_mode(" Measure ") == "measure"
    with pytest.raises(ConfigError, match="DIFFUSEKIT_AUTOTUNE must be one of measure, cached, rules"):
        autotune.parse_mode("fast")


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(autotune.ENV_FILE, raising=False)
    monkeypatch.delenv(user_cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_path() == tmp_path / "xdg" / "diffusekit" / "autotune" / "kernels.json"
    monkeypatch.setenv(user_cache.CACHE_ENV, str(tmp_path / "dk"))
    assert autotune.cache_path() == tmp_path / "dk" / "autotune" / "kernels.json"
    monkeypatch.setenv(autotune.ENV_FILE, str(tmp_path / "shipped.json"))
    assert autotune.cache_path() == tmp_path / "shipped.json"


@pytest.mark.parametrize("fastest", ["direct", "winograd", "gemm"])
def test_the_chosen_path_computes_the_plain_convolution(tmp_path, fastest):
    costs = {"direct": 3.0, "winograd": 2.0, "gemm": 4.0, fastest: 1.0}
    autotune.configure("measure", path=tmp_path / "k.json", seconds=_fake(costs))
    conv = Conv2d(24, 20, 3, padding=1)
    prepare(conv, Plan(dtype=torch.float32))
    x = torch.randn(2, 24, 11, 9).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        y = conv(x)
    assert autotune.current().choices[autotune.layer_key(x, conv.weight)]["kernel"] == fastest
    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
    # float32 Winograd F(4x4,3x3) loses about one digit (1e-5 relative); a wrong path is off by O(1)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 5e-5


def test_real_measurement_picks_a_path_that_computes_the_plain_convolution(tmp_path):
    """With the real timer (no assertion on which path wins: that depends on the machine)."""
    autotune.configure("measure", path=tmp_path / "k.json", writer=write_bytes_atomic)
    x, w = _layer(n=1, c=32, h=12, w=12, co=32)
    y = fastconv.conv2d(x, w, None, 1, 1)
    choice = autotune.current().choices[autotune.layer_key(x, w)]
    assert choice["kernel"] in autotune.KERNELS and set(choice["ms"]) <= set(autotune.KERNELS)
    assert torch.allclose(y, F.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-4)


def test_a_bad_mode_is_a_one_line_cli_error(monkeypatch, capsys):
    from diffusekit.cli.main import main

    monkeypatch.setattr(autotune, "_ENV_MODE_VALUE", "fastest")
    assert main(["bench", "--tiny", "--workloads", "W1"]) == 2  # refused before any work
    err = capsys.readouterr().err
    assert err.startswith("diffusekit bench: error: DIFFUSEKIT_AUTOTUNE must be one of measure, cached, rules")


def test_threads_measuring_at_once_share_one_measurement_and_one_intact_file(tmp_path, monkeypatch):
    """The server runs pipelines in threads: 8 threads hammer 3 tiny layer shapes in the measuring mode (as
    DIFFUSEKIT_AUTOTUNE=measure sets it, with the command-line tool's atomic writer). Each shape is measured
    once, every choice reaches the cache file, nothing raises or warns, and the writer is kept. The timer
    sleeps 1 ms per call (releasing the GIL) so that unguarded threads do meet inside a measurement."""
    import threading
    import time
    import warnings

    monkeypatch.setattr(autotune, "_ENV_MODE_VALUE", "measure")
    monkeypatch.setenv(user_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(autotune.ENV_FILE, raising=False)
    writes: list[bytes] = []

    def writer(path: Path, data: bytes):
        writes.append(data)
        time.sleep(0.002)  # a slow disk: other threads reach their own save meanwhile
        return write_bytes_atomic(path, data)

    def seconds(kernel, call):
        time.sleep(0.001)
        return autotune.perf_seconds(kernel, call)

    tuner = autotune.configure(writer=writer, seconds=seconds)
    assert tuner.mode == "measure" and tuner.path == tmp_path / "cache" / "autotune" / "kernels.json"
    layers = [_layer(c=c, co=c, h=6, w=6, seed=c) for c in (4, 6, 8)]
    start, errors = threading.Barrier(8), []

    def hammer(k: int):
        try:
            start.wait()
            for i in range(6):
                x, w = layers[(k + i) % len(layers)]
                picked = fastconv.choose(x, w)
                assert torch.allclose(fastconv.conv2d(x, w, None, 1, 1), F.conv2d(x, w, padding=1), atol=1e-4)
                assert picked in (None, "winograd", "gemm")
        except BaseException as e:  # noqa: BLE001  (reported below with the thread's number)
            errors.append(f"thread {k}: {type(e).__name__}: {e}")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=hammer, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    assert not [str(w.message) for w in caught if "kernel choices" in str(w.message)]
    assert autotune.current() is tuner and tuner.writer is writer
    keys = {autotune.layer_key(x, w) for x, w in layers}
    assert set(tuner.choices) == keys and len(writes) == len(keys)  # one measurement, one save per shape
    saved = autotune.read_cache(tuner.path)[autotune.machine_id(autotune.machine())]["choices"]
    assert saved == tuner.choices
    assert not list(tuner.path.parent.glob(".*tmp*"))  # no temporary file left behind
