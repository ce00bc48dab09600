"""Parity cases for whole pipelines."""

from __future__ import annotations

from pathlib import Path

from diffusekit.parity.report import Comparison, Skip


def unconditional_case(case: Path, meta: dict) -> Comparison:
    raise Skip("not implemented")


def text2img_case(case: Path, meta: dict) -> Comparison:
    raise Skip("not implemented")


def img2img_case(case: Path, meta: dict) -> Comparison:
    raise Skip("not implemented")


def inpaint_case(case: Path, meta: dict) -> Comparison:
    raise Skip("not implemented")
