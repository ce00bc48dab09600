"""Fuzzing the options of ``diffusekit sample``, ``demo`` and ``fid``, and image files read by
``io.images.read_image``: every hostile value is accepted or refused with a DiffusekitError naming the
option (or file), before any model loads or any size is allocated."""

from __future__ import annotations

import argparse
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from diffusekit.cli import demo, fid, sample
from diffusekit.cli.main import build_parser
from diffusekit.io.images import read_image
from fuzzing import EXTREME_FLOATS, EXTREME_INTS, Tally, examples, session_tally

INTS = st.one_of(st.sampled_from(EXTREME_INTS), st.integers(min_value=-(2**80), max_value=2**80))
FLOATS = st.one_of(st.sampled_from(EXTREME_FLOATS), st.floats(allow_nan=True, allow_infinity=True))


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Tally:
    return session_tally(request)


def _args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@given(n=INTS, batch=INTS, steps=INTS, scale=INTS, nrow=INTS, seed=INTS, eta=FLOATS, guidance=FLOATS,
       labels=st.lists(INTS, min_size=1, max_size=3))  # fmt: skip
@examples(200)
def test_sample_options(tally, n, batch, steps, scale, nrow, seed, eta, guidance, labels):
    argv = ["sample", "m", "--n", str(n), "--batch-size", str(batch), "--steps", str(steps), "--scale", str(scale),
            f"--nrow={nrow}", f"--seed={seed}", f"--eta={eta}", f"--guidance={guidance}",
            "--class", *[f"{k}" for k in labels]]  # fmt: skip
    args = _args(argv)
    options = ["--n", "--batch-size", "--steps", "--scale", "--nrow", "--seed", "--eta", "--guidance", "--class"]
    tally.check("sample options", lambda: sample.check_options(args), names=options, describe=repr(argv))


@given(steps=INTS, batch=INTS, minutes=FLOATS, lr=FLOATS, gamma=FLOATS, guidance=FLOATS, rows=INTS, fid_n=INTS,
       heldout=INTS, seed=INTS, threads=INTS)  # fmt: skip
@examples(200)
def test_demo_options(tally, steps, batch, minutes, lr, gamma, guidance, rows, fid_n, heldout, seed, threads):
    argv = ["demo", f"--steps={steps}", f"--batch-size={batch}", f"--max-minutes={minutes}", f"--lr={lr}",
            f"--min-snr-gamma={gamma}", f"--guidance={guidance}", f"--grid-rows={rows}", f"--fid-samples={fid_n}",
            f"--fid-heldout={heldout}", f"--seed={seed}", f"--cpu-threads={threads}"]  # fmt: skip
    args = _args(argv)
    names = [a.split("=")[0] for a in argv[1:]]
    tally.check("demo options", lambda: demo.check_options(args), names=names, describe=repr(argv))


@given(batch=INTS, limit=INTS)
@examples(50)
def test_fid_options(tally, tmp_path_factory, batch, limit):
    args = _args(["fid", "a", "b", f"--batch-size={batch}", f"--limit={limit}"])
    args.inception = str(tmp_path_factory.mktemp("none") / "missing.pt")  # the run stops before features
    tally.check("fid options", lambda: fid.run(args), names=["--batch-size", "--limit", "A 'a'"],
                describe=f"--batch-size {batch} --limit {limit}")  # fmt: skip


def _png(mode: str, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="TIFF" if mode in ("I", "F", "I;16B", "CMYK") else "PNG")
    return buf.getvalue()


@given(mode=st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B", "I", "F", "CMYK"]),
       cut=st.integers(min_value=0, max_value=400), flips=st.lists(st.integers(0, 10_000), max_size=4),
       want=st.sampled_from(["L", "RGB", "RGBA"]))  # fmt: skip
@examples(150)
def test_read_image_of_damaged_files(tally, tmp_path_factory, mode, cut, flips, want):
    data = bytearray(_png(mode, (7, 5)))
    if cut:
        data = data[: max(1, len(data) - cut)]
    for f in flips:
        data[f % len(data)] ^= 0xFF
    path = tmp_path_factory.mktemp("img") / "x.img"
    path.write_bytes(bytes(data))
    result = tally.check("read_image damaged", lambda: read_image(path, want), names=[str(path)],
                         describe=f"{mode} cut {cut} flips {flips}")  # fmt: skip
    if result is not None:
        assert result.shape[0] == {"L": 1, "RGB": 3, "RGBA": 4}[want]
        assert float(result.min()) >= 0.0 and float(result.max()) <= 1.0
