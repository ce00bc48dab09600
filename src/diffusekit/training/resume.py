"""What a training checkpoint holds of a trainer, finding the one to resume from, and putting it back."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffusekit import __version__
from diffusekit.errors import CheckpointError
from diffusekit.training.checkpoint import (
    TrainingState,
    latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng,
)
from diffusekit.training.randomness import seed_everything

if TYPE_CHECKING:
    from diffusekit.training.loop import TrainingLoop as Trainer

CHECKPOINTS_DIR = "checkpoints"


def find_resume_state(resume: str | os.PathLike, output_dir: str | os.PathLike) -> TrainingState | None:
    """The checkpoint ``resume`` names: a checkpoint folder, a run folder, or "latest" (the newest intact
    checkpoint under ``output_dir``; None when there is none, so the run starts fresh)."""
    if str(resume) == "latest":
        path = latest_checkpoint(Path(output_dir) / CHECKPOINTS_DIR)
        if path is None:
            return None  # nothing to resume: start fresh
    else:
        path = resolve_checkpoint(resume)
    return load_checkpoint(path)


def restore_state(trainer: Trainer, state: TrainingState) -> None:
    """Put ``state`` back into ``trainer``: weights, EMA, optimizer, position in the data stream, loss window,
    RNG states. CheckpointError naming the checkpoint when it does not fit the trainer's model."""
    try:
        trainer.load_weights(state.model, state.ema)
        trainer.optimizer.load_state_dict(state.optimizer)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{state.path}: does not match the model/optimizer of its config ({e})") from None
    s = state.state
    try:
        trainer.step = int(state.step)
        trainer.data_position = int(s["data_position"])
        trainer.train_seconds_total = float(s.get("train_seconds", 0.0))
        trainer.log_window = [float(x) for x in s.get("log_window", [])]
        if trainer.scaler is not None and s.get("grad_scaler"):
            trainer.scaler.load_state_dict(s["grad_scaler"])
        restore_rng(state.rng_tensors, state.rng_scalars)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{state.path}: state.json / rng.safetensors are damaged ({e!r:.200})") from None
    if s.get("dataset_size") != len(trainer.dataset):
        print(
            f"warning: the dataset has {len(trainer.dataset)} examples, the checkpoint was trained on "
            f"{s.get('dataset_size')}; the data order will differ from an uninterrupted run",
            file=sys.stderr,
        )
    if trainer.env.rank != 0:  # ranks > 0 must not share rank 0's dropout stream
        seed_everything(trainer.config.run.seed + trainer.step, trainer.env.rank)
    trainer.resumed_from = state.path


def checkpoint_payload(trainer: Trainer) -> dict[str, Any]:
    """What a checkpoint of ``trainer`` holds: weights, EMA, optimizer, the loop state and the full config."""
    model, ema = trainer.weights()
    return dict(
        model=model,
        ema=ema,
        optimizer=trainer.optimizer.state_dict(),
        state={
            "data_position": trainer.data_position,
            "dataset_size": len(trainer.dataset),
            "world_size": trainer.env.world_size,
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "train_seconds": trainer.train_seconds_total,
            "log_window": list(trainer.log_window),  # so a resumed run logs the same averages
            "grad_scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
            "diffusekit_version": __version__,
        },
        config=trainer.checkpoint_config(),
    )
