"""Kernel choice by measurement: which convolution path is fastest for one layer shape on this machine,
timed once at first use and remembered, in the spirit of cuDNN's benchmark mode
(``torch.backends.cudnn.benchmark``).

The size rules of :mod:`diffusekit.runtime.fastconv` were fitted on one CPU; on another CPU family the
crossover points move. Where a convolution could take more than one path and is big enough for the choice to
matter (:func:`worth_measuring`), the process-wide :class:`Tuner` times every candidate on the real inputs:
one warm-up call, then timed calls until :data:`REPEATS` are done or :data:`PER_CANDIDATE_S` is spent (at
least :data:`MIN_REPEATS`), and keeps the one with the smallest median. A candidate whose warm-up takes
:data:`SLOW_CALL_S` or more is timed by that call alone, and one whose warm-up or first timed call is
:data:`GIVE_UP_FACTOR` times slower than the best so far is dropped. Every process has a total measuring
budget (:data:`BUDGET_S`; checked before each new layer shape, so one shape's measurement may run past it);
after it is spent, and in every mode that does not measure, the size rules decide (and the unmeasured shapes
are measured by a later process).

Choices are keyed by the machine (CPU model, a digest of its feature flags, the torch version) and, within
it, by the layer (batch, channels in and out, height, width, dtype, memory format and torch's thread count),
and kept in one JSON file (:func:`cache_path`) that may hold several machines, so one file can be shipped to
a fleet. A file that cannot be read or parsed, or whose entries name unknown paths, is ignored and replaced by
the next write. This module sits below :mod:`diffusekit.io` and does not write files itself: whoever
configures the tuner passes a writer (the command-line tool passes ``io.atomic.write_bytes_atomic``); without
one, measurements last for the process only.

Threads (the server runs pipelines in threads) share the process's tuner under one lock (:data:`LOCK`):
a shape is measured by one thread while the others wait for its choice (timings taken while other threads
compute would be wrong anyway), and the cache file is read, merged and written by one thread at a time.
Choices already known are read without the lock.

Modes, from the environment variable :data:`ENV_MODE` (read once, at import) or :func:`configure`:

* ``measure`` (default): use the cached choice; else measure (within the budget); else the size rules.
* ``cached``: use the cached choice, else the size rules; never measure. With a shipped cache file
  (:data:`ENV_FILE`) this makes the choice reproducible across runs and machines of one kind.
* ``rules`` (also ``off``): the size rules only, as fitted; nothing is read, measured or written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffusekit.errors import ConfigError
from diffusekit.user_cache import cache_root

ENV_MODE = "DIFFUSEKIT_AUTOTUNE"
#: A cache file to use instead of the one in the user cache folder (e.g. one shipped with a deployment).
ENV_FILE = "DIFFUSEKIT_AUTOTUNE_FILE"
MODES = ("measure", "cached", "rules")
_ALIASES = {"off": "rules", "0": "rules", "on": "measure", "1": "measure"}
#: The direct convolution's name among the candidates (``fastconv.choose`` returns None for it).
DIRECT = "direct"
KERNELS = (DIRECT, "winograd", "gemm")

BUDGET_S = 10.0  # measuring time per process, all layers together
PER_CANDIDATE_S = 0.02  # timed calls of one candidate stop once this much is spent (after MIN_REPEATS)
#: A candidate whose warm-up call takes this long is timed by that call alone (one call per candidate: the
#: VAE's 512x512 layers take seconds each on a small CPU).
SLOW_CALL_S = 0.1
MIN_REPEATS, REPEATS = 3, 7
GIVE_UP_FACTOR = 3.0
#: Convolutions with fewer multiply-adds than this take the size rules (a choice among paths that take
#: well under a millisecond is not worth a measurement).
MIN_MACS = 5e7
FORMAT = 1

#: Held while a tuner loads, measures or saves, and while the process's tuner is made or replaced; re-entrant
#: so that a writer or timer that uses the tuner does not deadlock.
LOCK = threading.RLock()

Seconds = Callable[[str, Callable[[], object]], float]  # (kernel name, call) -> seconds of that call
Writer = Callable[[Path, bytes], object]


def cache_path() -> Path:
    """The choices file: $DIFFUSEKIT_AUTOTUNE_FILE, else ``kernels.json`` under :func:`cache_root`/autotune."""
    return Path(os.environ.get(ENV_FILE) or cache_root() / "autotune" / "kernels.json")


def parse_mode(value: str, *, option: str = ENV_MODE) -> str:
    """``value`` as one of :data:`MODES` (``off``/``0`` mean ``rules``, ``on``/``1`` mean ``measure``)."""
    mode = _ALIASES.get(value.strip().lower(), value.strip().lower())
    if mode not in MODES:
        raise ConfigError(f"{option} must be one of {', '.join(MODES)} (or off/on), got {value!r}")
    return mode


@functools.cache
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` where that is unreadable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    """What a measurement is valid for: the CPU model, a digest of its feature flags, the torch version."""
    from diffusekit.runtime.policy import cpu_flags  # policy imports the layers, which import fastconv and this

    flags = hashlib.sha1(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
    return {"cpu": cpu_model(), "flags": flags, "torch": torch.__version__}


def machine_id(m: Mapping[str, str]) -> str:
    return hashlib.sha1(json.dumps(dict(m), sort_keys=True).encode()).hexdigest()[:16]


def layer_key(x: torch.Tensor, weight: torch.Tensor) -> str:
    """The layer a choice is for: ``N,C_in,H,W->C_out`` with the dtype, memory format and thread count."""
    n, c, h, w = x.shape
    layout = "cl" if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else "nchw"
    dtype = str(x.dtype).removeprefix("torch.")
    return f"{n},{c},{h},{w}->{weight.shape[0]} {dtype} {layout} t{torch.get_num_threads()}"


def worth_measuring(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a 3x3 convolution of ``x`` with ``weight`` has enough work (:data:`MIN_MACS`) to measure."""
    n, c, h, w = x.shape
    return n * h * w * c * weight.shape[0] * weight.shape[2] * weight.shape[3] >= MIN_MACS


