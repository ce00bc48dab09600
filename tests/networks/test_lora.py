"""LoRA adapters on Linear / Conv2d layers (diffusekit.networks.lora): the closed form of LoRA eq. (3),
weights, global scale, removal, fuse/unfuse, and that a failed attach changes nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.networks import lora
from diffusekit.networks.layers import Conv2d, Linear
from diffusekit.networks.lora import LowRank


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Tiny(nn.Module):
    """A Linear, a strided 3x3 convolution and a 1x1 convolution, as in a U-Net."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = Linear(6, 5)
        self.conv = Conv2d(3, 4, 3, stride=2, padding=1)
        self.proj = Conv2d(4, 4, 1)
        self.norm = nn.LayerNorm(5)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(v), self.proj(self.conv(x))


def _updates(rank: int = 2, seed: int = 1, alpha: float = 3.0) -> dict[str, LowRank]:
    return {
        "fc": LowRank(_randn(rank, 6, seed=seed), _randn(5, rank, seed=seed + 1), alpha),
        "conv": LowRank(_randn(rank, 3, 3, 3, seed=seed + 2), _randn(4, rank, 1, 1, seed=seed + 3), alpha),
        "proj": LowRank(_randn(rank, 4, seed=seed + 4), _randn(4, rank, seed=seed + 5), alpha),  # 2-D for 1x1
    }


X, V = _randn(2, 3, 8, 8, seed=10), _randn(7, 6, seed=11)


def _expected(model: Tiny, adapters: list[tuple[dict[str, LowRank], float]], scale: float = 1.0):
    """LoRA eq. (3) written out per element with explicit sums (no code under test): merged weights
    W + sum scale * w * alpha / r * sum_k B[:, k] A[k], then plain PyTorch layers."""
    weights = {n: getattr(model, n).weight.detach().clone().double() for n in ("fc", "conv", "proj")}
    for updates, w in adapters:
        for name, u in updates.items():
            a, b = u.down.double(), u.up.double()
            r = a.shape[0]
            delta = torch.zeros_like(weights[name])
            for k in range(r):
                bk = b[:, k].reshape(-1)  # (out,)
                ak = a[k].reshape(weights[name].shape[1:])  # (in[, kh, kw])
                delta += bk.reshape(-1, *([1] * ak.ndim)) * ak.unsqueeze(0)
            weights[name] += scale * w * (u.alpha / r) * delta
    fc = F.linear(V.double(), weights["fc"], model.fc.bias.double())
    h = F.conv2d(X.double(), weights["conv"], model.conv.bias.double(), stride=2, padding=1)
    return fc.float(), F.conv2d(h, weights["proj"], model.proj.bias.double()).float()


def _close(got, want, atol=1e-5):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=1e-5)


def test_adapter_output_is_lora_closed_form_and_a_wrong_rule_is_not():
    model = Tiny()
    lora.attach(model, "a", _updates(), weight=0.7)
    with torch.no_grad():
        got = model(X, V)
    _close(got, _expected(model, [(_updates(), 0.7)]))
    with pytest.raises(AssertionError):  # control: alpha instead of alpha / r is a different result
        _close(got, _expected(model, [({k: LowRank(u.down, u.up, u.alpha * 2) for k, u in _updates().items()}, 0.7)]))


def test_two_adapters_weights_and_scale_change_without_reloading():
    model = Tiny()
    base = [t.clone() for t in model(X, V)]
    a, b = _updates(seed=1), _updates(rank=3, seed=20, alpha=1.0)
    lora.attach(model, "a", a, weight=0.8)
    lora.attach(model, "b", b, weight=-0.5)
    assert lora.adapter_weights(model) == {"a": 0.8, "b": -0.5}
    with torch.no_grad():
        _close(model(X, V), _expected(model, [(a, 0.8), (b, -0.5)]))
        lora.set_weights(model, {"a": 0.2}, scale=0.6)
        _close(model(X, V), _expected(model, [(a, 0.2), (b, -0.5)], scale=0.6))
        lora.set_weights(model, {"a": 0.0, "b": 0.0})
        for got, want in zip(model(X, V), base):
            assert torch.equal(got, want)  # weight 0: the terms are skipped, the base output exactly


