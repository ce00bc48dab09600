"""The fast 3x3 convolution paths (Winograd F(4x4, 3x3) and im2col) against torch's direct convolution, and
their wiring into ``runtime.policy.prepare``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusekit.networks.layers import Conv2d
from diffusekit.runtime import fastconv
from diffusekit.runtime.policy import Plan, prepare, use_fast_conv, use_native_compute


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    ("n", "c", "co", "h", "w", "bias", "channels_last"),
    [
        (1, 8, 5, 8, 8, True, True),  # whole tiles
        (2, 3, 4, 7, 10, False, False),  # partial tiles in both directions, NCHW input
        (1, 16, 16, 1, 1, True, True),  # a single pixel
        (3, 6, 9, 13, 5, True, False),
    ],
)
def test_winograd_matches_direct_convolution(n, c, co, h, w, bias, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(co, c, 3, 3, generator=g)
    b = torch.randn(co, generator=g) if bias else None
    ref = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), padding=1)
    y = fastconv.winograd_conv3x3(x, weight, b)
    assert y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last)
    # float32 Winograd F(4x4,3x3) loses about one digit: 1e-5 relative; a wrong transform is off by O(1).
    assert _rel_err(y.double(), ref) < 5e-5
    # and in float64 it is exact to rounding, so the transforms themselves are right
    y64 = fastconv.winograd_conv3x3(x.double(), weight.double(), None if b is None else b.double())
    assert _rel_err(y64, ref) < 1e-12


@pytest.mark.parametrize("tile_rows", [1, 3, 10])  # bands of one image (1, 3 of 5 rows) or 2 whole images (10)
def test_winograd_chunks_agree_with_one_pass(monkeypatch, tile_rows):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 19, 12, generator=g, dtype=torch.float64)  # 5 x 3 tiles per image, the last row partial
    weight = torch.randn(3, 4, 3, 3, generator=g, dtype=torch.float64)
    whole = fastconv.winograd_conv3x3(x, weight)
    row_bytes = 36 * 3 * 4 * 8  # 36 x tiles per row x max(C_in, C_out) x bytes
    monkeypatch.setattr(fastconv, "CHUNK_BYTES", tile_rows * row_bytes)
    chunked = fastconv.winograd_conv3x3(x, weight)
    assert _rel_err(chunked, whole) < 1e-12
    assert _rel_err(chunked, F.conv2d(x, weight, padding=1)) < 1e-12


@pytest.mark.parametrize(("n", "c", "co", "h", "w"), [(2, 12, 7, 8, 8), (1, 5, 3, 3, 9)])
def test_gemm_matches_direct_convolution(n, c, co, h, w):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, c, h, w, generator=g).to(memory_format=torch.channels_last)
    weight = torch.randn(co, c, 3, 3, generator=g)
    b = torch.randn(co, generator=g)
    ref = F.conv2d(x, weight, b, padding=1)
    for wt in (weight, weight.to(memory_format=torch.channels_last)):
        y = fastconv.gemm_conv3x3(x, wt, b)
        assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(fastconv.gemm_conv3x3(x, weight), F.conv2d(x, weight, padding=1), atol=1e-5)


def test_fast_paths_refuse_mismatched_weights():
    with pytest.raises(ValueError, match="winograd_conv3x3: weight must be"):
        fastconv.winograd_conv3x3(torch.zeros(1, 4, 8, 8), torch.zeros(2, 3, 3, 3))
    with pytest.raises(ValueError, match="gemm_conv3x3: weight must be"):
        fastconv.gemm_conv3x3(torch.zeros(1, 4, 8, 8), torch.zeros(2, 4, 1, 1))


def test_choose_takes_fast_paths_only_where_they_apply():
    wide = torch.zeros(256, 256, 3, 3)
    x = torch.zeros(2, 256, 32, 32)  # 128 tiles
    assert fastconv.choose(x, wide) == "winograd"
    assert fastconv.choose(torch.zeros(1, 256, 8, 8), wide) is None  # 4 tiles: the direct one is faster
    assert fastconv.choose(torch.zeros(2, 1280, 8, 8), torch.zeros(1280, 1280, 3, 3)) == "gemm"
    assert fastconv.choose(torch.zeros(2, 64, 64, 64), torch.zeros(64, 64, 3, 3)) is None  # narrow
    narrow = torch.zeros(128, 128, 3, 3)  # 128 channels need twice the tiles that 256 do
    assert fastconv.choose(torch.zeros(2, 128, 32, 32), narrow) is None
    assert fastconv.choose(torch.zeros(16, 128, 16, 16), narrow) == "winograd"
    # few tiles for the output width: the transformed filters would outweigh the tiles
    assert fastconv.choose(torch.zeros(2, 1280, 32, 32), torch.zeros(1280, 1280, 3, 3)) is None
    assert fastconv.choose(x, wide, stride=2) is None
    assert fastconv.choose(x, wide, padding=0) is None
    assert fastconv.choose(x, wide, dilation=2) is None
    assert fastconv.choose(x, torch.zeros(256, 128, 3, 3), groups=2) is None
    assert fastconv.choose(x, torch.zeros(256, 256, 1, 1)) is None
    assert fastconv.choose(x.bfloat16(), wide.bfloat16()) is None
    assert fastconv.choose(x.double(), wide.double()) is None
    with torch.enable_grad():  # training: Winograd (it has a backward pass), not im2col
        assert fastconv.choose(x, wide.requires_grad_()) == "winograd"
        assert fastconv.choose(torch.zeros(2, 1280, 8, 8), torch.zeros(1280, 1280, 3, 3).requires_grad_()) is None


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = Conv2d(256, 256, 3, padding=1)  # 8 x 4 x 4 = 128 tiles at 16x16: Winograd
        self.b = Conv2d(256, 256, 1)
        self.c = Conv2d(256, 256, 3, padding=1, padding_mode="reflect")  # not zero padding: direct

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


def _count_paths(monkeypatch) -> dict[str, int]:
    calls = {"winograd": 0, "gemm": 0}
    for name in calls:
        original = getattr(fastconv, f"{name}_conv3x3")

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(fastconv, f"{name}_conv3x3", counted)
    return calls


def test_prepare_routes_wide_convolutions_through_winograd(monkeypatch):
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(8, 256, 16, 16)
    with torch.no_grad():
        ref = net(x)
    calls = _count_paths(monkeypatch)
    prepare(net, Plan(dtype=torch.float32))  # CPU inference: fast convolutions on by default
    with torch.inference_mode():
        y = net(x)
    assert calls == {"winograd": 1, "gemm": 0}
    assert _rel_err(y, ref) < 5e-5

    use_fast_conv(net, enabled=False)
    with torch.inference_mode():
        assert torch.allclose(net(x), ref, atol=1e-5)
    assert calls["winograd"] == 1


def test_fast_conv_off_when_asked(monkeypatch):
    calls = _count_paths(monkeypatch)
    net = prepare(_Net(), Plan(dtype=torch.float32, fast_conv=False))
    with torch.no_grad():
        net(torch.randn(8, 256, 16, 16))
    assert calls == {"winograd": 0, "gemm": 0}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's import of torch.jit
def test_fast_conv_left_to_inductor_when_compiling():
    compiled = prepare(_Net(), Plan(dtype=torch.float32, compile=True))  # compiles lazily: nothing runs here
    assert not compiled.a.fast  # inductor chooses its own kernels


def test_training_gradients_match_the_direct_convolution(monkeypatch):
    torch.manual_seed(0)
    ref_net = _Net()
    net = _Net()
    net.load_state_dict(ref_net.state_dict())
    prepare(net, Plan(dtype=torch.float32, inference=False))
    calls = _count_paths(monkeypatch)
    x = torch.randn(8, 256, 16, 16)
    x_ref, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    target = torch.randn(8, 256, 16, 16)
    F.mse_loss(ref_net(x_ref), target).backward()
    F.mse_loss(net(x_fast), target).backward()
    assert calls["winograd"] == 2  # the forward pass and the input gradient of net.a
    assert _rel_err(x_fast.grad, x_ref.grad) < 1e-4
    for (name, p), p_ref in zip(net.named_parameters(), ref_net.parameters(), strict=True):
        assert _rel_err(p.grad, p_ref.grad) < 1e-4, name


def test_fast_conv_composes_with_float32_compute_for_bf16_storage(monkeypatch):
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(8, 256, 16, 16)
    with torch.no_grad():
        ref = net.to(torch.bfloat16).float()(x)  # the same bf16-rounded weights in float32
    calls = _count_paths(monkeypatch)
    prepare(net, Plan(dtype=torch.bfloat16, float32_compute=True))
    with torch.inference_mode():
        y = net(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert calls["winograd"] == 1
    assert _rel_err(y.float(), ref) < 1e-2  # bf16 rounding of the activations between layers
    use_native_compute(net)  # back to native bf16 compute; the fast-conv flag stays but bf16 is not eligible
    assert net.a.fast and net.a.compute_dtype is None
    calls["winograd"] = 0
    with torch.inference_mode():
        assert net(x.bfloat16()).dtype == torch.bfloat16
    assert calls["winograd"] == 0


@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_winograd_weight_grad_matches_autograd(monkeypatch, chunk_bytes):
    if chunk_bytes is not None:
        monkeypatch.setattr(fastconv, "CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 11, 9, generator=g, dtype=torch.float64, requires_grad=True)  # partial tiles
    weight = torch.randn(4, 5, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 4, 11, 9, generator=g, dtype=torch.float64)
    F.conv2d(x, weight, padding=1).backward(dy)
    dw = fastconv.winograd_weight_grad(x.detach(), dy)
    assert dw.shape == weight.shape
    assert _rel_err(dw, weight.grad) < 1e-12


def test_environment_switch_turns_the_fast_paths_off(monkeypatch):
    x, wide = torch.zeros(2, 256, 32, 32), torch.zeros(256, 256, 3, 3)
    assert fastconv.choose(x, wide) == "winograd"
    monkeypatch.setattr(fastconv, "ENABLED", False)
    assert fastconv.choose(x, wide) is None
    assert fastconv.choose(torch.zeros(2, 1280, 8, 8), torch.zeros(1280, 1280, 3, 3)) is None


def test_environment_switch_is_read_once_at_import():
    code = "from diffusekit.runtime import fastconv; print(fastconv.ENABLED)"
    for value, expected in (("0", "False"), ("1", "True")):
        env = {**os.environ, "DIFFUSEKIT_FAST_CONV": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


def test_plan_sets_plain_attributes_and_replaces_no_method():
    net = prepare(_Net(), Plan(dtype=torch.bfloat16, float32_compute=True))
    for m in net.modules():
        assert "forward" not in m.__dict__  # what runs is the class's forward
    assert net.a.fast and not net.b.fast  # 3x3 only
    assert net.a.compute_dtype == torch.float32
    assert set(net.state_dict()) == set(_Net().state_dict())  # state-dict keys unchanged