def perf_seconds(kernel: str, call: Callable[[], object]) -> float:
    """Wall seconds of one ``call()`` (``kernel`` names it; fake timers in tests use the name)."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def read_cache(path: Path) -> dict[str, dict]:
    """The machines of the choices file at ``path`` ({machine id: {"machine": ..., "choices": ...}}); empty
    when it is missing, unreadable, not the expected JSON, or names an unknown path anywhere."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    try:
        if data["format"] != FORMAT:
            return {}
        machines = data["machines"]
        for entry in machines.values():
            for choice in entry["choices"].values():
                if choice["kernel"] not in KERNELS or not isinstance(choice.get("ms", {}), dict):
                    return {}
        return {str(k): {"machine": dict(v["machine"]), "choices": dict(v["choices"])} for k, v in machines.items()}
    except (KeyError, TypeError, AttributeError):
        return {}


def encode_cache(machines: Mapping[str, dict]) -> bytes:
    return (json.dumps({"format": FORMAT, "machines": machines}, indent=1, sort_keys=True) + "\n").encode()


@dataclass
class Tuner:
    """The process's kernel choices (module docstring). ``seconds`` times one call of a candidate (a fake in
    tests); ``writer(path, data)`` writes the cache file atomically, or None to keep choices in memory."""

    mode: str = "measure"
    path: Path | None = None
    writer: Writer | None = None
    budget_s: float = BUDGET_S
    seconds: Seconds = perf_seconds
    spent_s: float = 0.0
    choices: dict[str, dict] = field(default_factory=dict)
    _loaded: bool = False

    def __post_init__(self) -> None:
        self.mode = parse_mode(self.mode, option="autotune mode")

    def _machine(self) -> tuple[str, dict[str, str]]:
        m = machine()
        return machine_id(m), m

    def _load(self) -> None:
        """Merge this machine's choices from the cache file into :attr:`choices` (once; under :data:`LOCK`)."""
        if self._loaded:
            return
        if self.path is not None:
            entry = read_cache(self.path).get(self._machine()[0])
            if entry:  # measurements of this process win over the file's
                self.choices.update({k: v for k, v in entry["choices"].items() if k not in self.choices})
        self._loaded = True

    def pick(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        rule: str,
        candidates: Mapping[str, Callable[[], object]],
    ) -> str:
        """The kernel for this convolution: one of ``candidates`` (names from :data:`KERNELS`, each a call
        computing it), ``rule`` (the size rules' choice) when the mode, the size or the budget says so."""
        if self.mode == "rules" or len(candidates) < 2 or not worth_measuring(x, weight):
            return rule
        key = layer_key(x, weight)
        known = self.choices.get(key) if self._loaded else None  # a dict read: safe beside a writing thread
        if known is not None and known["kernel"] in candidates:
            return known["kernel"]
        with LOCK:  # one thread loads, measures and saves; the others wait, then find its choice
            self._load()
            known = self.choices.get(key)
            if known is not None and known["kernel"] in candidates:
                return known["kernel"]
            if self.mode == "cached" or self.spent_s >= self.budget_s:
                return rule
            best, ms = self.measure(candidates)
            self.choices[key] = {"kernel": best, "ms": ms, "rule": rule}
            self._save(key)
            return best

    def measure(self, candidates: Mapping[str, Callable[[], object]]) -> tuple[str, dict[str, float]]:
        """Time every candidate (module docstring) and return the fastest with each one's median in ms."""
        medians: dict[str, float] = {}
        with LOCK:  # one measurement at a time in the process: other threads' work would skew the timings
            for name, call in candidates.items():
                with torch.no_grad():
                    warm = self.seconds(name, call)  # allocations, oneDNN primitive creation
                    self.spent_s += warm
                    best = min(medians.values(), default=float("inf"))
                    if warm >= SLOW_CALL_S or warm > GIVE_UP_FACTOR * best:
                        medians[name] = warm  # slow enough that set-up is noise beside it, or clearly losing
                        continue
                    runs: list[float] = []
                    while len(runs) < REPEATS and (len(runs) < MIN_REPEATS or sum(runs) < PER_CANDIDATE_S):
                        runs.append(self.seconds(name, call))
                        self.spent_s += runs[-1]
                        if len(runs) == 1 and runs[0] > GIVE_UP_FACTOR * best:
                            break
                medians[name] = statistics.median(runs)
            best = min(medians, key=medians.__getitem__)
            return best, {k: round(v * 1e3, 4) for k, v in medians.items()}

    def _save(self, key: str) -> None:
        """Merge ``key``'s choice into the cache file (under :data:`LOCK`: a read-merge-write of one thread at a
        time, so no thread's choice is lost and no two write the file at once)."""
        if self.writer is None or self.path is None:
            return
        mid, m = self._machine()
        machines = read_cache(self.path)  # another process may have added machines or layers meanwhile
        entry = machines.setdefault(mid, {"machine": m, "choices": {}})
        entry["choices"][key] = self.choices[key]
        try:
            self.writer(self.path, encode_cache(machines))
        except OSError as e:  # a read-only shipped file or a full disk: keep the choice for this process
            warnings.warn(f"kernel choices not saved to {self.path}: {e}", RuntimeWarning, stacklevel=2)
            self.writer = None


