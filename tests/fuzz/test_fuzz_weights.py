"""Fuzzing the safetensors reader (``diffusekit.io.weights.load_weights``), and proof that nothing is unpickled.

Safetensors inputs: a small valid file truncated at every byte, every single bit of its header flipped,
random byte corruption anywhere, and headers built by hypothesis with wrong dtypes, shapes that do not match
their byte counts, offsets out of range, huge or negative numbers, a claimed header length far beyond the
file, and non-object JSON; valid files with NaN or infinity anywhere in a floating tensor (always refused);
short files of any bytes under weight-file names (refused as "not a weights file" or a pickle, never
unpickled). Contract: a dict of tensors whose sizes match their headers, or a WeightsError naming the file.

Pickles: files whose unpickling would run code (they create a marker file) are offered to every loader
under every name; the marker must never appear.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from diffusekit.errors import WeightsError
from diffusekit.io.weights import load_weights
from fuzzing import EXTREME_INTS, Tally, examples, json_values, session_tally

DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "U16", "U32",
          "U64", "C64", "F4", "X", "", "f32", "F32 "]  # fmt: skip


@pytest.fixture(scope="session")
def tally(request: pytest.FixtureRequest) -> Tally:
    return session_tally(request)


def _valid_file(path: Path) -> bytes:
    g = torch.Generator().manual_seed(0)
    save_file(
        {"a": torch.randn(3, 4, generator=g), "b": torch.arange(5), "c": torch.randn(2, generator=g).half()},
        str(path),
        metadata={"format": "pt"},
    )
    return path.read_bytes()


def _load(tally: Tally, path: Path, data: bytes, target: str, describe: str = "") -> dict | None:
    path.write_bytes(data)
    result = tally.check(target, lambda: load_weights(path), names=[str(path)], describe=describe or repr(data[:300]))
    if result is not None:
        header_len = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + header_len])
        for key, tensor in result.items():
            assert isinstance(tensor, torch.Tensor)
            begin, end = header[key]["data_offsets"]
            assert tensor.numel() * tensor.element_size() == end - begin, key
            assert list(tensor.shape) == header[key]["shape"], key
    return result


def _with_header(header: object, data: bytes, claimed: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data


def test_truncated_at_every_byte(tally, tmp_path):
    original = _valid_file(tmp_path / "valid.safetensors")
    assert _load(tally, tmp_path / "w.safetensors", original, "load_weights: truncated") is not None
    for n in range(len(original)):
        assert _load(tally, tmp_path / "w.safetensors", original[:n], "load_weights: truncated") is None, n


def test_every_header_bit_flipped(tally, tmp_path):
    original = _valid_file(tmp_path / "valid.safetensors")
    header_end = 8 + struct.unpack("<Q", original[:8])[0]
    for i in range(header_end):
        for bit in range(8):
            data = bytearray(original)
            data[i] ^= 1 << bit
            where = f"byte {i} bit {bit}"
            _load(tally, tmp_path / "w.safetensors", bytes(data), "load_weights: header bit flips", where)


@examples(300)
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8))
def test_random_byte_corruption(tally, tmp_path_factory, edits):
    folder = tmp_path_factory.mktemp("w")
    data = bytearray(_valid_file(folder / "valid.safetensors"))
    for pos, value in edits:
        data[pos % len(data)] = value
    _load(tally, folder / "w.safetensors", bytes(data), "load_weights: byte corruption", repr(edits))


SHAPES = st.one_of(
    st.lists(st.integers(0, 6), max_size=4),
    st.lists(st.sampled_from(EXTREME_INTS), min_size=1, max_size=3),
    json_values(),
)
OFFSETS = st.one_of(
    st.lists(st.integers(0, 200), min_size=2, max_size=2).map(sorted),
    st.lists(st.integers(0, 200), min_size=2, max_size=2),
    st.lists(st.sampled_from(EXTREME_INTS), min_size=0, max_size=3),
    json_values(),
)
TENSOR_INFO = st.one_of(
    st.fixed_dictionaries({"dtype": st.sampled_from(DTYPES), "shape": SHAPES, "data_offsets": OFFSETS}),
    st.fixed_dictionaries(
        {"dtype": st.sampled_from(DTYPES), "shape": SHAPES, "data_offsets": OFFSETS},
        optional={"extra": json_values()},
    ),
    json_values(),
)
HEADERS = st.one_of(
    st.dictionaries(st.text(max_size=6), TENSOR_INFO, max_size=4),
    st.dictionaries(st.text(max_size=6), TENSOR_INFO, max_size=3).map(
        lambda h: {"__metadata__": {"format": "pt"}, **h}
    ),
    st.dictionaries(st.text(max_size=6), TENSOR_INFO, max_size=3).flatmap(
        lambda h: json_values().map(lambda m: {"__metadata__": m, **h})
    ),
    json_values(),
)


@examples(300)
@given(header=HEADERS, data=st.binary(max_size=256))
def test_hostile_headers(tally, tmp_path_factory, header, data):
    path = tmp_path_factory.mktemp("w") / "w.safetensors"
    _load(tally, path, _with_header(header, data), "load_weights: hostile headers", repr(header)[:1000])


@pytest.mark.parametrize("claimed", [0, 1, 7, 2**31, 2**32 + 2, 2**63, 2**64 - 1, 100 * 1024 * 1024 + 1, 10**12])
def test_header_claiming_a_huge_length(tally, tmp_path, claimed):
    path = tmp_path / "w.safetensors"
    data = _with_header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, claimed=claimed)
    assert _load(tally, path, data, "load_weights: claimed header length") is None


@pytest.mark.parametrize(
    "info",
    [
        {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]},  # shape needs 8 bytes, offsets give 4
        {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 10**12]},
        {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]},
        {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]},
        {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]},
        {"dtype": "F64", "shape": [1], "data_offsets": [0, 4]},  # wrong dtype for the byte count
        {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 4]},
        {"shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1]},
    ],
)
def test_inconsistent_tensor_entries(tally, tmp_path, info):
    path = tmp_path / "w.safetensors"
    assert _load(tally, path, _with_header({"t": info}, b"\0" * 4), "load_weights: inconsistent entries") is None


def test_overlapping_and_duplicate_tensors(tally, tmp_path):
    path = tmp_path / "w.safetensors"
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    raw = b'{"a": ' + json.dumps(entry).encode() + b', "a": ' + json.dumps(entry).encode() + b"}"
    _load(tally, path, struct.pack("<Q", len(raw)) + raw + b"\0" * 4, "load_weights: duplicates and overlaps")
    _load(tally, path, _with_header({"a": entry, "b": entry}, b"\0" * 4), "load_weights: duplicates and overlaps")
    gap = {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}
    _load(tally, path, _with_header({"a": gap}, b"\0" * 8), "load_weights: duplicates and overlaps")


def test_not_a_regular_file(tally, tmp_path):
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    assert tally.check("load_weights: not a file", lambda: load_weights(folder), names=[str(folder)]) is None
    missing = tmp_path / "missing.safetensors"
    assert tally.check("load_weights: not a file", lambda: load_weights(missing), names=[str(missing)]) is None
    link = tmp_path / "loop.safetensors"
    link.symlink_to(link)
    assert tally.check("load_weights: not a file", lambda: load_weights(link), names=[str(link)]) is None


FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e5m2, torch.float8_e4m3fn]


@examples(150)
@given(
    dtype=st.sampled_from(FLOAT_DTYPES),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    where=st.integers(0, 10_000),
    value=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
)
def test_non_finite_values_are_refused(tally, tmp_path_factory, dtype, shape, where, value):
    path = tmp_path_factory.mktemp("w") / "w.safetensors"
    t = torch.zeros(shape)
    t.view(-1)[where % t.numel()] = value
    t = t.to(dtype)
    if t.is_floating_point() and bool(torch.isfinite(t.to(torch.float32)).all()):
        return  # float8_e4m3fn has no infinity: the cast saturates to a finite value, which is fine
    save_file({"ok": torch.ones(2), "bad": t}, str(path))
    result = tally.check("load_weights: non-finite values", lambda: load_weights(path), names=[str(path)],
                         describe=f"{value} in {dtype} {shape} at {where}")  # fmt: skip
    assert result is None


@examples(150)
@given(data=st.binary(max_size=40), suffix=st.sampled_from([".ckpt", ".pt", ".bin", ".safetensors", ""]))
def test_short_files_of_any_bytes(tally, tmp_path_factory, data, suffix):
    from diffusekit.io.single_file import read_single_file

    path = tmp_path_factory.mktemp("w") / f"model{suffix}"
    path.write_bytes(data)
    for allow in (False, True):  # torch.load(weights_only=True) of a corrupt pickle must not escape either
        tally.check("read_single_file: short files", lambda a=allow: read_single_file(path, allow_pickle=a),
                    names=[str(path)], describe=repr(data))  # fmt: skip
    tally.check("load_weights: short files", lambda: load_weights(path), names=[str(path)], describe=repr(data))


# ---------------------------------------------------------------------------------------------------------
# Nothing is unpickled


class _RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _hostile_pickles(folder: Path, marker: Path) -> list[bytes]:
    """A plain pickle, and a torch zip checkpoint whose data.pkl runs code."""
    plain = pickle.dumps({"state_dict": {"w": _RunsCode(marker)}})
    zpath = folder / "torch-zip.bin"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("archive/data.pkl", plain)
        z.writestr("archive/version", "3\n")
    return [plain, zpath.read_bytes()]


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".pkl", ".safetensors", ".json", ""])
def test_pickles_are_never_unpickled_by_load_weights(tally, tmp_path, suffix):
    marker = tmp_path / "CODE-RAN"
    for i, payload in enumerate(_hostile_pickles(tmp_path, marker)):
        path = tmp_path / f"model{i}{suffix}"
        path.write_bytes(payload)
        assert tally.check("pickles: load_weights", lambda: load_weights(path), names=[str(path)]) is None  # noqa: B023
        assert not marker.exists(), f"unpickling ran code ({path})"


def test_pickles_are_never_unpickled_by_the_model_loaders(tally, tmp_path):
    from diffusekit.io.models import load_unet, load_vae
    from diffusekit.io.text import load_text_encoder, load_tokenizer
    from diffusekit.pipelines.loading import load_pipeline

    marker = tmp_path / "CODE-RAN"
    payload = _hostile_pickles(tmp_path, marker)[0]
    root = tmp_path / "model"
    for sub, names in {
        "unet": ["diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"],
        "vae": ["diffusion_pytorch_model.bin"],
        "text_encoder": ["pytorch_model.bin", "model.safetensors"],
        "tokenizer": ["vocab.json", "merges.txt"],
    }.items():
        (root / sub).mkdir(parents=True)
        for name in names:
            (root / sub / name).write_bytes(payload)
    (root / "model_index.json").write_text("{}")
    calls = {
        "load_pipeline (folder)": lambda: load_pipeline(root),
        "load_unet": lambda: load_unet(root / "unet"),
        "load_vae": lambda: load_vae(root / "vae"),
        "load_text_encoder": lambda: load_text_encoder(root / "text_encoder"),
        "load_tokenizer": lambda: load_tokenizer(root / "tokenizer"),
    }
    for name, call in calls.items():
        assert tally.check(f"pickles: {name}", call, names=[str(root)]) is None
        assert not marker.exists(), f"{name}: unpickling ran code"
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(payload)
    tok = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "pipelines" / "stable_diffusion" / "tokenizer"
    if not tok.is_dir():
        pytest.skip(f"the fixture tokenizer is not at {tok}")
    for allow in (False, True):  # allowed: torch.load(weights_only=True) must still refuse to run code
        result = tally.check(
            "pickles: load_pipeline (single file)",
            lambda allow=allow: load_pipeline(ckpt, tokenizer=tok, allow_pickle=allow),
            names=[str(ckpt)],
        )
        assert result is None
        assert not marker.exists(), f"load_pipeline(allow_pickle={allow}) ran code"


def test_weights_error_is_a_value_error():
    # callers that catch ValueError keep working; nothing in the contract needs more
    assert issubclass(WeightsError, ValueError)
