"""Comparison results of the parity runner."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Comparison:
    """Worst error over all the tensors of one case, against its tolerance."""

    rtol: float
    atol: float
    max_abs: float = 0.0
    max_rel: float = 0.0
    failures: list[str] = field(default_factory=list)
    compared: int = 0

    def check(self, name: str, ours: Tensor, ref: Tensor, exact: bool = False) -> None:
        """Compare one tensor; record the error and any failure."""
        self.compared += 1
        ours = ours.detach().cpu()
        ref = ref.detach().cpu()
        if ours.shape != ref.shape:
            self.failures.append(f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}")
            return
        if exact:
            if not torch.equal(ours.long(), ref.long()):
                self.failures.append(f"{name}: {int((ours.long() != ref.long()).sum())} values differ")
            return
        diff = (ours.double() - ref.double()).abs()
        if not torch.isfinite(diff).all():
            self.failures.append(f"{name}: non-finite values")
            return
        if diff.numel() == 0:
            return
        rel = diff / ref.double().abs().clamp_min(1e-12)
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.max_rel = max(self.max_rel, float(rel.max()))
        bound = self.atol + self.rtol * ref.double().abs()
        if (diff > bound).any():
            worst = float(diff.max())
            self.failures.append(f"{name}: max abs error {worst:.3g} exceeds atol={self.atol} rtol={self.rtol}")

    @property
    def passed(self) -> bool:
        return self.compared > 0 and not self.failures


class Skip(Exception):
    """Raised by a case handler for a kind diffusekit does not implement yet."""
