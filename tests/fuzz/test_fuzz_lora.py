"""Fuzzing LoRA files: ``io.lora.read_lora`` -> ``resolve`` -> ``pipelines.lora.load_lora`` on the fixtures' tiny
U-Net and text encoder.

Inputs: a small valid kohya file and a valid PEFT file (with its header metadata) truncated and byte-corrupted;
files built by hypothesis from real and hostile stems, every role suffix (down/up/alpha, A/B, LoHa/LoKr/DoRA
keys), shapes that fit, nearly fit or make no sense, integer/bool/half dtypes, alphas of 0, NaN, inf and
negative, and hostile ``lora_adapter_metadata`` JSON. Contract: the adapter loads (and the network still runs),
or a DiffusekitError naming the file -- and after a refusal the model's weights and adapters are unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from diffusekit.io.models import load_unet
from diffusekit.io.text import load_text_encoder
from diffusekit.pipelines import lora
from fuzzing import EXTREME_FLOATS, Tally, examples, json_values, session_tally

UNET_STEMS = [
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_mid_block_attentions_0_proj_in",  # a 1x1 convolution
    "lora_unet_down_blocks_0_resnets_0_conv1",  # a 3x3 convolution (LoCon)
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj",
    "lora_unet_down_blocks_0_resnets_0_norm1",  # a GroupNorm: takes no adapter
    "lora_unet_conv_in",
]
TE_STEMS = [
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te_text_model_encoder_layers_1_mlp_fc1",
    "lora_te1_text_model_encoder_layers_0_mlp_fc2",
    "lora_te2_text_model_encoder_layers_0_self_attn_k_proj",
]
PEFT_STEMS = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "unet.mid_block.attentions.0.proj_out",
              "text_encoder.encoder.layers.0.self_attn.v_proj", "text_encoder.text_model.encoder.layers.1.mlp.fc2",
              "text_encoder_2.encoder.layers.0.self_attn.q_proj"]  # fmt: skip
HOSTILE_STEMS = ["", "lora_unet_", "lora_te_", "unet.", "unet..to_q", "lora_unet_" + "x" * 300, "lora_unet_down.blocks",
                 f"{UNET_STEMS[0]}.extra", "text_encoder", "é"]  # fmt: skip
KOHYA_ROLES = ["lora_down.weight", "lora_up.weight", "alpha", "hada_w1_a", "lokr_w1", "dora_scale", "lora_mid.weight",
               "diff", "lora_up.bias"]  # fmt: skip
PEFT_ROLES = ["lora_A.weight", "lora_B.weight", "alpha", "lora_magnitude_vector", "lora_A.bias"]
DIMS = [0, 1, 2, 3, 4, 8, 32, 37, 64]
DTYPES = [torch.float32, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]


@pytest.fixture(scope="session")
def tally(request: pytest.FixtureRequest) -> Tally:
    return session_tally(request)


@pytest.fixture(scope="module")
def model(fixtures_dir: Path) -> SimpleNamespace:
    sd = fixtures_dir / "pipelines" / "stable_diffusion"
    return SimpleNamespace(unet=load_unet(sd / "unet"), text_encoder=load_text_encoder(sd / "text_encoder"))


def _state(model: SimpleNamespace) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c, m in lora.components(model).items() for k, v in m.state_dict().items()}


def _valid_kohya(path: Path) -> bytes:
    g = torch.Generator().manual_seed(0)
    t = {}
    for stem, (down, up) in {
        UNET_STEMS[0]: ((2, 32), (32, 2)),
        UNET_STEMS[1]: ((2, 64, 1, 1), (64, 2, 1, 1)),
        UNET_STEMS[2]: ((2, 32, 3, 3), (32, 2, 1, 1)),
        TE_STEMS[0]: ((2, 32), (32, 2)),
    }.items():
        t[f"{stem}.lora_down.weight"] = torch.randn(down, generator=g)
        t[f"{stem}.lora_up.weight"] = torch.randn(up, generator=g)
        t[f"{stem}.alpha"] = torch.tensor(1.5)
    save_file(t, str(path))
    return path.read_bytes()


def _peft_pairs(g: torch.Generator) -> dict[str, torch.Tensor]:
    t = {}
    for stem, width in zip(PEFT_STEMS[:3], (32, 64, 32)):  # mid_block.attentions.0.proj_out: a 64-channel 1x1 conv
        t[f"{stem}.lora_A.weight"] = torch.randn(2, width, generator=g)
        t[f"{stem}.lora_B.weight"] = torch.randn(width, 2, generator=g)
    return t


def _valid_peft(path: Path) -> bytes:
    t = _peft_pairs(torch.Generator().manual_seed(1))
    meta = {"unet.r": 2, "unet.lora_alpha": 3, "unet.alpha_pattern": {"proj_out": 1},
            "text_encoder.r": 2, "text_encoder.lora_alpha": 4, "text_encoder.use_rslora": True}  # fmt: skip
    save_file(t, str(path), metadata={"lora_adapter_metadata": json.dumps(meta), "format": "pt"})
    return path.read_bytes()


def _load(tally: Tally, model: SimpleNamespace, path: Path, target: str, describe: str = "") -> str | None:
    """One case: load onto the model; afterwards the model runs (when accepted, the adapter is removed again)
    or is exactly as before (when refused)."""
    before = _state(model)
    name = tally.check(target, lambda: lora.load_lora(model, path, weight=0.7), names=[str(path)], describe=describe)
    if name is None:
        assert lora.lora_weights(model) == {}, describe
        after = _state(model)
        assert all(torch.equal(after[k], before[k]) for k in before), describe
        return None
    try:  # removed even when a check fails, so that hypothesis' replay of the case starts from the bare model
        with torch.no_grad():
            out = model.unet(torch.randn(1, 4, 8, 8), torch.tensor(10.0), context=torch.randn(1, 77, 32))
            assert torch.isfinite(out).all(), describe
            assert torch.isfinite(model.text_encoder(torch.zeros(1, 77, dtype=torch.long)).last_hidden_state).all()
    finally:
        lora.remove_lora(model)
    return name


def test_the_valid_files_load(tally, model, tmp_path):
    for build in (_valid_kohya, _valid_peft):
        path = tmp_path / f"{build.__name__}.safetensors"
        build(path)
        assert _load(tally, model, path, "lora: valid") is not None


@pytest.mark.parametrize("build", [_valid_kohya, _valid_peft])
def test_truncated(tally, model, tmp_path, build):
    original = build(tmp_path / "valid.safetensors")
    path = tmp_path / "cut.safetensors"
    for n in range(0, len(original), 37):
        path.write_bytes(original[:n])
        assert _load(tally, model, path, "lora: truncated", f"{build.__name__}[:{n}]") is None


@examples(100)
@given(which=st.booleans(), edits=st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), min_size=1,
                                           max_size=6))  # fmt: skip
def test_byte_corruption(tally, model, tmp_path_factory, which, edits):
    folder = tmp_path_factory.mktemp("lora")
    data = bytearray((_valid_kohya if which else _valid_peft)(folder / "valid.safetensors"))
    header_end = 8 + int.from_bytes(data[:8], "little")
    for pos, value in edits:
        data[pos % header_end if pos % 2 else pos % len(data)] = value  # half the edits in the header
    path = folder / "bad.safetensors"
    path.write_bytes(bytes(data))
    _load(tally, model, path, "lora: byte corruption", repr(edits))


def _tensor(shape: list[int], dtype: torch.dtype, special: float | None) -> torch.Tensor:
    t = torch.randn(shape) if dtype.is_floating_point else torch.ones(shape)
    if special is not None and t.numel():
        t.reshape(-1)[0] = torch.tensor(special, dtype=torch.float64).to(t.dtype)  # 1e300 -> inf in float32
    return t.to(dtype)


ENTRY = st.tuples(
    st.one_of(st.sampled_from(UNET_STEMS + TE_STEMS + HOSTILE_STEMS).map(lambda s: (s, KOHYA_ROLES)),
              st.sampled_from(PEFT_STEMS + HOSTILE_STEMS).map(lambda s: (s, PEFT_ROLES))),  # fmt: skip
    st.integers(0, 8),  # role index
    st.lists(st.sampled_from(DIMS), max_size=5),  # shape
    st.sampled_from(DTYPES),
    st.one_of(st.none(), st.sampled_from(EXTREME_FLOATS)),  # a special first value
)


def _files(entries: list) -> dict[str, torch.Tensor]:
    out = {}
    for (stem, roles), role, shape, dtype, special in entries:
        key = f"{stem}.{roles[role % len(roles)]}"
        if "alpha" in key and special is not None:
            shape = []
        out[key] = _tensor(shape, dtype, special if "alpha" in key or special is None else float(special))
    return out


def _fitting_pairs(draw_rank: int) -> dict[str, torch.Tensor]:
    """Pairs that fit the model, so the hostile parts are not always refused by the first check."""
    return {
        f"{UNET_STEMS[0]}.lora_down.weight": torch.randn(draw_rank, 32),
        f"{UNET_STEMS[0]}.lora_up.weight": torch.randn(32, draw_rank),
    }


@examples(200)
@given(entries=st.lists(ENTRY, max_size=6), rank=st.integers(1, 5), fitting=st.booleans())
def test_hostile_kohya_and_peft_files(tally, model, tmp_path_factory, entries, rank, fitting):
    tensors = {**(_fitting_pairs(rank) if fitting else {}), **_files(entries)}
    if any(k.startswith(("unet.", "text_encoder")) for k in tensors) and fitting:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("lora_")} or tensors
    path = tmp_path_factory.mktemp("lora") / "hostile.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    _load(tally, model, path, "lora: hostile files", repr({k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}))


@examples(150)
@given(meta=st.one_of(json_values(), st.dictionaries(
    st.sampled_from(["unet.r", "unet.lora_alpha", "unet.alpha_pattern", "unet.use_rslora", "unet.use_dora",
                     "text_encoder.lora_alpha", "text_encoder.alpha_pattern", "text_encoder.use_rslora", "other"]),
    st.one_of(json_values(), st.dictionaries(st.sampled_from(["to_k", "proj_out", "v_proj", "", "."]),
                                             json_values(max_leaves=2), max_size=3)),
    max_size=6)), raw=st.booleans())  # fmt: skip
def test_hostile_peft_metadata(tally, model, tmp_path_factory, meta, raw):
    t = _peft_pairs(torch.Generator().manual_seed(2))
    text = repr(meta) if raw else json.dumps(meta)
    path = tmp_path_factory.mktemp("lora") / "meta.safetensors"
    save_file(t, str(path), metadata={"lora_adapter_metadata": text})
    _load(tally, model, path, "lora: hostile PEFT metadata", text[:1000])
