"""LoRA on the tiny SDXL fixture (diffusekit.pipelines.lora): adapters on the U-Net and on both text encoders
(kohya ``lora_te1_``/``lora_te2_``, the U-Net in reference or CompVis names; PEFT ``text_encoder_2.``), written
with our own writer from random small weights; weights between generations, weight 0 = the base images exactly,
removal, fuse/unfuse; LoRAs of another model family (SD-1 on SDXL and SDXL on SD-1) refused by name with the
model unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusekit.errors import WeightsError
from diffusekit.io.lora import save_lora
from diffusekit.io.single_file import UNET_PREFIX, unet_key_map
from diffusekit.networks.lora import ADAPTED_LAYERS, LowRank, terms
from diffusekit.pipelines import lora
from diffusekit.pipelines.loading import load_pipeline
from diffusekit.pipelines.sdxl import StableDiffusionXL, TextToImageXL

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a cat", "a painting of a dog"]
LATENTS = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def sdxl_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "pipelines" / "stable_diffusion_xl"


@pytest.fixture()
def sdxl(sdxl_dir: Path) -> StableDiffusionXL:
    return load_pipeline(sdxl_dir)


def _images(sd: StableDiffusionXL) -> torch.Tensor:
    return TextToImageXL(sd)(PROMPTS, height=16, width=16, steps=2, guidance_scale=5.0, sampler="euler",
                             latents=LATENTS, show_progress=False).images  # fmt: skip


def _random_updates(model: torch.nn.Module, seed: int, rank: int = 2, every: int = 3) -> dict[str, LowRank]:
    """Random small rank-``rank`` updates on every ``every``-th Linear/Conv2d layer of ``model`` (1x1 and 3x3
    convolutions included), alpha 1.5 x rank."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, ADAPTED_LAYERS)]
    for name, layer in layers[::every]:
        w = layer.weight
        down_shape = (rank, w.shape[1], *w.shape[2:])
        up_shape = (w.shape[0], rank, *([1, 1] if w.ndim == 4 else []))
        out[name] = LowRank(0.3 * torch.randn(down_shape, generator=g), 0.3 * torch.randn(up_shape, generator=g),
                            1.5 * rank)  # fmt: skip
    return out


def _updates(sd: StableDiffusionXL, components=COMPONENTS, seed: int = 0) -> dict[str, dict[str, LowRank]]:
    return {c: _random_updates(getattr(sd, c), seed + i) for i, c in enumerate(components)}


def _states(sd: StableDiffusionXL) -> dict[str, torch.Tensor]:
    out = {}
    for component in COMPONENTS:
        model = getattr(sd, component)
        out.update({f"{component}.{k}": v.detach().clone() for k, v in model.state_dict().items()})
    return out


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_adapters_on_all_three_components_change_the_images_and_weight_zero_gives_the_base(sdxl, tmp_path, fmt):
    base = _images(sdxl)
    path = tmp_path / f"xl_{fmt}.safetensors"
    save_lora(_updates(sdxl), path, format=fmt)
    keys = set(load_file(path))
    prefixes = ("lora_unet_", "lora_te1_", "lora_te2_") if fmt == "kohya" else ("unet.", "text_encoder.",
                                                                                 "text_encoder_2.")  # fmt: skip
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in keys), prefix
    assert lora.load_lora(sdxl, path, weight=0.8) == f"xl_{fmt}"
    assert lora.lora_weights(sdxl) == {f"xl_{fmt}": 0.8}
    for component in COMPONENTS:  # every component carries the adapter
        assert any(True for _ in terms(getattr(sdxl, component))), component
    changed = _images(sdxl)
    assert (changed - base).abs().max() > 1e-3
    lora.set_lora_weights(sdxl, {f"xl_{fmt}": 0.0})
    assert torch.equal(_images(sdxl), base)  # weight 0: the base images exactly
    lora.set_lora_weights(sdxl, {f"xl_{fmt}": 0.8})
    assert torch.allclose(_images(sdxl), changed, atol=1e-6)


@pytest.mark.parametrize("component", COMPONENTS)
def test_each_component_alone_changes_the_images(sdxl, tmp_path, component):
    base = _images(sdxl)
    path = tmp_path / f"{component}.safetensors"
    save_lora(_updates(sdxl, (component,)), path, format="kohya")
    lora.load_lora(sdxl, path, weight=1.0)
    assert (_images(sdxl) - base).abs().max() > 1e-4, component
    lora.remove_lora(sdxl)
    assert torch.equal(_images(sdxl), base)


