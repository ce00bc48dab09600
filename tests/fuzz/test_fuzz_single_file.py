"""Fuzzing single-file Stable Diffusion checkpoints (``diffusekit.pipelines.loading.load_pipeline`` on a file).

The tiny fixture pipeline is written once as a single file; each case rewrites it with tensors removed,
added, renamed, reshaped, of another dtype or holding NaN/infinity, the text encoder stored a second time
under the older names (equal or different), its ``diffusekit.*`` config metadata mutated or removed (so that
the configs are inferred from the tensor shapes), or its bytes corrupted. Contract (see
``fuzzing``): a model, or a DiffusekitError naming the file; a model that loads must generate one
small image or refuse with a DiffusekitError.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from diffusekit.pipelines.loading import load_pipeline, save_pipeline
from diffusekit.pipelines.text_to_image import TextToImage
from fuzzing import EXTREME_INTS, Tally, examples, json_values, mutated, session_tally, string_values

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
SD = FIXTURES / "pipelines" / "stable_diffusion"
pytestmark = pytest.mark.skipif(not SD.is_dir(), reason=f"fixtures not found at {SD}")

PREFIXES = ["model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.", "", "x."]
EDITS = ["drop", "drop_many", "extra", "rename", "reshape", "unsqueeze", "scalar", "huge_dim", "dtype:float16",
         "dtype:float64", "dtype:bfloat16", "dtype:int64", "dtype:bool", "nan", "inf", "one_nan", "other_family",
         "text_twice", "text_twice_differ"]  # fmt: skip
OLD_TEXT = "cond_stage_model.transformer."
TEXT = OLD_TEXT + "text_model."


@pytest.fixture(scope="session")
def tally(request: pytest.FixtureRequest) -> Tally:
    return session_tally(request)


@pytest.fixture(scope="session")
def original(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tiny pipeline as a single file: (tensors, metadata)."""
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    save_pipeline(load_pipeline(SD, fast=False), path)
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _edit(state: dict[str, torch.Tensor], kind: str, index: int, prefix: str) -> dict[str, torch.Tensor]:
    keys = sorted(state)
    key = keys[index % len(keys)]
    if kind == "drop":
        del state[key]
    elif kind == "drop_many":
        for k in keys[index % 7 :: 7]:
            del state[k]
    elif kind == "extra":
        state[f"{prefix}extra.weight.{index}"] = torch.zeros(3)
    elif kind == "rename":
        state[prefix + key.split(".", 1)[-1]] = state.pop(key)
    elif kind == "reshape":
        state[key] = state[key].reshape(-1)[: max(1, state[key].numel() - 1)].clone()
    elif kind == "unsqueeze":
        state[key] = state[key][None].clone()
    elif kind == "scalar":
        state[key] = torch.tensor(1.0)
    elif kind == "huge_dim":  # a zero-size tensor whose other dimension is huge: no bytes, absurd shape
        state[key] = torch.zeros(0, 2**40)
    elif kind.startswith("dtype:"):
        state[key] = state[key].to(getattr(torch, kind.split(":")[1]))
    elif kind == "nan":
        state[key] = torch.full_like(state[key], float("nan"))
    elif kind in ("inf", "one_nan") and state[key].is_floating_point() and state[key].numel():
        state[key] = state[key].clone()
        state[key].view(-1)[index % state[key].numel()] = float("inf") if kind == "inf" else float("nan")
    elif kind.startswith("text_twice"):  # the text encoder again under the older names (without text_model.)
        text = [k for k in keys if k.startswith(TEXT)]
        for k in text:
            state[OLD_TEXT + k[len(TEXT) :]] = state[k].clone()
        if kind == "text_twice_differ" and text:
            old = OLD_TEXT + text[index % len(text)][len(TEXT) :]
            state[old] = state[old] + 1 if state[old].is_floating_point() else state[old] ^ 1
    elif kind == "other_family":
        state["conditioner.embedders.0.transformer.x"] = torch.zeros(1)
    return state


def _metadata_ops(metadata: dict[str, str]) -> st.SearchStrategy[dict[str, str]]:
    config_keys = sorted(k for k in metadata if k.startswith("diffusekit."))
    bases = {k: json.loads(metadata[k]) for k in config_keys}
    strings = string_values(*bases.values())

    def mutate_one(key: str) -> st.SearchStrategy[dict[str, str]]:
        return st.one_of(
            mutated(bases[key], strings, max_ops=3).map(json.dumps),
            json_values().map(json.dumps),
            st.text(max_size=30),
        ).map(lambda text: {**metadata, key: text})

    return st.one_of(
        st.just(metadata),
        st.just({k: v for k, v in metadata.items() if not k.startswith("diffusekit.")}),  # infer from shapes
        st.sampled_from(config_keys).flatmap(mutate_one),
    )


