"""What the training commands (``train``, ``train-vae``, ``train-lora``) share: each maps its options to config
fields with a table ``option dest -> (section, field)`` and hands that table to the functions below, which show
the config's defaults in ``--help``, turn the options given into config changes, rebuild a checkpoint's config
for ``--resume``, refuse a run folder that already holds a run, and say ``--steps`` (not ``run.max_steps``) in
the library's messages."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from diffusekit.errors import CheckpointError, ConfigError, DiffusekitError
from diffusekit.limits import check_int

Fields = dict[str, tuple[str, str]]  # option dest -> (config section, field)
C = TypeVar("C")


def option_names(fields: Fields, renamed: dict[str, str] | None = None) -> dict[str, str]:
    """Config names in library messages (``run.max_steps``) -> what a user of the command types (``--steps``);
    ``renamed`` gives the spelling of positional arguments and other exceptions (``{"data.source": "DATA"}``)."""
    names = {f"{section}.{name}": "--" + option.replace("_", "-") for option, (section, name) in fields.items()}
    names.update(renamed or {})
    return names


def run_naming_options(run: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                       names: dict[str, str]) -> int:  # fmt: skip
    """``run(args)``, with the config names in a DiffusekitError's message replaced by the command's options."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    try:
        return run(args)
    except DiffusekitError as e:
        raise type(e)(pattern.sub(lambda m: names[m.group(1)], str(e))) from None


def show_defaults(parser: argparse.ArgumentParser, defaults: dict[str, dict[str, Any]], fields: Fields) -> None:
    """Append each config option's default (``defaults``: the config class's ``to_dict()``, the one source of
    defaults) to its help, unless the help already says what the default is."""
    for action in parser._actions:
        if action.dest not in fields or not action.option_strings:  # a positional DATA has no default
            continue
        section, name = fields[action.dest]
        value = defaults[section][name]
        if "default" in (action.help or ""):  # "(default: the data's)": the help's own words
            continue
        shown = "none" if value is None else ("on" if value else "off") if isinstance(value, bool) else value
        action.help = f"{action.help or ''} (default: {shown})".strip()


def changes_from_args(args: argparse.Namespace, fields: Fields,
                      sections: set[str] | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The config fields the command line sets (only those of ``sections`` when given), as ``replace()`` takes
    them: ``{"run": {"max_steps": 10}}``; ``--no-progress`` and ``--no-tensorboard`` turn those run fields off."""
    changes: dict[str, dict[str, Any]] = {}
    for option, (section, name) in fields.items():
        value = getattr(args, option, None)
        if value is not None and (sections is None or section in sections):
            changes.setdefault(section, {})[name] = value
    if sections is None or "run" in sections:
        if args.no_progress:
            changes.setdefault("run", {})["progress"] = False
        if args.no_tensorboard:
            changes.setdefault("run", {})["tensorboard"] = False
    return changes


def ignored_on_resume(args: argparse.Namespace, fields: Fields, names: dict[str, str]) -> list[str]:
    """The options given that a resumed run ignores (all but the run section's, which may change), and --config."""
    ignored = [names[f"{section}.{name}"] for option, (section, name) in fields.items()
               if section != "run" and getattr(args, option, None) is not None]  # fmt: skip
    if getattr(args, "config", None):
        ignored.append("--config")
    if ignored:
        print(f"note: resuming uses the checkpoint's config; ignoring {', '.join(ignored)}", file=sys.stderr)
    return ignored


def resume_config(args: argparse.Namespace, config: Any, fields: Fields, names: dict[str, str],
                  from_saved: Callable[[dict[str, Any]], C]) -> tuple[C, Path | None]:  # fmt: skip
    """For --resume: the checkpoint (None if "latest" finds none in ``config.run.output_dir``: ``config`` is
    then returned as it is) and its saved config, rebuilt by ``from_saved``, with only the run options given on
    the command line changed. A checkpoint named explicitly continues in its own run folder unless --output-dir
    says otherwise."""
    from diffusekit.io.weights import read_json
    from diffusekit.training.checkpoint import latest_checkpoint, resolve_checkpoint
    from diffusekit.training.resume import CHECKPOINTS_DIR

    if args.resume == "latest":
        path = latest_checkpoint(Path(config.run.output_dir) / CHECKPOINTS_DIR)
        if path is None:
            print(f"note: no checkpoint in {config.run.output_dir}; starting a new run", file=sys.stderr)
            return config, None
    else:
        path = resolve_checkpoint(args.resume)
    ignored_on_resume(args, fields, names)
    saved = read_json(path / "config.json").get("train")
    if not isinstance(saved, dict) or not isinstance(saved.get("run", {}), dict):
        raise CheckpointError(f"{path}: config.json: train must be a JSON object with a run section")
    run_changes = changes_from_args(args, fields, {"run"}).get("run", {})
    if args.resume != "latest" and args.output_dir is None:
        run_changes["output_dir"] = str(path.parent.parent)
    try:  # the options given replace saved run settings before they are checked (an old run's max_minutes=0)
        return from_saved({**saved, "run": {**saved.get("run", {}), **run_changes}}), path
    except ConfigError as e:
        raise ConfigError(f"{path}: the checkpoint's settings with the options given: {e}") from None


def prepare_run(args: argparse.Namespace, run_dir: str | Path, option: str) -> None:
    """Apply --cpu-threads, and refuse a run folder (named by ``option``) that already holds checkpoints unless
    --resume continues them."""
    from diffusekit.training.checkpoint import list_checkpoints
    from diffusekit.training.resume import CHECKPOINTS_DIR

    if args.cpu_threads is not None:
        torch.set_num_threads(check_int("--cpu-threads", args.cpu_threads, 1, 4096))
    run_dir = Path(run_dir)
    if args.resume is None and list_checkpoints(run_dir / CHECKPOINTS_DIR):
        raise ConfigError(f"{option} {run_dir} already holds checkpoints of a run; pass --resume to continue it, "
                          f"or choose another {option}")  # fmt: skip


def summary_line(result: Any) -> str:
    """The first line a training command prints at the end: the step reached, why it stopped, the last loss."""
    loss = "(no metrics record in this run)" if result.loss is None else round(result.loss, 5)
    return (f"trained to step {result.step} ({result.stopped_by}; {result.steps_per_second:.2f} steps/s); "
            f"last loss {loss}")  # fmt: skip


def metrics_line(result: Any) -> str:
    """Where the run's metrics and loss curve are."""
    return f"  metrics:    {result.run_dir / 'metrics.jsonl'}, loss curve {result.run_dir / 'loss_curve.png'}"


def interrupted_note(result: Any, world_size: int, command: str) -> str:
    """What an interrupted run prints: the command that resumes it from its checkpoint."""
    launcher = f"torchrun --nproc_per_node {world_size} -m diffusekit" if world_size > 1 else "diffusekit"
    return (f"interrupted at step {result.step}; the checkpoint is saved. Resume with:\n"
            f"  {launcher} {command} --resume {shlex.quote(str(result.checkpoint))}")  # fmt: skip


__all__ = ["Fields", "changes_from_args", "ignored_on_resume", "interrupted_note", "metrics_line", "option_names",
           "prepare_run", "resume_config", "run_naming_options", "show_defaults", "summary_line"]  # fmt: skip
