"""An inference folder from a run's power-EMA snapshots: the post-hoc average at any sigma_rel (EDM2, appendix C.2)
in the layout of the run's own export (``training.export.export_inference``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.networks.unet import UNet, UNetConfig
from diffusekit.training.config import TrainConfig
from diffusekit.training.export import export_inference
from diffusekit.training.power_ema import Snapshot, reconstruct, snapshot_config


@dataclass(frozen=True)
class Reconstruction:
    """Where the folder went, the step it is the average of, how many snapshot averages were combined and the
    relative L2 distance between the combined profile and the one asked for."""

    folder: Path
    step: int
    used: int
    error: float


def export_reconstruction(
    snapshots: list[Snapshot], sigma_rel: float, out: Path, *, step: int | None = None
) -> Reconstruction:
    """Reconstruct the EMA at ``sigma_rel`` as of ``step`` (default: the newest snapshot's) and write it as an
    inference folder at ``out`` (atomically replaced), with the scheduler of the run the snapshots came from."""
    target = max(s.step for s in snapshots) if step is None else step
    used = [s for s in snapshots if s.step <= target]
    if not used:
        raise ConfigError(f"no power-EMA snapshot at or before step {target}")
    config = snapshot_config(used[-1])
    if not isinstance(config.get("unet"), dict) or not isinstance(config.get("train"), dict):
        raise ConfigError(f"{used[-1].path}: not a diffusion model's run (ema-reconstruct writes U-Net models)")
    if "latent" in config["train"]:
        raise ConfigError(f"{used[-1].path}: a latent diffusion run; ema-reconstruct writes pixel-space models only")
    try:
        train = TrainConfig.from_dict(config["train"])
        net = UNet(UNetConfig.from_dict(config["unet"]))
    except ConfigError as e:
        raise WeightsError(f"{used[-1].path}: the snapshot's run config: {e}") from None
    state, error = reconstruct(used, sigma_rel, target)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise WeightsError(
            f"{used[-1].path}: the averages do not fit the run's U-Net ({str(e).splitlines()[0]})"
        ) from None
    folder = export_inference(net, train.diffusion, out, task=train.task)
    return Reconstruction(folder, target, sum(len(s.sigma_rels) for s in used), error)
