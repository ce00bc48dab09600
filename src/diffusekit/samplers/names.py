"""The sampler names users type, in one table: the popular SD web UI's names (``"DPM++ 2M Karras"``,
``"Euler a"``), the k-diffusion aliases its API also takes, and our own names and older spellings, each
mapped to our sampler and its noise-level grid (Karras sigmas or the sampler's own).

The generation recipe (command line, JSON, PNG metadata) and the HTTP server read names through
:func:`lookup` and write them with :func:`web_ui_name`, so a PNG's ``Sampler:`` line reads as the web UI
writes it. A web-UI name is listed only where our sampler runs the same update rule as the web UI's;
where its grid or a variant differs, :attr:`SamplerName.note` says how (the README's table prints it).
Our grids follow the model's scheduler config (timestep spacing, schedule), and the web UI draws its
noise differently, so the same seed never gives the web UI's pixels, only the same algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffusekit.errors import ConfigError
from diffusekit.samplers.config import ALIASES, MULTISTEP_SAMPLERS, SAMPLERS, SIGMA_SAMPLERS

# the samplers whose grid is a list of sigmas, where Karras et al. (2022) eq. (5) spacing applies
KARRAS_SAMPLERS = (*SIGMA_SAMPLERS, *MULTISTEP_SAMPLERS)
KARRAS = "Karras"  # the web UI's name for that grid ("Schedule type: Karras")


@dataclass(frozen=True)
class SamplerName:
    """One web-UI sampler name: our ``sampler``, whether it walks Karras sigmas, the other spellings the web
    UI's API accepts for it, and how ours differs from the web UI's (empty: the same rule and grid kind)."""

    name: str
    sampler: str
    karras: bool = False
    aliases: tuple[str, ...] = ()
    note: str = ""


_DPM2_NOTE = "the web UI drops the next-to-last sigma of its grid; ours walks every level (the reference's KDPM2)"
WEB_UI: tuple[SamplerName, ...] = (
    SamplerName("Euler", "euler", aliases=("k_euler",)),
    SamplerName("Euler a", "euler_ancestral", aliases=("k_euler_a", "k_euler_ancestral")),
    SamplerName("Heun", "heun", aliases=("k_heun",)),
    SamplerName("DPM2", "kdpm2", aliases=("k_dpm_2",), note=_DPM2_NOTE),
    SamplerName("DPM2 Karras", "kdpm2", True, ("k_dpm_2_ka",), note=_DPM2_NOTE),
    SamplerName("DPM++ 2M", "dpmpp_2m", aliases=("k_dpmpp_2m",)),
    SamplerName("DPM++ 2M Karras", "dpmpp_2m", True, ("k_dpmpp_2m_ka",)),
    SamplerName("DDIM", "ddim"),
    SamplerName("PLMS", "pndm"),
    SamplerName(
        "UniPC", "unipc", note="variant bh2 of order 2 (the reference's default); the web UI defaults to bh1 of order 3"
    ),
    SamplerName(
        "LCM",
        "lcm",
        note="N steps take every (50/N)-th of the 50 distillation times from the top (the "
        "reference's LCMScheduler); the web UI spaces N times evenly over them",
    ),
    SamplerName("DDPM", "ddpm"),
)
BY_NAME = {n.name: n for n in WEB_UI}

# every accepted spelling -> (our sampler, karras); karras None: the model's own grid. Our names are matched
# exactly ("euler" keeps the model's grid), the web UI's in any case ("euler a", "DPM++ 2M KARRAS")
_OURS: dict[str, tuple[str, bool | None]] = {
    **{s: (s, None) for s in SAMPLERS},
    **{a: (s, None) for a, s in ALIASES.items()},
}
_WEB_UI = {spelling.lower(): (n.sampler, n.karras) for n in WEB_UI for spelling in (n.name, *n.aliases)}


def lookup(text: object, where: str = "sampler") -> tuple[str, bool | None]:
    """A sampler name as users type it -> (our sampler, karras). A web-UI name (any case) fixes the grid
    (``"DPM++ 2M"``: False, ``"DPM++ 2M Karras"``: True); our own names (``dpmpp_2m``, ``euler-a``) give None,
    the model's own setting. Anything else: a ConfigError naming ``where`` with the names allowed."""
    if isinstance(text, str):
        if text in _OURS:
            return _OURS[text]
        if text.strip().lower() in _WEB_UI:
            return _WEB_UI[text.strip().lower()]
    shown = repr(text) if len(repr(text)) <= 60 else repr(text)[:57] + "..."
    raise ConfigError(f"{where} must be a sampler name: {names_for_messages()}; got {shown}")


def web_ui_name(sampler: str, karras: bool) -> str | None:
    """The web UI's name for ``sampler`` on the given grid (None where it has none, e.g. Karras UniPC)."""
    karras = bool(karras) and sampler in KARRAS_SAMPLERS  # other samplers have no sigma grid to space
    return next((n.name for n in WEB_UI if n.sampler == sampler and n.karras == karras), None)


def names_for_messages() -> str:
    """The accepted names as messages and ``--help`` list them."""
    return f"{', '.join(repr(n.name) for n in WEB_UI)} (or ours: {', '.join(SAMPLERS)})"


def check_karras(where: str, sampler: str, karras: bool | None) -> None:
    """A ConfigError naming ``where`` when Karras sigmas are asked of a sampler that walks no sigma grid."""
    if karras and sampler not in KARRAS_SAMPLERS:
        raise ConfigError(f"{where}: Karras sigmas apply to the samplers {', '.join(KARRAS_SAMPLERS)}, not to "
                          f"{sampler}")  # fmt: skip


def sampler_and_grid(name: Callable[[str], str], sampler: Any, karras: Any) -> tuple[str | None, bool | None]:
    """(our sampler, karras) from a sampler name as typed and a ``karras`` value; a web-UI name fixes
    ``karras`` (``"DPM++ 2M"``: False) and a ``karras`` that contradicts it is refused."""
    if sampler is None:
        return None, karras
    ours, named = lookup(sampler, name("sampler"))
    if named is not None and karras is not None and karras is not named:
        raise ConfigError(f"{name('sampler')} {sampler!r} and {name('karras')} {karras!r} disagree; "
                          f"give one of them")  # fmt: skip
    return ours, named if karras is None else karras


__all__ = ["BY_NAME", "KARRAS", "KARRAS_SAMPLERS", "WEB_UI", "SamplerName", "check_karras", "lookup",
           "names_for_messages", "sampler_and_grid", "web_ui_name"]  # fmt: skip