_tuner: Tuner | None = None


def current() -> Tuner:
    """The process's tuner; made at first use from :data:`ENV_MODE` and :data:`ENV_FILE` (no writer)."""
    global _tuner
    tuner = _tuner
    if tuner is None:
        with LOCK:  # two threads at first use get one tuner
            if _tuner is None:
                _tuner = Tuner(mode=parse_mode(_ENV_MODE_VALUE), path=cache_path())
            tuner = _tuner
    return tuner


def configure(
    mode: str | None = None,
    *,
    path: Path | None = None,
    writer: Writer | None = None,
    budget_s: float | None = None,
    seconds: Seconds | None = None,
) -> Tuner:
    """Replace the process's tuner: ``mode`` (default: the environment's), the cache file (default
    :func:`cache_path`), the atomic ``writer`` that saves it, the measuring budget and the timer."""
    global _tuner
    tuner = Tuner(
        mode=parse_mode(_ENV_MODE_VALUE) if mode is None else parse_mode(mode, option="autotune mode"),
        path=path if path is not None else cache_path(),
        writer=writer,
        budget_s=BUDGET_S if budget_s is None else budget_s,
        seconds=seconds or perf_seconds,
    )
    with LOCK:
        _tuner = tuner
    return tuner


_ENV_MODE_VALUE = os.environ.get(ENV_MODE, "measure")
