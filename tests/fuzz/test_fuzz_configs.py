"""Fuzzing the config translators: scheduler, U-Net, VAE and text-encoder configs, our own saved forms, and
the JSON reader under them.

Inputs are the reference fixtures' configs mutated by hypothesis (keys set to near-valid or hostile values:
wrong types, extreme or negative numbers, NaN, deep nesting; keys removed; unknown keys added). Contract for
each (see ``fuzzing``): a config, or a ConfigError/WeightsError -- nothing else, within the time
limit. An accepted config must also be usable: its network builds (on the meta device; for small ones also
for real, with one forward pass) and its sampler grid is finite.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffusekit.errors import ConfigError
from diffusekit.io.scheduler_config import scheduler_from_diffusers
from diffusekit.io.text_encoder_config import text_encoder_from_diffusers
from diffusekit.io.unet_config import unet_from_diffusers
from diffusekit.io.vae_config import vae_from_diffusers
from diffusekit.io.weights import read_json
from diffusekit.networks.text_encoder import ClipTextEncoder, TextEncoderConfig
from diffusekit.networks.unet import UNet, UNetConfig
from diffusekit.networks.vae import AutoencoderKL, VAEConfig
from diffusekit.samplers.config import SamplerConfig, build_grid, run_sampler
from fuzzing import Tally, deep, examples, json_values, mutated, session_tally, string_values

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"fixtures not found at {FIXTURES}")

SMALL_PARAMS = 3_000_000  # accepted configs up to this size are also built for real and run once


@pytest.fixture(scope="session")
def tally(request: pytest.FixtureRequest) -> Tally:
    return session_tally(request)


def _configs(pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(FIXTURES.glob(pattern))] if FIXTURES.is_dir() else [{}]


SCHEDULERS = _configs("**/scheduler_config.json")


def _translatable(config: dict) -> bool:
    """Seeds are the fixture configs our U-Net translation accepts (the shared set also holds configs of model
    families that are refused with a ConfigError until they are supported; mutating those finds nothing new)."""
    try:
        unet_from_diffusers(config)
    except ConfigError:
        return False
    return True


UNETS = [c for c in _configs("**/config.json") if "block_out_channels" in c and "latent_channels" not in c]
UNETS = [c for c in UNETS if _translatable(c)]
VAES = [c for c in _configs("**/config.json") if "latent_channels" in c]
TEXT = [c for c in _configs("**/config.json") if "vocab_size" in c]
STRINGS = string_values(*SCHEDULERS, *UNETS, *VAES, *TEXT)


def _any_mutation(bases: list[dict]) -> st.SearchStrategy[dict]:
    return st.sampled_from(range(len(bases))).flatmap(lambda i: mutated(bases[i], STRINGS))


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Scheduler configs


def _use_sampler_config(config: SamplerConfig) -> None:
    """What a pipeline does with a scheduler config: grids of a few lengths, and a short sampling run."""
    T = config.num_train_timesteps
    for steps in sorted({1, min(7, T), min(50, T)}):
        grid = build_grid(config, steps)
        for name in ("timesteps", "alphas_cumprod", "alphas_cumprod_next"):
            values = getattr(grid, name, None)
            assert values is None or bool(torch.isfinite(torch.as_tensor(values)).all()), (name, values)
    grid = build_grid(config, min(3, T))
    x = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0)) * grid.init_noise_sigma
    out = run_sampler(config, lambda x, t, **_: torch.zeros_like(x), x, grid, generator=torch.Generator())
    assert out.shape == x.shape


@examples(300)
@given(cfg=_any_mutation(SCHEDULERS))
def test_scheduler_config(tally, cfg):
    def call():
        config = scheduler_from_diffusers(cfg)
        _use_sampler_config(config)

    tally.check("scheduler_from_diffusers", call, describe=lambda: repr(cfg))


@examples(150)
@given(d=st.dictionaries(st.sampled_from(sorted(SamplerConfig().to_dict())), json_values(), max_size=6))
def test_sampler_config_from_our_own_dict(tally, d):
    def call():
        _use_sampler_config(SamplerConfig.from_dict(d))

    tally.check("SamplerConfig.from_dict", call, describe=lambda: repr(d))


def test_scheduler_config_refuses_a_huge_schedule_before_allocating(tally):
    cfg = {**SCHEDULERS[0], "num_train_timesteps": 10**12}
    assert tally.check("scheduler_from_diffusers", lambda: scheduler_from_diffusers(cfg)) is None


# ---------------------------------------------------------------------------------------------------------
# Network configs


def _use_unet_config(config: UNetConfig) -> None:
    with torch.device("meta"):
        model = UNet(config)
    if _param_count(model) > SMALL_PARAMS or config.downsample_factor > 8:
        return
    model = UNet(config).eval()
    f = config.downsample_factor
    extra = {}
    if config.needs_context:
        extra["context"] = torch.zeros(1, 3, config.cross_attention_dim)
    if config.num_classes is not None:
        extra["class_labels"] = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        out = model(torch.zeros(1, config.in_channels, f, f), torch.tensor([3]), **extra)
    assert out.shape == (1, config.out_channels, f, f)


def _use_vae_config(config: VAEConfig) -> None:
    with torch.device("meta"):
        model = AutoencoderKL(config)
    if _param_count(model) > SMALL_PARAMS or config.downsample_factor > 8:
        return
    model = AutoencoderKL(config).eval()
    f = config.downsample_factor
    with torch.inference_mode():
        z = model.encode(torch.zeros(1, config.in_channels, f, f)).mean
        assert z.shape == (1, config.latent_channels, 1, 1)
        assert model.decode(z).shape == (1, config.out_channels, f, f)


def _use_text_config(config: TextEncoderConfig) -> None:
    with torch.device("meta"):
        model = ClipTextEncoder(config)
    if _param_count(model) > SMALL_PARAMS:
        return
    model = ClipTextEncoder(config).eval()
    n = min(config.max_positions, 5)
    ids = torch.tensor([[config.bos_id, *([0] * (n - 2)), config.eos_id][:n]])
    with torch.inference_mode():
        out = model(ids)
    assert out.last_hidden_state.shape == (1, n, config.hidden_size)


@examples(100)
@given(cfg=_any_mutation(UNETS))
def test_unet_config(tally, cfg):
    tally.check("unet_from_diffusers", lambda: _use_unet_config(unet_from_diffusers(cfg)),
                describe=lambda: repr(cfg))  # fmt: skip


@examples(80)
@given(cfg=_any_mutation([unet_from_diffusers(c).to_dict() for c in UNETS]))
def test_unet_config_from_our_own_dict(tally, cfg):
    tally.check("UNetConfig.from_dict", lambda: _use_unet_config(UNetConfig.from_dict(cfg)),
                describe=lambda: repr(cfg))  # fmt: skip


@examples(80)
@given(cfg=_any_mutation(VAES))
def test_vae_config(tally, cfg):
    tally.check("vae_from_diffusers", lambda: _use_vae_config(vae_from_diffusers(cfg)),
                describe=lambda: repr(cfg))  # fmt: skip


@examples(50)
@given(cfg=_any_mutation([vae_from_diffusers(c).to_dict() for c in VAES]))
def test_vae_config_from_our_own_dict(tally, cfg):
    tally.check("VAEConfig.from_dict", lambda: _use_vae_config(VAEConfig.from_dict(cfg)),
                describe=lambda: repr(cfg))  # fmt: skip


@examples(80)
@given(cfg=_any_mutation(TEXT))
def test_text_encoder_config(tally, cfg):
    tally.check("text_encoder_from_diffusers", lambda: _use_text_config(text_encoder_from_diffusers(cfg)),
                describe=lambda: repr(cfg))  # fmt: skip


HUGE = [10**9, 10**12, 2**63, 10**30]


@pytest.mark.parametrize("value", HUGE)
@pytest.mark.parametrize(
    "key",
    ["block_out_channels", "layers_per_block", "in_channels", "out_channels", "cross_attention_dim",
     "transformer_layers_per_block", "num_class_embeds", "attention_head_dim", "norm_num_groups"],
)  # fmt: skip
def test_unet_config_with_a_huge_size_is_refused_before_allocating(tally, key, value):
    base = next(c for c in UNETS if c.get("_class_name") == "UNet2DConditionModel")
    cfg = {**base, key: [value] * len(base["block_out_channels"]) if key == "block_out_channels" else value}
    result = tally.check("unet_from_diffusers (huge sizes)", lambda: unet_from_diffusers(cfg), names=[key])
    assert result is None, f"{key}={value} was accepted"


@pytest.mark.parametrize("value", HUGE)
@pytest.mark.parametrize("key", ["block_out_channels", "layers_per_block", "latent_channels", "in_channels"])
def test_vae_config_with_a_huge_size_is_refused_before_allocating(tally, key, value):
    base = VAES[0]
    cfg = {**base, key: [value] * len(base["block_out_channels"]) if key == "block_out_channels" else value}
    result = tally.check("vae_from_diffusers (huge sizes)", lambda: vae_from_diffusers(cfg), names=[key])
    assert result is None, f"{key}={value} was accepted"


@pytest.mark.parametrize("value", HUGE)
@pytest.mark.parametrize(
    "key", ["vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings"]
)
def test_text_config_with_a_huge_size_is_refused_before_allocating(tally, key, value):
    cfg = {**TEXT[0], key: value}
    result = tally.check(
        "text_encoder_from_diffusers (huge sizes)", lambda: text_encoder_from_diffusers(cfg), names=[key]
    )
    assert result is None, f"{key}={value} was accepted"


# ---------------------------------------------------------------------------------------------------------
# The JSON reader under every config


JSON_TEXTS = st.one_of(
    json_values().map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.integers(1, 200_000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 200_000).map(lambda n: '{"a": ' * n + "1" + "}" * n),
    st.integers(4000, 20_000).map(lambda n: '{"a": ' + "9" * n + "}"),
    st.sampled_from(['{"a": NaN}', '{"a": Infinity}', "\ufeff{}", '{"a": 1e999}', '{"a": -1e999}', "{}" * 2]),
)


@examples(300)
@given(text=JSON_TEXTS, encoding=st.sampled_from(["utf-8", "utf-16", "latin-1"]))
def test_read_json(tally, tmp_path_factory, text, encoding):
    path = tmp_path_factory.mktemp("json") / "config.json"
    path.write_bytes(text.encode(encoding, errors="replace"))
    result = tally.check("read_json", lambda: read_json(path), names=[str(path)], describe=lambda: repr(text[:500]))
    assert result is None or isinstance(result, dict)


def test_deeply_nested_config_values(tally):
    nested = deep(100_000)
    for name, parse, base in [
        ("scheduler_from_diffusers", scheduler_from_diffusers, SCHEDULERS[0]),
        ("unet_from_diffusers", unet_from_diffusers, UNETS[0]),
        ("vae_from_diffusers", vae_from_diffusers, VAES[0]),
        ("text_encoder_from_diffusers", text_encoder_from_diffusers, TEXT[0]),
    ]:
        for key in list(base)[:8]:
            tally.check(name, lambda: parse({**base, key: nested}), describe=f"{key} nested 100000 deep")  # noqa: B023