def test_detach_restores_the_base_output_and_state_dict_never_changes():
    model = Tiny()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    base = [t.clone() for t in model(X, V)]
    lora.attach(model, "a", _updates())
    assert model.state_dict().keys() == keys.keys()  # adapters are not parameters of the network
    assert not torch.equal(model(X, V)[1], base[1])
    lora.detach(model, "a")
    assert lora.adapter_weights(model) == {}
    for got, want in zip(model(X, V), base):
        assert torch.equal(got, want)
    with pytest.raises(ConfigError, match="no adapter named 'a'"):
        lora.detach(model, "a")


def test_fuse_equals_unfused_and_unfuse_restores_the_weights():
    model = Tiny()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lora.attach(model, "a", _updates(), weight=0.9)
    lora.attach(model, "b", _updates(seed=30), weight=0.4)
    lora.set_weights(model, scale=0.7)
    with torch.no_grad():
        unfused = [t.clone() for t in model(X, V)]
        lora.fuse(model)
        assert all(t.fused for _, _, t in lora.terms(model))
        assert not torch.equal(model.fc.weight, original["fc.weight"])
        _close(model(X, V), unfused)
        # fused layers run as plain layers with the merged weights
        torch.testing.assert_close(model.fc(V), F.linear(V, model.fc.weight, model.fc.bias))
        lora.set_weights(model, {"a": 0.1})  # a fused adapter's weight can change: its merged update follows
        _close(model(X, V), _expected(Tiny(), [(_updates(), 0.1), (_updates(seed=30), 0.4)], scale=0.7))
        lora.unfuse(model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, original[k], atol=1e-6, rtol=0)  # float rounding only
    assert original["norm.weight"].equal(model.norm.weight)


def test_detach_of_a_fused_adapter_takes_its_update_out():
    model = Tiny()
    original = model.fc.weight.detach().clone()
    lora.attach(model, "a", _updates())
    lora.fuse(model)
    lora.detach(model, "a")
    torch.testing.assert_close(model.fc.weight.detach(), original, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"nope": LowRank(torch.ones(2, 6), torch.ones(5, 2), 1.0)}, "'nope': no such module"),
        ({"norm": LowRank(torch.ones(2, 5), torch.ones(5, 2), 1.0)}, "'norm': not a Linear or Conv2d"),
        ({"fc": LowRank(torch.ones(2, 7), torch.ones(5, 2), 1.0)}, r"'fc': shapes down \(2, 7\)"),
        ({"fc": LowRank(torch.ones(2, 6), torch.ones(5, 3), 1.0)}, "'fc': shapes"),
        ({"conv": LowRank(torch.ones(2, 3, 1, 1), torch.ones(4, 2, 1, 1), 1.0)}, "'conv': shapes"),  # kernel
        ({"fc": LowRank(torch.ones(2, 6), torch.ones(5, 2), 0.0)}, "alpha must be a finite number > 0"),
        ({"fc": LowRank(torch.ones(2, 6), torch.ones(5, 2), float("nan"))}, "alpha must be"),
    ],
)
def test_a_failed_attach_leaves_the_model_unchanged(bad, match):
    model = Tiny()
    lora.attach(model, "first", _updates(seed=40))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out_before = [t.clone() for t in model(X, V)]
    updates = {**_updates(), **bad}  # good updates before the bad one
    with pytest.raises(WeightsError, match=match):
        lora.attach(model, "second", updates)
    assert lora.adapter_weights(model) == {"first": 1.0}
    assert all(t.name == "first" for _, _, t in lora.terms(model))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for got, want in zip(model(X, V), out_before):
        assert torch.equal(got, want)


