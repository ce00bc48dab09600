"""What the training commands (``train``, ``train-vae``, ``train-lora``) share: each maps its options to config
fields with a table ``option dest -> (section, field)`` and hands that table to the functions below, which show
the config's defaults in ``--help``, turn the options given into config changes, rebuild a checkpoint's config
for ``--resume``, refuse a run folder that already holds a run, and say ``--steps`` (not ``run.max_steps``) in
the library's messages. The allowed values of the options that several commands have (``demo`` too) are ruled
here once (``OPTION_RULES``): checked before anything else, and shown in each command's ``--help``."""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from diffusekit.errors import CheckpointError, ConfigError, DiffusekitError
from diffusekit.limits import check_float, check_int
from diffusekit.training.config import MAX_BATCH, MAX_LIMIT, MAX_SEED, MAX_STEPS

Fields = dict[str, tuple[str, str]]  # option dest -> (config section, field)
C = TypeVar("C")

#: The options of every training command for the optimiser, the EMA and the training loop.
OPTIM_FIELDS: Fields = {
    "batch_size": ("optim", "batch_size"), "grad_accum_steps": ("optim", "grad_accum_steps"), "lr": ("optim", "lr"),
    "warmup_steps": ("optim", "warmup_steps"), "lr_schedule": ("optim", "lr_schedule"), "ema_decay": ("ema", "decay"),
}  # fmt: skip
RUN_FIELDS: Fields = {
    "steps": ("run", "max_steps"), "mixed_precision": ("run", "mixed_precision"), "seed": ("run", "seed"),
    "device": ("run", "device"), "checkpoint_every_steps": ("run", "checkpoint_every"),
    "keep_checkpoints": ("run", "keep_checkpoints"), "log_every_steps": ("run", "log_every"),
    "sample_every_steps": ("run", "sample_every"),
}  # fmt: skip
#: The [data] options of the commands that read any image source (train, train-vae).
DATA_FIELDS: Fields = {
    "data": ("data", "source"), "data_root": ("data", "data_root"), "resolution_px": ("data", "resolution"),
    "channels": ("data", "channels"), "limit": ("data", "limit"), "random_flip": ("data", "random_flip"),
    "num_workers": ("data", "num_workers"), "skip_bad_images": ("data", "skip_bad_images"),
}  # fmt: skip


@dataclass(frozen=True)
class OptionRule:
    """The values an option allows: an integer (``integer``) or a finite number from ``low`` to ``high``
    (``low`` excluded when ``open_low``); ``high`` None means per CPU core: 1 to 4 x the machine's cores.
    ``zero_is_off``: 0 is allowed as well and turns the setting off (the config field becomes None)."""

    integer: bool
    low: float
    high: float | None
    open_low: bool = False
    zero_is_off: bool = False

    def upper(self) -> float:
        return max(1, 4 * (os.cpu_count() or 1)) if self.high is None else self.high

    def check(self, option: str, value: Any) -> Any:
        """``value`` if this rule allows it, else a ConfigError naming ``option`` with the allowed values."""
        if self.zero_is_off and value == 0 and not isinstance(value, bool):
            return value
        if self.integer:
            return check_int(option, value, int(self.low), int(self.upper()))
        return check_float(option, value, self.low, self.upper(), open_low=self.open_low)

    def describe(self) -> str:
        """The allowed values, as ``--help`` shows them."""
        if self.high is None:
            return f"1 to 4 per CPU core (here 1 to {self.upper()})"
        low, high = (str(int(v)) if self.integer else f"{v:g}" for v in (self.low, self.high))
        if math.isinf(self.high):
            text = f"any finite number {'above' if self.open_low else 'from'} {low}"
        else:
            text = f"above {low}, at most {high}" if self.open_low else f"{low} to {high}"
        return f"0 = off, else {text}" if self.zero_is_off else text


_LR = OptionRule(integer=False, low=0.0, high=10.0, open_low=True)  # 0 would train nothing
_STEPS = OptionRule(integer=True, low=1, high=MAX_STEPS)
_MINUTES = OptionRule(integer=False, low=0.0, high=math.inf, open_low=True)  # 0 would train nothing
_BATCH = OptionRule(integer=True, low=1, high=MAX_BATCH)
#: One rule per option dest, for every command that has the option (train, train-vae, train-lora, demo; the
#: latent demo's autoencoder options follow the rule of the option they mirror).
OPTION_RULES: dict[str, OptionRule] = {
    "steps": _STEPS, "vae_steps": _STEPS,
    "max_minutes": _MINUTES, "vae_max_minutes": _MINUTES,
    "batch_size": _BATCH, "vae_batch_size": _BATCH,
    "lr": _LR, "vae_lr": _LR,
    "min_snr_gamma": OptionRule(integer=False, low=1e-6, high=1e6, zero_is_off=True),  # Hang et al. 2023
    "seed": OptionRule(integer=True, low=0, high=MAX_SEED),
    "limit": OptionRule(integer=True, low=1, high=MAX_LIMIT),
    "cpu_threads": OptionRule(integer=True, low=1, high=None),  # far more threads than cores: torch crashed
}  # fmt: skip


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_options(args: argparse.Namespace, dests: Iterable[str] | None = None) -> None:
    """Check every option of ``OPTION_RULES`` that ``args`` has and that was given (or only those of
    ``dests``), before anything is read, written or trained; ConfigError naming the option otherwise."""
    for dest in OPTION_RULES if dests is None else dests:
        value = getattr(args, dest, None)
        if value is not None:
            OPTION_RULES[dest].check(_option(dest), value)


