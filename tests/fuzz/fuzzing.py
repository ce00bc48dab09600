"""Shared machinery of the fuzz tests (``tests/fuzz/test_fuzz_*.py``); holds no tests itself.

Every fuzz case runs through :meth:`Tally.check`, which enforces the robustness contract for one input:
the call either succeeds or raises a :class:`~diffusekit.errors.DiffusekitError` whose message names the
file or argument at fault. Anything else fails the test with the input that caused it: an exception of
another type (a traceback from inside a dependency), a run longer than the per-case time limit (a hang), or
peak memory beyond the session's limit (an unbounded allocation). A segfault ends the whole run, which CI
reports as a failure too.

The number of cases tried per target is printed in pytest's terminal summary (``fuzz: ... cases``).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from diffusekit.errors import DiffusekitError

CASE_SECONDS = float(os.environ.get("DIFFUSEKIT_FUZZ_CASE_SECONDS", "30"))  # one input's time limit
PEAK_RSS_LIMIT_MIB = float(os.environ.get("DIFFUSEKIT_FUZZ_PEAK_RSS_MIB", "3072"))  # the whole session's
SCALE = float(os.environ.get("DIFFUSEKIT_FUZZ_SCALE", "1"))  # multiplies every max_examples

# Hypothesis settings for the fuzz tests: our own per-case limit replaces hypothesis' deadline (the first
# examples include imports and warm-up), and examples are derived from the test (reproducible in CI).
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],  # no "explain": it traces
    # every line the failing case runs again (slow, and it drove memory to 11 GB on a torch-heavy case)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


def examples(n: int) -> settings:
    """``FUZZ`` with ``n`` examples (times DIFFUSEKIT_FUZZ_SCALE)."""
    return settings(FUZZ, max_examples=max(1, int(n * SCALE)))


class FuzzHang(Exception):
    """Raised inside a case that ran past CASE_SECONDS."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise FuzzHang in the main thread after ``seconds`` (SIGALRM; Unix)."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise FuzzHang(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Tally:
    """Counts fuzz cases per target and outcome, and checks each case's outcome."""

    def __init__(self) -> None:
        self.cases: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()

    def check(
        self,
        target: str,
        call: Callable[[], Any],
        *,
        names: Iterable[str] = (),
        describe: Callable[[], str] | str = "",
    ) -> Any:
        """Run ``call()``; return its result, or None when it raised a DiffusekitError whose message
        contains one of ``names`` (the file or argument the input was given as). Fail the test otherwise."""
        names = [str(n) for n in names]
        self.cases[target] += 1
        start, peak_before = time.perf_counter(), peak_rss_mib()
        try:
            with time_limit(CASE_SECONDS):
                return call()
        except DiffusekitError as e:
            self.refused[target] += 1
            message = str(e)
            if names and not any(n in message for n in names):
                pytest.fail(
                    f"{target}: {type(e).__name__} does not name any of {names}: {message!r}\n"
                    f"input: {_describe(describe)}"
                )
            return None
        except FuzzHang as e:
            pytest.fail(f"{target}: hang ({e})\ninput: {_describe(describe)}")
        except Exception as e:  # noqa: BLE001 - the point: any other type is a finding
            pytest.fail(
                f"{target}: {type(e).__name__} escaped instead of a DiffusekitError: {str(e)[:500]}\n"
                f"input: {_describe(describe)}"
            )
        finally:
            self.seconds[target] += time.perf_counter() - start
            if peak_rss_mib() > max(PEAK_RSS_LIMIT_MIB, peak_before):  # this case raised the high-water mark
                pytest.fail(
                    f"{target}: peak memory {peak_rss_mib():.0f} MiB exceeds {PEAK_RSS_LIMIT_MIB:.0f} MiB "
                    f"(unbounded allocation?)\ninput: {_describe(describe)}"
                )

    def summary_lines(self) -> list[str]:
        if not self.cases:
            return []
        width = max(len(t) for t in self.cases)
        lines = [
            f"  {t:<{width}}  {n:>7} cases  {self.refused[t]:>7} refused with a DiffusekitError  "
            f"{self.seconds[t]:7.1f} s"
            for t, n in sorted(self.cases.items())
        ]
        total, refused = sum(self.cases.values()), sum(self.refused.values())
        lines.append(
            f"fuzz: {total} cases tried over {len(self.cases)} targets, {refused} refused with a "
            f"DiffusekitError, {total - refused} accepted, 0 escaped (any escape fails its test); "
            f"peak RSS {peak_rss_mib():.0f} MiB"
        )
        return lines


class _SummaryPlugin:
    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        lines = self.tally.summary_lines()
        if lines:
            terminalreporter.section("fuzz cases")
            for line in lines:
                terminalreporter.write_line(line)


_TALLY = Tally()


def session_tally(request: pytest.FixtureRequest) -> Tally:
    """The session's fuzz counter (one for all fuzz modules); its figures go into the terminal summary.
    Each fuzz module wraps this in its own ``tally`` fixture."""
    manager = request.config.pluginmanager
    if not manager.has_plugin("diffusekit-fuzz-summary"):
        manager.register(_SummaryPlugin(_TALLY), "diffusekit-fuzz-summary")
    return _TALLY


def _describe(describe: Callable[[], str] | str) -> str:
    text = describe() if callable(describe) else describe
    return text if len(text) <= 2000 else text[:2000] + "..."


# ---------------------------------------------------------------------------------------------------------
# Strategies: hostile JSON values and mutations of a valid config


EXTREME_INTS = [0, 1, -1, 2, 3, 7, 8, 64, 10**9, -(10**9), 2**31, 2**53 + 1, 2**63, 2**64, 10**30, -(10**30)]
EXTREME_FLOATS = [0.0, -0.0, 0.5, 1.0, -1.0, 1e-300, 1e300, 1e308, float("nan"), float("inf"), float("-inf")]


def json_values(max_leaves: int = 8) -> st.SearchStrategy[Any]:
    """Any JSON value, biased towards the ones that break parsers: extreme numbers, NaN, wrong types."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from(EXTREME_INTS),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from(EXTREME_FLOATS),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
        max_leaves=max_leaves,
    )


def deep(depth: int) -> Any:
    """A list nested ``depth`` levels deep."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def near(value: Any, strings: list[str]) -> st.SearchStrategy[Any]:
    """Values close to a valid ``value`` (the same type, edge numbers, one element changed) -- these get past
    the first checks and reach deeper code."""
    if isinstance(value, bool):
        return st.sampled_from([not value, 0, 1, "true", None])
    if isinstance(value, int):
        return st.one_of(
            st.sampled_from([0, -1, -value, value + 1, value * 2, value * 1000, 10**9, 2**63, float(value)]),
            st.integers(min_value=-4 * abs(value) - 4, max_value=4 * abs(value) + 4),
        )
    if isinstance(value, float):
        return st.one_of(st.sampled_from(EXTREME_FLOATS + [-value, value * 1e6, str(value)]), st.floats())
    if isinstance(value, str):
        return st.one_of(st.sampled_from(strings), st.text(max_size=12), st.just(value.upper()), st.just(""))
    if isinstance(value, list) and value:

        def change_one(args: tuple[int, Any]) -> list:
            i, new = args
            out = list(value)
            out[i % len(out)] = new
            return out

        element = near(value[0], strings)
        return st.one_of(
            st.tuples(st.integers(0, len(value) - 1), element).map(change_one),
            st.just(value[:-1]),
            st.just(value + value[-1:]),
            st.just([]),
            st.just(value * 3),
            st.lists(element, max_size=6),
        )
    return json_values()


def string_values(*configs: dict) -> list[str]:
    """Every string that appears in ``configs`` (valid names to mix up)."""
    found: set[str] = set()

    def walk(v: Any) -> None:
        if isinstance(v, str):
            found.add(v)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)

    for c in configs:
        walk(c)
    return sorted(found)


def mutated(base: dict, strings: list[str], max_ops: int = 4) -> st.SearchStrategy[dict]:
    """``base`` with 1..max_ops mutations: a key set to a near-valid or a hostile value, a key removed, an
    unknown key added, or a key nested very deep."""
    keys = sorted(base)
    op = st.one_of(
        st.sampled_from(keys).flatmap(lambda k: near(base[k], strings).map(lambda v: ("set", k, v))),
        st.tuples(st.just("set"), st.sampled_from(keys), json_values()),
        st.tuples(st.just("del"), st.sampled_from(keys), st.none()),
        st.tuples(st.just("set"), st.text(max_size=10), json_values()),
        st.tuples(st.just("set"), st.sampled_from(keys), st.just(deep(60))),
    )

    def apply(ops: list[tuple[str, str, Any]]) -> dict:
        out = dict(base)
        for kind, key, value in ops:
            if kind == "del":
                out.pop(key, None)
            else:
                out[key] = value
        return out

    return st.lists(op, min_size=1, max_size=max_ops).map(apply)
