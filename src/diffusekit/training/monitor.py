"""What a run shows while it trains: JSONL metrics, optional TensorBoard, and a loss-curve PNG at the end.

``metrics.jsonl`` gets one JSON object per logging interval ({"step", "loss", "lr", "grad_norm",
"ema_decay", ...}); on resume, records past the resumed step (written by the interrupted run after its
last checkpoint) are dropped so the file describes one consistent run. A new run replaces the metrics file of
a former run in its folder, and refuses to start where that name holds anything else (someone's file).
TensorBoard event files are written when the ``tensorboard`` package is installed (``pip install
diffusekit[log]``); without it training goes on and says so once. The loss curve is drawn with Pillow, no
plotting library needed.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from diffusekit.errors import ConfigError
from diffusekit.io.atomic import write_atomic, write_text_atomic

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a metrics.jsonl file (a torn last line from a crash is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


_RECORD_START = '{"step": '  # how every record of MetricsLogger.log begins (json.dumps of {"step": ...})


def written_by_a_run(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a metrics file a training run wrote: UTF-8 lines, each a JSON object with an integer
    ``step``, but for a last line torn by a crash (the start of such a record); an empty file too (a run that
    stopped before its first record). Anything else, a folder or a link included, is not."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError):
        return False
    last = lines.pop()  # "" after the final newline; otherwise a line the run did not finish
    if last and not (last.startswith(_RECORD_START) or _RECORD_START.startswith(last)):
        return False
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            return False
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):
            return False
    return True


def check_metrics_file(run_dir: str | os.PathLike, where: str, option: str) -> None:
    """A new run in ``run_dir`` replaces its ``metrics.jsonl``: refuse (ConfigError starting with ``where``, the
    option and path the user gave) when that name holds something a run did not write."""
    path = Path(run_dir) / METRICS_FILE
    if (path.exists() or path.is_symlink()) and not written_by_a_run(path):
        raise ConfigError(f"{where}: {path} was not written by a training run, which would replace it; move it or "
                          f"choose another {option}")  # fmt: skip


class MetricsLogger:
    """Appends metric records to ``<run>/metrics.jsonl`` and, if available, to TensorBoard. A new run (no
    ``resume_step``) starts the file afresh, replacing only a file a former run wrote (ConfigError otherwise)."""

    def __init__(self, run_dir: str | os.PathLike, *, resume_step: int | None = None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept), what="metrics file")
        elif self.path.exists() or self.path.is_symlink():
            check_metrics_file(self.run_dir, f"run.output_dir {self.run_dir}", "run.output_dir")
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn(
                    "TensorBoard logging is off: the 'tensorboard' package is not installed "
                    "(pip install 'diffusekit[log]'); metrics still go to metrics.jsonl",
                    stacklevel=2,
                )
            else:
                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=resume_step)

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must contain ``step``)."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, step)

    def log_images(self, tag: str, grid_0_1: Tensor, step: int) -> None:
        """An image grid (C, H, W) in [0, 1] to TensorBoard (when installed)."""
        if self.tb is not None:
            self.tb.add_image(tag, grid_0_1.float().clamp(0, 1), step)

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 1e-3:
        return f"{v:.0e}"
    return f"{v:g}"


def plot_loss_curve(
    records: list[dict[str, Any]],
    path: str | os.PathLike,
    *,
    key: str = "loss",
    log_y: bool = True,
    size: tuple[int, int] = (800, 480),
    title: str = "training loss",
) -> Path | None:
    """Draw ``key`` against ``step`` as a PNG (raw values light, a moving average dark); None if no data."""
    pts = [
        (float(r["step"]), float(r[key]))
        for r in records
        if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and (r[key] > 0 or not log_y)
    ]
    if not pts:
        return None
    W, H = size
    left, right, top, bottom = 70, 20, 36, 46
    xs = [p[0] for p in pts]
    ys = [math.log10(p[1]) if log_y else p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x1 = x0 + 1
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (W - left - right), top + (y1 - y) / (y1 - y0) * (H - top - bottom))

    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    # y ticks: decades (and 2x, 5x) on a log axis, plain ticks otherwise
    if log_y:
        ticks = [math.log10(m * 10**e) for e in range(math.floor(y0), math.ceil(y1) + 1) for m in (1, 2, 5)]
        ticks = [t for t in ticks if y0 <= t <= y1]
        labels = [_fmt(10**t) for t in ticks]
    else:
        ticks = [t for t in _nice_ticks(y0, y1) if y0 <= t <= y1]
        labels = [_fmt(t) for t in ticks]
    for t, lab in zip(ticks, labels):
        _, y = px(x0, t)
        d.line([left, y, W - right, y], fill=(230, 230, 230))
        d.text((left - 6, y), lab, fill="black", font=font, anchor="rm")
    for t in _nice_ticks(x0, x1):
        if x0 <= t <= x1:
            x, _ = px(t, y0)
            d.line([x, top, x, H - bottom], fill=(230, 230, 230))
            d.text((x, H - bottom + 6), _fmt(t) if t < 1e6 else f"{t:.2g}", fill="black", font=font, anchor="ma")
    d.text((W / 2, H - 16), "optimizer step", fill="black", font=font, anchor="mm")
    d.text((W / 2, 16), title + (" (log scale)" if log_y else ""), fill="black", font=font, anchor="mm")
    line = [px(x, y) for x, y in zip(xs, ys)]
    if len(line) > 1:
        d.line(line, fill=(150, 180, 230), width=1)
        k = max(1, len(ys) // 20)
        window = [ys[max(0, i - k) : i + k + 1] for i in range(len(ys))]  # centred moving average
        smooth = [sum(w) / len(w) for w in window]
        d.line([px(x, y) for x, y in zip(xs, smooth)], fill=(20, 60, 160), width=2)
    else:
        x, y = line[0]
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(20, 60, 160))
    return write_atomic(path, lambda tmp: img.save(tmp, format="PNG"), what="loss curve")
