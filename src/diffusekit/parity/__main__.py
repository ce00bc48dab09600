"""``python -m diffusekit.parity DIR``: recompute every reference case under DIR and compare.

Prints one line per case (max abs / rel error, PASS, FAIL or SKIP), then ``N passed, N failed``.
Exit status 1 if any case failed. Cases are found by their ``meta.json`` and dispatched on its ``kind``
(and, for models, ``model_class``); a folder with ``expected_ids.json`` is a tokenizer id case.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from diffusekit.parity.report import Comparison, Skip
from diffusekit.parity.schedulers import forward_process_case, scheduler_case

Handler = Callable[[Path, dict], Comparison]


def _handlers() -> dict[str, Handler]:
    from diffusekit.parity import models, pipelines

    return {
        "forward_process": forward_process_case,
        "scheduler_trajectory": scheduler_case,
        "model": models.model_case,
        "tokenizer": models.tokenizer_case,
        "tokenizer_expected_ids": models.tokenizer_expected_ids_case,
        "unconditional_ddpm": pipelines.unconditional_case,
        "unconditional_ddim": pipelines.unconditional_case,
        "text2img": pipelines.text2img_case,
        "img2img": pipelines.img2img_case,
        "inpaint": pipelines.inpaint_case,
        "upscale": pipelines.upscale_case,
        "lora_text2img": pipelines.text2img_case,
        "lora_fuse": pipelines.lora_fuse_case,
        "lcm_text2img": pipelines.text2img_case,
        "sdxl_text2img": pipelines.sdxl_text2img_case,
        "sdxl_img2img": pipelines.sdxl_img2img_case,
    }


def find_cases(root: Path) -> list[tuple[Path, dict]]:
    """Every case folder under ``root`` with its metadata, in path order."""
    cases = []
    for meta_path in sorted(root.rglob("meta.json")):
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            meta = {"kind": None, "unreadable": f"{type(e).__name__}: {e}"}
        if not isinstance(meta, dict):
            meta = {"kind": None, "unreadable": f"meta.json holds a {type(meta).__name__}, not an object"}
        cases.append((meta_path.parent, meta))
    for ids_path in sorted(root.rglob("expected_ids.json")):
        if not (ids_path.parent / "meta.json").exists():
            cases.append((ids_path.parent, {"kind": "tokenizer_expected_ids"}))
    return cases


def run(root: Path, verbose: bool = False) -> tuple[int, int, int]:
    handlers = _handlers()
    passed = failed = skipped = 0
    for case, meta in find_cases(root):
        name = str(case.relative_to(root)) if case != root else case.name
        kind = meta.get("kind")
        handler = handlers.get(kind)
        try:
            if "unreadable" in meta:
                raise ValueError(f"meta.json cannot be read: {meta['unreadable']}")
            if handler is None:
                raise Skip(f"unknown kind {kind!r}: no handler; known: {', '.join(sorted(handlers))}")
            cmp = handler(case, meta)
        except Skip as e:
            skipped += 1
            print(f"SKIP  {name}  ({e})")
            continue
        except Exception as e:  # a crash in a case is a failure of that case, not of the runner
            failed += 1
            print(f"FAIL  {name}  error: {type(e).__name__}: {e}")
            if verbose:
                traceback.print_exc()
            continue
        status = "PASS" if cmp.passed else "FAIL"
        passed += cmp.passed
        failed += not cmp.passed
        print(f"{status}  {name}  max_abs={cmp.max_abs:.3g} max_rel={cmp.max_rel:.3g} tensors={cmp.compared}")
        for f in cmp.failures[:5]:
            print(f"      {f}")
    return passed, failed, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusekit.parity", description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path, help="a folder of reference cases (e.g. ../shared/fixtures)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of crashed cases")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        print(f"not a directory: {args.directory}", file=sys.stderr)
        return 2
    passed, failed, skipped = run(args.directory, args.verbose)
    tail = f", {skipped} skipped" if skipped else ""
    print(f"{passed} passed, {failed} failed{tail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