def _write(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)


def _load(path: Path):
    return load_pipeline(path, tokenizer=SD / "tokenizer")


def _load_and_generate(path: Path) -> bool:
    sd = _load(path)
    m = sd.latent_multiple
    out = TextToImage(sd)("a red cube", height=m, width=m, steps=1, show_progress=False,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.images.shape == (1, 3, m, m)
    return True


def test_the_unmutated_single_file_loads(tally, tmp_path, original):
    path = tmp_path / "model.safetensors"
    _write(path, dict(original[0]), original[1])
    assert tally.check("load_pipeline (single file)", lambda: _load_and_generate(path)) is True
    # without its config metadata the networks are inferred from the shapes: the tiny VAE's channels are not
    # SD-1.x's, so this one is refused, naming the file
    _write(path, dict(original[0]), {"format": "pt"})
    assert tally.check("load_pipeline (single file)", lambda: _load_and_generate(path), names=[str(path)]) is None


@examples(40)
@given(data=st.data())
def test_single_file(tally, tmp_path_factory, original, data):
    state, metadata = dict(original[0]), original[1]
    edits = data.draw(
        st.lists(st.tuples(st.sampled_from(EDITS), st.integers(0, 10_000), st.sampled_from(PREFIXES)), max_size=3)
    )
    for kind, index, prefix in edits:
        state = _edit(state, kind, index, prefix)
    metadata = data.draw(_metadata_ops(metadata))
    path = tmp_path_factory.mktemp("single") / "model.safetensors"
    _write(path, state, metadata)
    tally.check("load_pipeline (single file)", lambda: _load_and_generate(path), names=[str(path)],
                describe=lambda: repr((edits, {k: v[:200] for k, v in metadata.items()})))  # fmt: skip


@pytest.mark.parametrize("key", ["diffusekit.unet", "diffusekit.vae", "diffusekit.text_encoder"])
@pytest.mark.parametrize(
    "field",
    ["channels", "layers_per_block", "num_layers", "hidden_size", "vocab_size", "max_positions", "latent_channels",
     "transformer_depth", "num_heads"],
)  # fmt: skip
def test_metadata_configs_with_huge_sizes_are_refused_before_building(tally, tmp_path, original, key, field):
    state, metadata = dict(original[0]), dict(original[1])
    config = json.loads(metadata[key])
    if field not in config:
        pytest.skip(f"{key} has no {field}")
    huge = EXTREME_INTS[-3]  # 2**64
    config[field] = [huge] * len(config[field]) if isinstance(config[field], list) else huge
    metadata[key] = json.dumps(config)
    path = tmp_path / "model.safetensors"
    _write(path, state, metadata)
    result = tally.check("load_pipeline (single file: huge metadata sizes)", lambda: _load(path),
                         names=[str(path)], describe=f"{key}.{field}={huge}")  # fmt: skip
    assert result is None


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_integer_tensors_are_refused(tally, tmp_path, original, dtype):
    state, metadata = dict(original[0]), original[1]
    key = sorted(state)[0]
    state[key] = state[key].to(dtype)
    path = tmp_path / "model.safetensors"
    _write(path, state, metadata)
    tally.check("load_pipeline (single file: integer tensors)", lambda: _load(path),
                names=[str(path)], describe=f"{key} as {dtype}")  # fmt: skip


@pytest.mark.parametrize("kind", ["nan", "inf", "one_nan", "text_twice_differ", "text_twice"])
@pytest.mark.parametrize("index", [0, 77, 4321])
def test_hostile_single_files(tally, tmp_path, original, kind, index):
    """Non-finite tensors and two different copies of the text encoder are refused, naming the file; two
    equal copies load (with a warning) and generate."""
    state, metadata = _edit(dict(original[0]), kind, index, ""), original[1]
    path = tmp_path / "model.safetensors"
    _write(path, state, metadata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the equal-copies warning
        result = tally.check(f"load_pipeline (single file: {kind})", lambda: _load_and_generate(path),
                             names=[str(path)], describe=f"{kind} at {index}")  # fmt: skip
    assert result is (True if kind == "text_twice" else None), kind
