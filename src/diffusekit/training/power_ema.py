"""The power-function EMA and its post-hoc reconstruction (Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models", EDM2: sec. 3.1 and appendix C).

A power-function EMA with exponent gamma averages the weights theta(tau) of training steps tau <= t with the
profile

    p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 <= tau <= t,

which is the EMA theta_hat(t) = beta_t theta_hat(t - 1) + (1 - beta_t) theta(t) with

    beta_t = (1 - 1/t)^(gamma + 1)                                      (sec. 3.1)

(beta_1 = 0: the first average is the first weights). Unrolled, step i gets the weight
prod_{j > i} beta_j (1 - beta_i) = (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1), the integral of the profile
over (i - 1, i]. Its width relative to t does not change during training: the standard deviation of the
profile divided by t is

    sigma_rel = (gamma + 1)^(1/2) (gamma + 2)^(-1) (gamma + 3)^(-1/2)         (sec. 3.1)

Post-hoc reconstruction (appendix C.2): training tracks a few profiles (e.g. sigma_rel 0.05 and 0.10) and saves
their averages every so many steps. The averages are linear in the profiles, so the average of any other
profile p_r is approximated by sum_i x_i theta_hat_i, where x minimises the L2 distance between sum_i x_i p_i
and p_r: the normal equations A x = b with A_ij = <p_i, p_j> and b_i = <p_i, p_r>, solved by least squares.
For two power profiles the inner product has the closed form

    <p_{ta,ga}, p_{tb,gb}> = (ga + 1)(gb + 1) min(ta, tb)^(ga + gb + 1) / ((ga + gb + 1) ta^(ga+1) tb^(gb+1)).

Everything numerical is float64. Snapshots are ``.safetensors`` files of all tracked averages at one step.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.weights import SafetensorsFile, read_safetensors_header, save_weights
from diffusekit.limits import check_float, check_int
from diffusekit.training.ema import ema_update, make_ema

# sigma_rel(gamma) rises from 0 at gamma = -1 to its maximum 0.300 at gamma = (sqrt(5) - 3) / 2 and falls towards 0
# as gamma grows; gamma >= 0 (sigma_rel <= 1 / sqrt(12) = 0.2887) keeps the profile non-increasing towards tau = 0
SIGMA_REL_MAX = 0.28
SIGMA_REL_MIN = 1e-4  # gamma ~ 1e4
EMA_KINDS = ("classic", "power")  # ema.kind: training.ema's decay rule, or this module's profiles
SNAPSHOT_DIR = "ema_snapshots"
SNAPSHOT_FORMAT = "diffusekit-power-ema-snapshot"
TRACKED_PREFIX = "power_ema/"  # checkpoint EMA keys of the averages after the first ("/" is in no module name)
_SNAPSHOT_NAME = re.compile(r"^step-(\d{8,})\.safetensors$")


# ------------------------------------------------------------------------------------------------- the math
def sigma_rel_of_gamma(gamma: float) -> float:
    """sigma_rel = (gamma + 1)^(1/2) (gamma + 2)^(-1) (gamma + 3)^(-1/2) (EDM2, sec. 3.1)."""
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma >= 0 whose profile has relative width ``sigma_rel`` (in [1e-4, 0.28]).

    Squaring the relation of sec. 3.1: (gamma + 2)^2 (gamma + 3) = sigma_rel^-2 (gamma + 1), i.e. the cubic
    gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 with s = sigma_rel^-2; its largest real root is the
    gamma on the decreasing branch of sigma_rel(gamma)."""
    sigma_rel = check_float("sigma_rel", sigma_rel, SIGMA_REL_MIN, SIGMA_REL_MAX)
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    gamma = float(max(r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r.real))))
    # one Newton step on the unsquared relation removes the root finder's rounding
    h = 1e-6 * max(1.0, gamma)
    slope = (sigma_rel_of_gamma(gamma + h) - sigma_rel_of_gamma(gamma - h)) / (2 * h)
    return gamma - (sigma_rel_of_gamma(gamma) - sigma_rel) / slope


def power_beta(step: int, gamma: float) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1) for optimizer step t >= 1 (EDM2, sec. 3.1); 0 at t = 1."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner_products(
    t_a: Sequence[float], gamma_a: Sequence[float], t_b: Sequence[float], gamma_b: Sequence[float]
) -> np.ndarray:
    """The matrix <p_{t_a[i], gamma_a[i]}, p_{t_b[j], gamma_b[j]}> of the closed form in the module docstring,
    computed in log space (t^(gamma + 1) overflows float64 for long runs and sharp profiles)."""
    ta, ga = np.asarray(t_a, np.float64)[:, None], np.asarray(gamma_a, np.float64)[:, None]
    tb, gb = np.asarray(t_b, np.float64)[None, :], np.asarray(gamma_b, np.float64)[None, :]
    g = ga + gb + 1
    log = np.log((ga + 1) * (gb + 1) / g) + g * np.log(np.minimum(ta, tb))
    return np.exp(log - (ga + 1) * np.log(ta) - (gb + 1) * np.log(tb))


