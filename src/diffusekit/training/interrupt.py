"""Ctrl-C during training: the first one stops the loop after the current step (a checkpoint is saved and the
resume command printed); a second one quits at once."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any


def on_sigint(handler: Callable[[], None]) -> Any:
    """Call ``handler`` on SIGINT (Ctrl-C) instead of raising KeyboardInterrupt; returns the previous handler
    to put back (None where signals cannot be handled: outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGINT, lambda signum, frame: handler())


def request_stop(flag: threading.Event) -> None:
    """The first Ctrl-C asks the loop to stop after the current step and save a checkpoint; a second one
    raises KeyboardInterrupt at once (nothing more is saved)."""
    if flag.is_set():
        raise KeyboardInterrupt
    flag.set()
    print("\ninterrupted: finishing this step and saving a checkpoint (Ctrl-C again to quit without saving)",
          file=sys.stderr, flush=True)  # fmt: skip
