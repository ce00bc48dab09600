"""Parity cases for single networks and tokenizers."""

from __future__ import annotations

from pathlib import Path

from diffusekit.parity.report import Comparison, Skip


def model_case(case: Path, meta: dict) -> Comparison:
    raise Skip("not implemented")


def tokenizer_case(case: Path, meta: dict) -> Comparison:
    raise Skip("not implemented")


def tokenizer_expected_ids_case(case: Path, meta: dict) -> Comparison:
    raise Skip("not implemented")