def reconstruction_weights(
    steps: Sequence[int], gammas: Sequence[float], target_step: int, target_gamma: float
) -> tuple[np.ndarray, float]:
    """(x, relative error): the least-squares coefficients of the snapshot profiles (``steps[i]``, ``gammas[i]``)
    whose combination is closest to the profile (``target_step``, ``target_gamma``) (EDM2, appendix C.2), and
    ||sum_i x_i p_i - p_r|| / ||p_r||, how far that combination is from the target profile."""
    if not steps:
        raise ConfigError("post-hoc EMA reconstruction needs at least one snapshot")
    a = profile_inner_products(steps, gammas, steps, gammas)
    b = profile_inner_products(steps, gammas, [target_step], [target_gamma])[:, 0]
    c = float(profile_inner_products([target_step], [target_gamma], [target_step], [target_gamma])[0, 0])
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    residual = max(0.0, float(x @ a @ x - 2 * x @ b + c))
    return x, math.sqrt(residual / c)


# -------------------------------------------------------------------------------------------- tracking
class PowerEMA:
    """Power-function averages of one model at several ``sigma_rels``, updated after every optimizer step.

    ``averages[k]`` is a frozen copy of the model holding the average of profile ``sigma_rels[k]``;
    ``update(model, step)`` takes the 1-based optimizer step that has just been made."""

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float]) -> None:
        self.sigma_rels = check_sigma_rels("ema.sigma_rels", sigma_rels)
        self.gammas = [gamma_of_sigma_rel(s) for s in self.sigma_rels]
        self.averages = [make_ema(model) for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """theta_hat_k = lerp(theta_hat_k, theta, 1 - beta_t(gamma_k)) for every tracked profile k."""
        check_int("step", step, 1, 2**62)
        for gamma, average in zip(self.gammas, self.averages):
            ema_update(average, model, power_beta(step, gamma))

    def state_dict(self) -> dict[str, Tensor]:
        """All tracked averages in one flat dict, keys ``"<k>/<parameter name>"``."""
        return {f"{k}/{name}": v for k, avg in enumerate(self.averages) for name, v in avg.state_dict().items()}

    def load_state_dict(self, tensors: dict[str, Tensor]) -> None:
        for k, average in enumerate(self.averages):
            prefix = f"{k}/"
            average.load_state_dict({n[len(prefix) :]: v for n, v in tensors.items() if n.startswith(prefix)})

    def checkpoint_dict(self) -> dict[str, Tensor]:
        """What a training checkpoint's EMA file holds: the first tracked average under the model's own names (so
        every reader of an EMA state dict gets a usable model) and the others under ``"power_ema/<k>/<name>"``."""
        out = dict(self.averages[0].state_dict())
        for k, average in enumerate(self.averages[1:], start=1):
            out.update({f"{TRACKED_PREFIX}{k}/{name}": v for name, v in average.state_dict().items()})
        return out

    def load_checkpoint_dict(self, tensors: dict[str, Tensor]) -> None:
        """Put ``checkpoint_dict()``'s tensors back (RuntimeError when they do not fit)."""
        self.averages[0].load_state_dict(first_average(tensors))
        for k, average in enumerate(self.averages[1:], start=1):
            prefix = f"{TRACKED_PREFIX}{k}/"
            average.load_state_dict({n[len(prefix) :]: v for n, v in tensors.items() if n.startswith(prefix)})

    def save_snapshot(self, folder: str | os.PathLike, step: int, config: dict | None = None) -> Path:
        """Write every tracked average at ``step`` to ``folder/step-XXXXXXXX.safetensors`` (atomically), with the
        run's ``config`` (JSON-ready: what rebuilds the network) in the file's metadata."""
        path = Path(folder) / f"step-{step:08d}.safetensors"
        meta = {"format": SNAPSHOT_FORMAT, "step": str(step), "sigma_rels": json.dumps(self.sigma_rels)}
        if config is not None:
            meta["config"] = json.dumps(config, sort_keys=True)
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in self.state_dict().items()}
        save_weights(tensors, path, metadata=meta)
        return path


