"""Fuzzing the options of ``diffusekit train-vae``: every hostile value is accepted or refused with a
DiffusekitError naming the option, before any data is read or any model built (``--print-config`` stops the
command once the configuration is resolved)."""

from __future__ import annotations

import contextlib
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st

from diffusekit.cli import train_vae
from diffusekit.cli.main import build_parser
from fuzzing import EXTREME_FLOATS, EXTREME_INTS, Tally, examples, session_tally

INTS = st.one_of(st.sampled_from(EXTREME_INTS), st.integers(min_value=-(2**80), max_value=2**80))
FLOATS = st.one_of(st.sampled_from(EXTREME_FLOATS), st.floats(allow_nan=True, allow_infinity=True))


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Tally:
    return session_tally(request)


@given(latent=INTS, factor=INTS, examples_=INTS, kl=FLOATS, start=INTS, adv_w=FLOATS, layers=INTS, res=INTS,
       steps=INTS, minutes=FLOATS, batch=INTS, lr=FLOATS, ema=FLOATS, preview=INTS)  # fmt: skip
@examples(200)
def test_train_vae_options(tally, latent, factor, examples_, kl, start, adv_w, layers, res, steps, minutes, batch,
                           lr, ema, preview):  # fmt: skip
    argv = ["train-vae", "bundled", "--print-config", f"--latent-channels={latent}", f"--downsample-factor={factor}",
            f"--scaling-examples={examples_}", f"--kl-weight={kl}", f"--adversarial-start-steps={start}",
            f"--adversarial-weight={adv_w}", f"--discriminator-layers={layers}", f"--resolution-px={res}",
            f"--steps={steps}", f"--max-minutes={minutes}", f"--batch-size={batch}", f"--lr={lr}",
            f"--ema-decay={ema}", f"--preview-images={preview}"]  # fmt: skip
    args = build_parser().parse_args(argv)
    names = [a.split("=")[0] for a in argv[3:]]

    def run() -> int:
        with contextlib.redirect_stdout(io.StringIO()):
            return train_vae.run(args)

    tally.check("train-vae options", run, names=names, describe=repr(argv))