def test_compvis_unet_names_of_kohya_sdxl_files_load(sdxl, tmp_path):
    """kohya's SDXL trainer names the U-Net's modules as the SGM single file does (``input_blocks_4_1_...``,
    ``label_emb_0_0``): the same updates under those names give the same images."""
    updates = _updates(sdxl, ("unet",))["unet"]
    updates["add_embedding.linear_1"] = _random_updates(sdxl.unet.add_embedding, 9, every=1)["linear_1"]
    reference = tmp_path / "reference.safetensors"
    save_lora({"unet": updates}, reference, format="kohya")
    names = unet_key_map(sdxl.unet.config).names
    tensors = {}
    for module, u in updates.items():
        stem = "lora_unet_" + names[f"{module}.weight"].removeprefix(UNET_PREFIX).removesuffix(".weight").replace(
            ".", "_")  # fmt: skip
        tensors |= {f"{stem}.lora_down.weight": u.down, f"{stem}.lora_up.weight": u.up,
                    f"{stem}.alpha": torch.tensor(u.alpha)}  # fmt: skip
    assert "lora_unet_label_emb_0_0.alpha" in tensors
    compvis = tmp_path / "compvis.safetensors"
    save_file(tensors, str(compvis))
    lora.load_lora(sdxl, reference)
    want = _images(sdxl)
    lora.remove_lora(sdxl)
    lora.load_lora(sdxl, compvis)
    assert torch.allclose(_images(sdxl), want, atol=1e-6)


def test_fuse_unfuse_and_removal_on_all_three_components(sdxl, tmp_path):
    base_state, base = _states(sdxl), _images(sdxl)
    path = tmp_path / "xl.safetensors"
    save_lora(_updates(sdxl), path, format="peft")
    lora.load_lora(sdxl, path, weight=0.7)
    unfused = _images(sdxl)
    lora.fuse_lora(sdxl)
    fused_state = _states(sdxl)
    for component in COMPONENTS:  # every component's weights took its updates in
        assert any(not torch.equal(fused_state[k], base_state[k]) for k in base_state if k.startswith(component + "."))
    assert torch.allclose(_images(sdxl), unfused, atol=1e-4)
    lora.unfuse_lora(sdxl)
    for k, v in _states(sdxl).items():
        assert torch.allclose(v, base_state[k], atol=1e-6), k
    lora.fuse_lora(sdxl)
    lora.remove_lora(sdxl)  # removal takes fused updates out first
    assert lora.lora_weights(sdxl) == {}
    for k, v in _states(sdxl).items():
        assert torch.allclose(v, base_state[k], atol=1e-6), k
    assert torch.allclose(_images(sdxl), base, atol=1e-5)


def test_a_written_sdxl_adapter_saves_back_with_all_components(sdxl, tmp_path):
    path = tmp_path / "xl.safetensors"
    save_lora(_updates(sdxl), path, format="kohya")
    lora.load_lora(sdxl, path, name="xl")
    want = _images(sdxl)
    again = tmp_path / "again.safetensors"
    lora.save_lora_file(sdxl, "xl", again, format="peft")
    lora.remove_lora(sdxl)
    lora.load_lora(sdxl, again)
    assert torch.allclose(_images(sdxl), want, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Another model family


def test_an_sd1_lora_on_sdxl_is_refused_as_another_family_and_the_model_is_unchanged(sdxl, sd_folder, tmp_path):
    sd1 = load_pipeline(sd_folder)
    path = tmp_path / "sd1_style.safetensors"
    save_lora(_updates(sd1, ("unet", "text_encoder"), seed=3), path, format="kohya")
    before = _states(sdxl)
    with pytest.raises(WeightsError) as e:
        lora.load_lora(sdxl, path)
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith(str(path)) and "made for another model family" in text
    assert "lora_unet_" in text  # a few of the keys are named
    assert "do not fit the layer" not in text  # not a shape mismatch of one key
    assert lora.lora_weights(sdxl) == {}
    after = _states(sdxl)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    peft = tmp_path / "sd1_peft.safetensors"
    save_lora(_updates(sd1, ("unet",), seed=4), peft, format="peft")
    with pytest.raises(WeightsError, match=r"sd1_peft.safetensors: .*made for another model family.*unet\."):
        lora.load_lora(sdxl, peft)


def test_an_sdxl_lora_on_sd1_is_refused_as_another_family(sdxl, sd_folder, tmp_path):
    sd1 = load_pipeline(sd_folder)
    for components in (("unet",), ("unet", "text_encoder", "text_encoder_2")):
        path = tmp_path / f"xl_{len(components)}.safetensors"
        save_lora(_updates(sdxl, components, seed=5), path, format="kohya")
        before = {k: v.clone() for k, v in sd1.unet.state_dict().items()}
        with pytest.raises(WeightsError, match=rf"^{path}: .*made for another model family") as e:
            lora.load_lora(sd1, path)
        assert "\n" not in str(e.value) and "do not fit the layer" not in str(e.value)
        assert lora.lora_weights(sd1) == {}
        assert all(torch.equal(sd1.unet.state_dict()[k], v) for k, v in before.items())
