"""Measuring helpers for ``diffusekit bench`` and ``benchmarks/compare.py``: interleaved timing, medians,
peak memory, the machine's matrix-multiply peak, FLOP counts, PSNR and a plain-text table."""

from __future__ import annotations

import gc
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def clock(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of ``fn`` (CUDA work included: the device is synchronised around it)."""
    gc.collect()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    reps: int,
    warmup: int = 1,
    budget_s: float | None = None,
) -> dict[str, list[float]]:
    """Time each function ``reps`` times, alternating between them (a, b, a, b, ...; the order flips each
    round so neither side always runs first), after ``warmup`` untimed rounds. With ``budget_s``, stop
    adding rounds once the next would exceed it (at least one timed round is always run); when a warm-up
    round alone exceeds the budget, it is kept as the measurement instead of being thrown away."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    warm: dict[str, float] = {}
    for _ in range(warmup):
        warm = {n: clock(fns[n]) for n in names}
    if budget_s is not None and warm and sum(warm.values()) > budget_s:
        return {n: [t] for n, t in warm.items()}
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            times[n].append(clock(fns[n]))
        spent = time.perf_counter() - start
        per_round = sum(times[n][-1] for n in names)
        if budget_s is not None and spent + per_round > budget_s:
            break
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB. On Linux from ``VmHWM``, which starts afresh at
    ``exec`` (``ru_maxrss`` keeps the forking parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def matmul_peak_flops(dtype: torch.dtype, *, n: int = 2048, reps: int = 3, device: str = "cpu") -> float:
    """Best achieved FLOP/s of an n x n x n matrix product in ``dtype`` (the machine's practical peak). Where
    the dtype is slow (< 5 GFLOP/s: emulated bfloat16 on a CPU without it), n shrinks so that one product takes
    about a second."""

    def best(size: int, rounds: int) -> float:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        fastest = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            a @ b
            if device != "cpu":
                torch.cuda.synchronize()
            fastest = min(fastest, time.perf_counter() - start)
        return fastest

    probe = 256
    rate = 2 * probe**3 / best(probe, 2)
    # emulated half precision only: a busy machine can make any probe slow, and a small product underrates float32
    while n > probe and dtype != torch.float32 and rate < 5e9 and 2 * n**3 / rate > 1.0:
        n //= 2
    return 2 * n**3 / best(n, reps + 1)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (matrix products, convolutions and attention), counted by PyTorch's
    ``FlopCounterMode``. Run it on meta tensors to count without computing."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB between two images in [0, peak] (inf when identical)."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(peak**2 / mse)).item()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


#: Rows measured while other work kept the 1-minute load average above this are not evidence: flagged in the
#: table, and refused by :func:`diffusekit.bench.harness.write_report` unless the caller allows them.
BUSY_LOAD = 1.5
#: The kernel's load averages are exponentially damped: the 1-minute one has a 60-second time constant.
LOAD_TAU_S = 60.0


def load_average() -> float | None:
    """The machine's 1-minute load average (None where the system does not report one)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def load_averages() -> list[float] | None:
    """The machine's 1-, 5- and 15-minute load averages, rounded to 0.01 (None where not reported): what a
    benchmark report records before and after its run."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_seconds() -> float:
    """CPU seconds (user + system, all threads) used so far by this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class LoadMeter:
    """The 1-minute load average that *other* work puts on the machine, for telling evidence from noise.

    The load average counts this benchmark's own busy threads too (a 2-thread benchmark alone on an idle
    machine drives it to about 2), so the raw figure cannot tell a busy machine from a busy benchmark. The
    kernel computes it as an exponentially damped average of the number of runnable threads,
    L(t + dt) = L(t) e^{-dt/60} + n (1 - e^{-dt/60}), which is linear in n: this meter damps this process's
    own CPU use (CPU seconds per wall second between two readings) with the same time constant and subtracts
    it. A thread of ours that waits for a core counts in the load but not in our CPU time, so on a busy
    machine the estimate errs high (towards flagging)."""

    def __init__(self, load: Callable[[], float | None] = load_average, cpu: Callable[[], float] = cpu_seconds,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._load, self._cpu, self._clock = load, cpu, clock
        self._t, self._used = clock(), cpu()
        self.own = 0.0  # this process's damped share of the load average

    def read(self) -> tuple[float | None, float | None]:
        """(the raw 1-minute load average, the part of it that is not this process's), both None where the
        system reports no load average."""
        now, used = self._clock(), self._cpu()
        dt = now - self._t
        if dt > 0:
            decay = math.exp(-dt / LOAD_TAU_S)
            self.own = self.own * decay + (used - self._used) / dt * (1 - decay)
        self._t, self._used = now, used
        raw = self._load()
        return raw, None if raw is None else max(0.0, raw - self.own)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A fixed-width text table; ``columns`` are (key, header) pairs; floats print with 4 significant digits."""

    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    lines = [" | ".join(h.ljust(w) for (_, h), w in zip(columns, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