def show_option_rules(parser: argparse.ArgumentParser) -> None:
    """Append each ruled option's allowed values to its ``--help`` (call before :func:`show_defaults`)."""
    for action in parser._actions:
        if action.dest in OPTION_RULES and action.option_strings and action.help != argparse.SUPPRESS:
            action.help = f"{action.help or ''}; {OPTION_RULES[action.dest].describe()}".lstrip("; ")


def set_cpu_threads(args: argparse.Namespace) -> None:
    """Apply --cpu-threads (checked by its rule) when it is given."""
    if getattr(args, "cpu_threads", None) is not None:
        torch.set_num_threads(OPTION_RULES["cpu_threads"].check("--cpu-threads", args.cpu_threads))


def add_data_options(group: argparse._ArgumentGroup, *, resolution_help: str) -> None:
    """The options of ``DATA_FIELDS`` but the source itself (``train --data``, ``train-vae DATA``)."""
    group.add_argument("--data-root", metavar="DIR", help="folder holding mnist/ and fashion-mnist/ IDX folders")
    group.add_argument("--resolution-px", type=int, metavar="PX", help=resolution_help)
    group.add_argument("--channels", type=int, choices=(1, 3), help="1 = grayscale, 3 = RGB (default: the data's)")
    group.add_argument("--limit", type=int, metavar="N", help="use only the first N examples")
    group.add_argument("--random-flip", action=argparse.BooleanOptionalAction, default=None,
                       help="random horizontal flips (default: on for image folders, off for digits)")  # fmt: skip
    group.add_argument("--num-workers", type=int, metavar="N",
                       help="DataLoader processes for image folders (default: min(4, CPUs))")  # fmt: skip
    group.add_argument("--skip-bad-images", action="store_true", default=None,
                       help="train without the files of an image folder that cannot be read (they are listed); "
                            "without this option such a folder is refused")  # fmt: skip


def add_interval_options(group: argparse._ArgumentGroup, *, sample_help: str) -> None:
    """The loop's intervals of ``RUN_FIELDS``: checkpoints, metrics and previews (``sample_help``)."""
    group.add_argument("--checkpoint-every-steps", type=int, metavar="N", help="checkpoint interval")
    group.add_argument("--keep-checkpoints", type=int, metavar="N", help="newest checkpoints kept")
    group.add_argument("--log-every-steps", type=int, metavar="N", help="metrics interval")
    group.add_argument("--sample-every-steps", type=int, metavar="N", help=sample_help)


def add_display_switches(group: argparse._ArgumentGroup) -> None:
    """--no-progress and --no-tensorboard, which ``changes_from_args`` reads."""
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    group.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")


