"""Upper bounds on the sizes a model or scheduler config may ask for.

Config files come from strangers. A size is checked against these bounds when a foreign config is
translated into ours, before any module is built or any tensor allocated, so that a file claiming
``block_out_channels=[10**9]`` or ``layers_per_block=10**9`` gets a ConfigError instead of exhausting
memory or building modules for hours. The bounds are far above every published diffusion model
(SD-XL: widths <= 1280 x 4, 3 levels, 10 transformer blocks; CLIP/OpenCLIP text towers <= 32 layers).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

from diffusekit.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])

MAX_WIDTH = 65_536  # channels, hidden/MLP widths, cross-attention width, head counts, norm groups
MAX_LEVELS = 8  # U-Net / VAE resolution levels (2**7 = 128x downsampling)
MAX_LAYERS_PER_BLOCK = 16  # residual blocks per U-Net / VAE level
MAX_TRANSFORMER_DEPTH = 32  # transformer blocks per U-Net attention layer
MAX_TEXT_LAYERS = 256  # text-encoder transformer layers
MAX_VOCAB = 1_048_576  # tokens in a vocabulary
MAX_POSITIONS = 65_536  # text positions (and a tokenizer's model_max_length)
MAX_CLASSES = 1_048_576  # class-embedding table rows
MAX_SAMPLE_SIZE = 65_536  # a config's training resolution hint, in pixels or latent pixels


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """``value`` if it is an integer (not a bool) in [low, high]; else a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {short_repr(value)}")
    return value


def check_float(name: str, value: Any, low: float, high: float, *, open_low: bool = False) -> float:
    """``value`` as a float if it is a finite real number (not a bool) in [low, high] (``(low, high]`` when
    ``open_low``); else a ConfigError naming ``name``."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (low < value if open_low else low <= value) and value <= high
    if not ok:
        interval = f"{'(' if open_low else '['}{low}, {high}]"
        raise ConfigError(f"{name} must be a finite number in {interval}, got {short_repr(value)}")
    return float(value)


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is a boolean (JSON true/false; 0 and 1 pass too); else a ConfigError naming ``name``."""
    if value not in (True, False) or not isinstance(value, bool | int):
        raise ConfigError(f"{name} must be true or false, got {short_repr(value)}")
    return bool(value)


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters for an error message (an int too long to print is described)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print (sys.get_int_max_str_digits)
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def translating(what: str, names: dict[str, str] | None = None) -> Callable[[F], F]:
    """Decorator for the functions that translate a config read from a file: a TypeError, ValueError,
    KeyError, ... raised while reading a malformed one becomes a ConfigError naming ``what``. ``names``
    maps our field names to the file's keys, so that messages name the keys the user can find in the file."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b") if names else None

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def translate(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ConfigError as e:
                if pattern is None:
                    raise
                raise ConfigError(pattern.sub(lambda m: names[m.group(1)], str(e))) from None
            except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as e:
                raise ConfigError(f"invalid {what} ({type(e).__name__}: {e})") from None

        return translate  # type: ignore[return-value]

    return wrap
