"""The OpenVINO engine for a U-Net (pipelines.openvino_unet): same outputs as PyTorch, conversions cached and
redone only when the weights change, clear errors."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from diffusekit.errors import ConfigError, OutputError
from diffusekit.networks.unet import UNet
from diffusekit.pipelines.openvino_unet import IR_NAME, model_digest, use_engine
from diffusekit.training.presets import TRAIN_PRESETS

openvino = pytest.importorskip("openvino")


def _randomised(cfg) -> UNet:
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    with torch.no_grad():  # the output convolution starts at zero: give every weight a random part
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


@pytest.fixture(scope="module")
def text_unet() -> UNet:
    cfg = dataclasses.replace(TRAIN_PRESETS["latent-tiny"], in_channels=4, out_channels=4, sample_size=16,
                              cross_attention_dim=32)  # fmt: skip
    return _randomised(cfg)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino-cache")


def _inputs(batch: int, size: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    return x, torch.full((batch,), 417.5), torch.randn(batch, 7, 32, generator=g)


def test_engine_matches_pytorch_at_every_batch_and_size_from_one_conversion(text_unet, cache):
    use_engine(text_unet, "openvino", cache_dir=cache)
    try:
        for batch, size in ((2, 16), (1, 8), (3, 24)):
            x, t, context = _inputs(batch, size)
            with torch.no_grad():
                expected = text_unet.forward_torch(x, t, context=context)
                got = text_unet(x, t, context=context)
            assert got.shape == expected.shape and got.dtype == torch.float32
            assert expected.abs().max() > 0.1  # a network that computes something
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert text_unet.engine.conversions == 1
        assert len(list(cache.glob(f"*/{IR_NAME}"))) == 1
    finally:
        use_engine(text_unet, "torch")


def test_a_second_engine_reads_the_cached_model_without_converting(text_unet, cache, monkeypatch):
    x, t, context = _inputs(2, 16)
    use_engine(text_unet, "openvino", cache_dir=cache)
    with torch.no_grad():
        first = text_unet(x, t, context=context)
    use_engine(text_unet, "openvino", cache_dir=cache)  # a new engine, as a new process would have

    def refuse(*args, **kwargs):
        raise AssertionError("converted again although the model is in the cache")

    monkeypatch.setattr(openvino, "convert_model", refuse)
    try:
        with torch.no_grad():
            again = text_unet(x, t, context=context)
        assert text_unet.engine.conversions == 0
        assert torch.equal(first, again)
    finally:
        use_engine(text_unet, "torch")


def test_weights_changed_in_place_are_converted_again(cache):
    unet = _randomised(dataclasses.replace(TRAIN_PRESETS["latent-tiny"], in_channels=4, out_channels=4,
                                           sample_size=16, cross_attention_dim=32))  # fmt: skip
    use_engine(unet, "openvino", cache_dir=cache)
    x, t, context = _inputs(2, 16)
    with torch.no_grad():
        before = unet(x, t, context=context)
        unet.conv_out.bias.add_(1.0)  # as fusing a LoRA would: the same tensor, new values
        after = unet(x, t, context=context)
        expected = unet.forward_torch(x, t, context=context)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after, before + 1.0, rtol=1e-4, atol=1e-4)
    assert len(unet.engine._compiled) == 1  # the model of the old weights is let go, not kept beside the new one


def test_class_labels_and_a_damaged_cache(cache):
    cfg = dataclasses.replace(TRAIN_PRESETS["test-tiny"], in_channels=1, out_channels=1, sample_size=8,
                              num_classes=3)  # fmt: skip
    unet = _randomised(cfg)
    use_engine(unet, "openvino", cache_dir=cache / "classes")
    x, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 2, 1])
    with torch.no_grad():
        expected = unet.forward_torch(x, torch.tensor([5.0, 5.0, 5.0]), class_labels=labels)
        torch.testing.assert_close(unet(x, 5, class_labels=labels), expected, rtol=1e-4, atol=1e-4)
        (ir,) = (cache / "classes").glob(f"*/{IR_NAME}")
        ir.write_text("<net")  # a model file cut short, as by a crash or a full disk
        use_engine(unet, "openvino", cache_dir=cache / "classes")
        torch.testing.assert_close(unet(x, 5, class_labels=labels), expected, rtol=1e-4, atol=1e-4)
    assert unet.engine.conversions == 1


def test_bfloat16_model_returns_bfloat16_close_to_pytorch(text_unet, cache):
    unet = _randomised(text_unet.config).to(torch.bfloat16)
    use_engine(unet, "openvino", cache_dir=cache)
    x, t, context = _inputs(2, 16)
    with torch.no_grad():
        got = unet(x.bfloat16(), t, context=context.bfloat16())
        expected = unet.forward_torch(x.bfloat16(), t, context=context.bfloat16())
    assert got.dtype == torch.bfloat16
    scale = expected.float().abs().max()
    assert (got.float() - expected.float()).abs().max() < 0.05 * scale
    # its IR keeps the weights in float16 (exact for bf16 values): 2 bytes a parameter, not float32's 4
    weights = (cache / model_digest(unet, ("context",)) / IR_NAME).with_suffix(".bin").stat().st_size
    assert 1.9 < weights / sum(p.numel() for p in unet.parameters()) < 2.3


def test_gradients_go_through_pytorch(text_unet, cache):
    use_engine(text_unet, "openvino", cache_dir=cache)
    try:
        x, t, context = _inputs(1, 8)
        x.requires_grad_(True)
        text_unet(x, t, context=context).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
    finally:
        use_engine(text_unet, "torch")


def test_bad_engine_names_and_missing_package(text_unet, monkeypatch):
    with pytest.raises(ConfigError, match=r"--engine='tensorrt'.*'torch', 'openvino'"):
        use_engine(text_unet, "tensorrt")
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'diffusekit\[engines\]'"):
        use_engine(text_unet, "openvino")
    assert text_unet.engine is None


def test_a_cache_folder_that_cannot_be_made_is_an_output_error(text_unet, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match=r"cannot be created .*DIFFUSEKIT_CACHE"):
        use_engine(text_unet, "openvino", cache_dir=blocker / "cache")
    assert text_unet.engine is None


@pytest.mark.slow  # two conversions, ~9 s: run by hand (pytest -m slow) when the engine or the adapters change
def test_lora_adapters_attached_and_reweighted_follow_into_the_engine(cache):
    from diffusekit.networks import lora

    unet = _randomised(dataclasses.replace(TRAIN_PRESETS["latent-tiny"], in_channels=4, out_channels=4,
                                           sample_size=16, cross_attention_dim=32))  # fmt: skip
    g = torch.Generator().manual_seed(5)
    layer = unet.get_submodule("conv_in")
    update = lora.LowRank(down=torch.randn(2, 4, 3, 3, generator=g), up=torch.randn(layer.out_channels, 2, 1, 1,
                          generator=g), alpha=2.0)  # fmt: skip
    use_engine(unet, "openvino", cache_dir=cache / "lora")
    x, t, context = _inputs(2, 16)
    with torch.no_grad():
        plain = unet.forward_torch(x, t, context=context)
        lora.attach(unet, "style", {"conv_in": update}, weight=1.0)
        for step in ("attached", "reweighted"):  # fusing changes weights in place: the test above
            if step == "reweighted":
                lora.set_weights(unet, {"style": 0.5})
            got, expected = unet(x, t, context=context), unet.forward_torch(x, t, context=context)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            assert (got - plain).abs().max() > 1e-3  # the adapter changes the output
    assert unet.engine.conversions == 2


def test_the_library_and_the_command_line_import_openvino_only_for_the_engine():
    import subprocess

    code = ("import sys, diffusekit.cli.main, diffusekit.pipelines.openvino_unet, diffusekit.pipelines.loading\n"
            "sys.exit('openvino' in sys.modules)")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr or "openvino was imported"