def add_former_spellings(parser: argparse.ArgumentParser, former: dict[str, str]) -> None:
    """Keep former spellings of options parsing (scripts written for them keep running) without showing them in
    ``--help``: each ``old -> new`` adds ``old`` as a hidden option with ``new``'s destination, type, choices and
    metavar; it sets nothing when not given, so ``new``'s default stands."""
    by_name = {name: action for action in parser._actions for name in action.option_strings}
    for old, new in former.items():
        action = by_name[new]
        if not isinstance(action, argparse._StoreAction):
            raise TypeError(f"{new}: only options that take a value have former spellings here")
        parser.add_argument(old, dest=action.dest, type=action.type, choices=action.choices, nargs=action.nargs,
                            metavar=action.metavar, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # fmt: skip


def option_names(fields: Fields, renamed: dict[str, str] | None = None) -> dict[str, str]:
    """Config names in library messages (``run.max_steps``) -> what a user of the command types (``--steps``);
    ``renamed`` gives the spelling of positional arguments and other exceptions (``{"data.source": "DATA"}``)."""
    names = {f"{section}.{name}": "--" + option.replace("_", "-") for option, (section, name) in fields.items()}
    names.update(renamed or {})
    return names


def run_naming_options(run: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                       names: dict[str, str], paths: dict[str, str] | None = None) -> int:  # fmt: skip
    """``run(args)``, with the config names in a DiffusekitError's message replaced by the command's options,
    and the option named whose path the message is about (``paths``: option -> the args attribute holding it)."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    try:
        return run(args)
    except DiffusekitError as e:
        message = pattern.sub(lambda m: names[m.group(1)], str(e))
        given = {option: getattr(args, attr, None) for option, attr in (paths or {}).items()}
        if given.get("--resume") == "latest":  # --resume without a value: no path of the user's
            del given["--resume"]
        raise type(e)(name_path_option(message, given)) from None


def name_path_option(message: str, given: dict[str, Any]) -> str:
    """``message`` about a path the user gave (``given``: option -> value), with that option named in front:
    ``/data/x: no images found`` -> ``--data /data/x: no images found``. The longest path that occurs wins;
    between paths of one length, the first option of ``given``; a message that already names one of the options
    is returned as it is."""
    paths = {option: str(value) for option, value in given.items() if isinstance(value, str) and value}
    if any(re.search(r"(?<![\w-])" + re.escape(option) + r"(?![\w-])", message) for option in paths):
        return message
    for option, value in sorted(paths.items(), key=lambda item: -len(item[1])):
        for form in dict.fromkeys((value, str(Path(value).absolute()))):
            if message.startswith(form):
                return f"{option} {message}"
            if form in message:
                return f"{option} {value}: {message}"
    return message


def show_defaults(parser: argparse.ArgumentParser, defaults: dict[str, dict[str, Any]], fields: Fields) -> None:
    """Append each config option's default (``defaults``: the config class's ``to_dict()``, the one source of
    defaults) to its help, unless the help already says what the default is."""
    for action in parser._actions:
        if action.dest not in fields or not action.option_strings or action.help == argparse.SUPPRESS:
            continue  # a positional DATA has no default; a former spelling is not shown
        section, name = fields[action.dest]
        value = defaults[section][name]
        if "default" in (action.help or ""):  # "(default: the data's)": the help's own words
            continue
        shown = "none" if value is None else ("on" if value else "off") if isinstance(value, bool) else value
        action.help = f"{action.help or ''} (default: {shown})".strip()


def changes_from_args(args: argparse.Namespace, fields: Fields,
                      sections: set[str] | None = None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The config fields the command line sets (only those of ``sections`` when given), as ``replace()`` takes
    them: ``{"run": {"max_steps": 10}}``; an option whose rule reads 0 as off sets its field to None;
    ``--no-progress`` and ``--no-tensorboard`` turn those run fields off."""
    changes: dict[str, dict[str, Any]] = {}
    for option, (section, name) in fields.items():
        value = getattr(args, option, None)
        if value is not None and (sections is None or section in sections):
            rule = OPTION_RULES.get(option)
            off = rule is not None and rule.zero_is_off and value == 0
            changes.setdefault(section, {})[name] = None if off else value
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
                  from_saved: Callable[[dict[str, Any]], C], command: str) -> tuple[C, Path | None]:  # fmt: skip
    """For --resume: the checkpoint (None if "latest" finds none in ``config.run.output_dir``: ``config`` is
    then returned as it is) and its saved config, rebuilt by ``from_saved``, with only the run options given on
    the command line changed; a checkpoint that another training command than ``command`` wrote is refused,
    naming the command that continues it. A checkpoint named explicitly continues in its own run folder unless
    --output-dir says otherwise."""
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
    saved = read_json(path / "config.json").get("train")
    if not isinstance(saved, dict) or not isinstance(saved.get("run", {}), dict):
        raise CheckpointError(f"{path}: config.json: train must be a JSON object with a run section")
    check_trained_by(saved, path, command)
    ignored_on_resume(args, fields, names)
    run_changes = changes_from_args(args, fields, {"run"}).get("run", {})
    if args.resume != "latest" and args.output_dir is None:
        run_changes["output_dir"] = str(path.parent.parent)
    try:  # the options given replace saved run settings before they are checked (an old run's max_minutes=0)
        return from_saved({**saved, "run": {**saved.get("run", {}), **run_changes}}), path
    except ConfigError as e:
        raise ConfigError(f"{path}: the checkpoint's settings with the options given: {e}") from None


