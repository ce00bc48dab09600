"""Where training's randomness comes from, so that runs resume bit for bit and N processes draw what one would.

All randomness of a micro-batch (t, eps, flips, offset noise, label dropout) is drawn for the whole global batch
from a generator seeded by (seed, micro-batch index); each rank takes its slice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def micro_batch_generator(seed: int, micro_batch: int) -> torch.Generator:
    """A CPU generator for global micro-batch ``micro_batch``, seeded from SeedSequence((seed, index))."""
    state = np.random.SeedSequence([seed, micro_batch, 0xD1FF]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


@dataclass
class BatchRandomness:
    """Everything random about one global micro-batch of B examples."""

    t: Tensor  # (B,) int64 timesteps
    noise: Tensor  # (B, C, H, W)
    flip: Tensor  # (B,) bool
    drop_label: Tensor  # (B,) bool
    offset: Tensor  # (B, C, 1, 1)
    normal: Tensor  # (B,) standard normal: EDM's noise levels ln(sigma) = P_mean + P_std z

    @classmethod
    def draw(
        cls, generator: torch.Generator, batch: int, shape: tuple[int, int, int], T: int, label_dropout: float
    ) -> BatchRandomness:
        c = shape[0]
        return cls(
            t=torch.randint(0, T, (batch,), generator=generator),  # Algorithm 1, line 3
            noise=torch.randn((batch, *shape), generator=generator),  # line 4
            flip=torch.rand(batch, generator=generator) < 0.5,
            drop_label=torch.rand(batch, generator=generator) < label_dropout,
            offset=torch.randn((batch, c, 1, 1), generator=generator),
            normal=torch.randn(batch, generator=generator),  # drawn last: the draws above stay as they were
        )

    def slice(self, start: int, stop: int) -> BatchRandomness:
        names = ("t", "noise", "flip", "drop_label", "offset", "normal")
        return BatchRandomness(*(getattr(self, f)[start:stop] for f in names))


def seed_everything(seed: int, rank: int) -> None:
    """Seed torch, numpy and random for process ``rank`` from (seed, rank): dropout and other global draws."""
    s = np.random.SeedSequence([seed, rank, 0x7A11]).generate_state(3, np.uint32)
    torch.manual_seed(int(s[0]))
    np.random.seed(int(s[1]))
    random.seed(int(s[2]))