@pytest.mark.parametrize("weight", [float("inf"), float("nan"), 1e9, "1", None])
def test_weights_must_be_finite_numbers(weight):
    model = Tiny()
    with pytest.raises(ConfigError, match="adapter weight"):
        lora.attach(model, "a", _updates(), weight=weight)
    assert lora.adapter_weights(model) == {}
    lora.attach(model, "a", _updates())
    with pytest.raises(ConfigError, match="weight of adapter 'a'"):
        lora.set_weights(model, {"a": weight})
    with pytest.raises(ConfigError, match="no adapter named 'b'"):
        lora.set_weights(model, {"b": 1.0})
    with pytest.raises(ConfigError, match="already attached"):
        lora.attach(model, "a", _updates())


def test_adapters_follow_the_compute_dtype_of_the_layer():
    """bfloat16 weights computed in float32 (the runtime plan): the adapter is stored like the weight
    (bfloat16) and runs in float32 with the layer; only the output is rounded to bfloat16."""
    layer = Linear(6, 5).to(torch.bfloat16)
    layer.compute_dtype = torch.float32
    u = _updates()["fc"]
    lora.attach(layer, "a", {"": u})
    v = V.bfloat16()
    out = layer(v)
    assert out.dtype == torch.bfloat16
    a, b = u.down.bfloat16().float(), u.up.bfloat16().float()
    want = v.float() @ layer.weight.float().T + layer.bias.float() + (u.alpha / 2) * (v.float() @ a.T) @ b.T
    torch.testing.assert_close(out.float(), want, atol=0, rtol=2**-7)  # one bfloat16 rounding


def test_adapters_follow_the_model_through_to_and_back():
    """``model.to(dtype)`` (and every conversion nn.Module routes through ``_apply``) moves the adapters with the
    weights they patch: float32 -> bfloat16 stores them in bfloat16 like the weights (the output is the LoRA closed
    form of the rounded tensors); back to float32 they are float32 again, holding the bfloat16-rounded values,
    as the weights do. The state dict stays the base model's; a trainable term keeps its Parameter objects (an
    optimizer's references stay valid) and their requires_grad."""
    model = Tiny()
    updates = _updates()
    lora.attach(model, "a", updates, weight=0.7)
    keys = set(model.state_dict())
    fc_term = next(t for n, _, t in lora.terms(model) if n == "fc")
    fc_term.up.requires_grad_(True)
    params = [(t.down, t.up) for _, _, t in lora.terms(model)]

    model.to(torch.bfloat16)
    for _, layer, term in lora.terms(model):
        assert term.down.dtype == term.up.dtype == layer.weight.dtype == torch.bfloat16
    rounded = {k: LowRank(u.down.bfloat16().float(), u.up.bfloat16().float(), u.alpha) for k, u in updates.items()}
    base = Tiny().to(torch.bfloat16).float()  # the rounded base weights, in float32
    with torch.no_grad():
        got = model(X.bfloat16(), V.bfloat16())
    for g, want, bare in zip(got, _expected(base, [(rounded, 0.7)]), _expected(base, [])):
        # bfloat16 arithmetic through two layers: within 2 % of the output's scale (the adapter moves it by ~100 %)
        assert (g.float() - want).abs().max() < 0.02 * want.abs().max() < (bare - want).abs().max()

    model.float()
    for (name, _, term), (down, up) in zip(lora.terms(model), params):
        assert term.down is down and term.up is up  # the same Parameters, converted in place
        assert term.down.dtype == term.up.dtype == torch.float32
        r = rounded[name]  # (proj's update is given as 2-D matrices, stored as 1x1 kernels)
        assert torch.equal(term.down, r.down.view_as(term.down)) and torch.equal(term.up, r.up.view_as(term.up))
    assert fc_term.up.requires_grad and not fc_term.down.requires_grad
    with torch.no_grad():
        _close(model(X, V), _expected(model, [(rounded, 0.7)]))
    assert set(model.state_dict()) == keys  # still the base model's keys only

    model.to("meta")  # a device move, without a GPU
    assert all(t.down.device.type == t.up.device.type == "meta" for _, _, t in lora.terms(model))