def prepare_run(args: argparse.Namespace, run_dir: str | Path, option: str, *, data: str | None = None,
                data_option: str = "--data", export: tuple[str, frozenset[str]] | None = None,
                where: str | None = None) -> None:  # fmt: skip
    """Apply --cpu-threads, and refuse a run folder (set by ``option``) that already holds checkpoints unless
    --resume continues them; that is the image folder ``data`` (``data_option``) or inside it (the run's PNGs
    and sub-folders would become training images, and sub-folders class labels); or, when it holds no run yet,
    whose ``export`` folder (name, what the run writes there), which the run replaces whole, holds anything
    else, or whose metrics.jsonl, which a new run replaces, is not a former run's. Messages name the folder as
    ``where`` (default ``"{option} {run_dir}"``; a folder derived from another option names that one)."""
    from diffusekit.training.checkpoint import list_checkpoints
    from diffusekit.training.monitor import check_metrics_file
    from diffusekit.training.resume import CHECKPOINTS_DIR

    set_cpu_threads(args)
    run_dir = Path(run_dir)
    where = where or f"{option} {run_dir}"
    if data is not None and Path(data).is_dir():
        inside = Path(data).resolve()
        if run_dir.resolve() == inside or inside in run_dir.resolve().parents:
            raise ConfigError(f"{where} is inside the image folder {data_option} {data}: the run's images and "
                              f"folders would become training data; choose an {option} outside it")  # fmt: skip
    has_run = bool(list_checkpoints(run_dir / CHECKPOINTS_DIR))
    if args.resume is None and has_run:
        raise ConfigError(f"{where} already holds checkpoints of a run; pass --resume to continue it, or choose "
                          f"another {option}")  # fmt: skip
    if not has_run:
        check_metrics_file(run_dir, where, option)
    if export is not None and not has_run:
        name, entries = export
        check_replaced_folder(run_dir / name, entries, where, option)


def check_replaced_folder(folder: Path, entries: frozenset[str], where: str, option: str, *,
                          writer: str = "this command") -> None:  # fmt: skip
    """``folder``, which a command is about to replace whole, must be absent or hold nothing but ``entries``
    (what ``writer`` writes there) and hidden files: anything else is someone's, and a ConfigError starting
    with ``where`` says so before any work is done."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ConfigError(f"{where}: {folder} is not a folder, and it would be replaced; move it or choose "
                          f"another {option}")  # fmt: skip
    if not folder.is_dir():
        return
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in entries and not p.name.startswith("."))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"{where}: {folder} holds files {writer} does not write ({shown}), and that folder "
                          f"would be replaced whole; move them or choose another {option}")  # fmt: skip


#: Which command trained a checkpoint, by the sections of its saved config (the first match wins).
TRAINED_BY = (("lora", "train-lora"), ("vae", "train-vae"), ("model", "train"))


def check_trained_by(saved: dict[str, Any], path: Path, command: str) -> None:
    """Refuse to resume with ``command`` a checkpoint that another training command wrote, naming the one that
    continues it."""
    kind = next((cmd for section, cmd in TRAINED_BY if section in saved), None)
    if kind is not None and kind != command:
        raise CheckpointError(f"--resume {path}: a checkpoint of 'diffusekit {kind}', not of {command}; continue it "
                              f"with 'diffusekit {kind} --resume {path}'")  # fmt: skip


def summary_line(result: Any) -> str:
    """The first line a training command prints at the end: the step reached, why it stopped, the last loss."""
    loss = "(no metrics record in this run)" if result.loss is None else round(result.loss, 5)
    return (f"trained to step {result.step} ({result.stopped_by}; {result.steps_per_second:.2f} steps/s); "
            f"last loss {loss}")  # fmt: skip


def metrics_line(result: Any) -> str:
    """Where the run's metrics and loss curve are."""
    return f"  metrics:    {result.run_dir / 'metrics.jsonl'}, loss curve {result.run_dir / 'loss_curve.png'}"


def finish(env: Any, result: Any, interrupted: str) -> int:
    """After ``fit()``: end the process group; a run stopped by Ctrl-C prints ``interrupted`` (how to resume it)
    on the main process and the command's exit status is 130, else 0."""
    from diffusekit.training.distributed import shutdown

    shutdown(env)
    if result.stopped_by != "interrupted":
        return 0
    if env.is_main:
        print(interrupted, file=sys.stderr)
    return 130


def interrupted_note(result: Any, world_size: int, command: str) -> str:
    """What an interrupted run prints: the command that resumes it from its checkpoint."""
    launcher = f"torchrun --nproc_per_node {world_size} -m diffusekit" if world_size > 1 else "diffusekit"
    return (f"interrupted at step {result.step}; the checkpoint is saved. Resume with:\n"
            f"  {launcher} {command} --resume {shlex.quote(str(result.checkpoint))}")  # fmt: skip


__all__ = ["DATA_FIELDS", "OPTIM_FIELDS", "OPTION_RULES", "RUN_FIELDS", "Fields", "OptionRule", "add_data_options",
           "add_display_switches", "add_former_spellings", "add_interval_options", "changes_from_args",
           "check_options", "check_replaced_folder", "check_trained_by", "finish", "ignored_on_resume",
           "interrupted_note", "metrics_line", "name_path_option", "option_names", "prepare_run", "resume_config",
           "run_naming_options", "set_cpu_threads", "show_defaults", "show_option_rules", "summary_line"]  # fmt: skip