def first_average(ema: dict[str, Tensor]) -> dict[str, Tensor]:
    """The EMA state dict of a checkpoint without the further tracked averages of a power-function EMA (the
    first average, or a classic EMA's dict as it is)."""
    return {name: v for name, v in ema.items() if not name.startswith(TRACKED_PREFIX)}


def check_sigma_rels(name: str, sigma_rels: Iterable[float]) -> list[float]:
    """A non-empty list of distinct sigma_rel values, each in [1e-4, 0.28]; else a ConfigError naming ``name``."""
    if isinstance(sigma_rels, str | bytes) or not isinstance(sigma_rels, Iterable):
        raise ConfigError(f"{name} must be a list of numbers in [{SIGMA_REL_MIN}, {SIGMA_REL_MAX}], got {sigma_rels!r}")
    values = [check_float(f"{name}[{i}]", s, SIGMA_REL_MIN, SIGMA_REL_MAX) for i, s in enumerate(sigma_rels)]
    if not 1 <= len(values) <= 8 or len(set(values)) != len(values):
        raise ConfigError(f"{name} must hold 1 to 8 distinct values, got {values}")
    return values


# -------------------------------------------------------------------------------------------- snapshots
@dataclass(frozen=True)
class Snapshot:
    """One snapshot file: the step it was written at and the sigma_rel of each average it holds."""

    path: Path
    step: int
    sigma_rels: tuple[float, ...]


def list_snapshots(folder: str | os.PathLike) -> list[Snapshot]:
    """The snapshots in ``folder`` (a run's ``ema_snapshots/``), oldest first; WeightsError for a file that
    is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"no power-EMA snapshots: {folder} is not a folder (train with ema.kind = 'power')")
    found = []
    for path in sorted(folder.iterdir()):
        if not _SNAPSHOT_NAME.match(path.name):
            continue
        meta = read_safetensors_header(path)[0].get("__metadata__") or {}
        try:
            if meta.get("format") != SNAPSHOT_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            sigma_rels = tuple(check_sigma_rels("sigma_rels", json.loads(meta["sigma_rels"])))
            found.append(Snapshot(path, check_int("step", int(meta["step"]), 1, 2**62), sigma_rels))
        except (KeyError, ValueError) as e:
            raise WeightsError(f"{path}: not a power-EMA snapshot ({e})") from None
    return sorted(found, key=lambda s: s.step)


def snapshot_config(snapshot: Snapshot) -> dict:
    """The run config a snapshot was written with (``PowerEMA.save_snapshot(config=...)``); WeightsError if none."""
    meta = read_safetensors_header(snapshot.path)[0].get("__metadata__") or {}
    try:
        config = json.loads(meta["config"])
    except (KeyError, ValueError, RecursionError):
        raise WeightsError(f"{snapshot.path}: the snapshot records no run config") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{snapshot.path}: the snapshot's run config is not a JSON object")
    return config


def reconstruct(
    snapshots: Sequence[Snapshot], sigma_rel: float, step: int | None = None
) -> tuple[dict[str, Tensor], float]:
    """(state dict, relative profile error): the post-hoc average at ``sigma_rel`` as of ``step`` (default: the
    newest snapshot's) from the snapshots up to that step (EDM2, appendix C.2). Sums in float64, one snapshot
    file open at a time; returns float32 tensors."""
    gamma = gamma_of_sigma_rel(sigma_rel)
    if step is None and snapshots:
        step = max(s.step for s in snapshots)
    used = [s for s in snapshots if step is not None and s.step <= step]
    if not used:
        raise ConfigError(f"no power-EMA snapshot at or before step {step}")
    columns = [(s, k) for s in used for k in range(len(s.sigma_rels))]
    gammas = [gamma_of_sigma_rel(s.sigma_rels[k]) for s, k in columns]
    x, error = reconstruction_weights([s.step for s, _ in columns], gammas, step, gamma)
    total: dict[str, Tensor] = {}
    i = 0
    for snap in used:
        with SafetensorsFile(snap.path) as f:
            keys = list(f.keys())
            for k in range(len(snap.sigma_rels)):
                prefix = f"{k}/"
                names = {key[len(prefix) :]: key for key in keys if key.startswith(prefix)}
                if total and names.keys() != total.keys():
                    raise WeightsError(f"{snap.path}: average {k} holds other tensors than the first snapshot's")
                for name, key in names.items():
                    value = f.read(key)
                    if not value.is_floating_point():  # a counter, not a weight: the newest snapshot's
                        total[name] = value
                        continue
                    term = value.double() * float(x[i])
                    total[name] = total[name] + term if name in total else term
                i += 1
    return {name: v.float() if v.is_floating_point() else v for name, v in total.items()}, error
