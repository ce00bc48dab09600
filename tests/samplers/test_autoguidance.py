"""Autoguidance (Karras et al. 2024, eq. 2): the mix with the guiding model, the pipeline with and without classes,
and the guide's compatibility checks."""

from __future__ import annotations

import copy

import pytest
import torch

from diffusekit.errors import ConfigError
from diffusekit.networks.unet import UNet, UNetConfig
from diffusekit.pipelines.unconditional import UnconditionalPipeline
from diffusekit.samplers.config import SamplerConfig
from diffusekit.samplers.guidance import autoguided


def constant_networks(seen: list) -> tuple:
    """A model that outputs 3 and a guide that outputs 1, both noting the labels they were called with."""

    def network(x, t, label):
        seen.append(("model", label.tolist()))
        return x * 0 + 3.0

    def guide(x, t, label):
        seen.append(("guide", label.tolist()))
        return x * 0 + 1.0

    return network, guide


def test_the_output_extrapolates_from_the_guide_toward_the_model_with_the_same_conditioning():
    seen = []
    network, guide = constant_networks(seen)
    label = torch.tensor([4, 5])
    model = autoguided(network, guide, 2.5, {"label": label}, gate=lambda t: float(t) > 0)
    x = torch.zeros(2, 1)
    assert torch.equal(model(x, torch.tensor(1.0)), torch.full((2, 1), 6.0))  # 1 + 2.5 (3 - 1)
    assert torch.equal(model(x, torch.tensor(-1.0)), torch.full((2, 1), 3.0))  # outside the gate: the model alone
    assert seen == [("model", [4, 5]), ("guide", [4, 5]), ("model", [4, 5])]
    with pytest.raises(ConfigError, match="guidance_scale"):
        autoguided(network, guide, float("nan"), {})


def unet(num_classes: int | None, seed: int) -> UNet:
    torch.manual_seed(seed)
    cfg = UNetConfig(in_channels=1, out_channels=1, channels=(8, 8), layers_per_block=1,
                     attention_levels=(False, False), mid_attention=False, num_heads=(1, 1), num_classes=num_classes,
                     norm_groups=4, sample_size=8)  # fmt: skip
    net = UNet(cfg).eval()
    with torch.no_grad():  # a fresh U-Net's zero-initialised output layer would make every mix equal
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


def draw(pipe, guidance, guide, labels=None):
    return pipe(2, steps=4, class_labels=labels, guidance_scale=guidance, guide=guide,
                generator=torch.Generator().manual_seed(3), show_progress=False)  # fmt: skip


@pytest.mark.parametrize("num_classes", [None, 3])
def test_a_guide_equal_to_the_model_changes_nothing_and_a_weaker_one_does(num_classes):
    net = unet(num_classes, 0)
    pipe = UnconditionalPipeline(net, SamplerConfig(sampler="heun", preconditioning="edm"))
    labels = None if num_classes is None else [0, 1]
    alone = draw(pipe, 1.0, None, labels)
    assert torch.equal(draw(pipe, 2.0, copy.deepcopy(net), labels), alone)  # eq. 2 with D_0 = D_1 is D_1
    weaker = copy.deepcopy(net)
    with torch.no_grad():
        for p in weaker.parameters():
            p.mul_(0.9)
    guided = draw(pipe, 2.0, weaker, labels)
    assert not torch.allclose(guided, alone)
    if num_classes is not None:  # and it is not classifier-free guidance
        assert not torch.allclose(guided, draw(pipe, 2.0, None, labels))


def test_a_guide_of_another_model_is_refused():
    pipe = UnconditionalPipeline(unet(3, 0), SamplerConfig())
    with pytest.raises(ConfigError, match="num_classes is 4, the model's is 3"):
        draw(pipe, 2.0, unet(4, 1), [0, 1])


def test_the_guide_can_have_its_own_conditioning():
    seen = []
    network, guide = constant_networks(seen)
    model = autoguided(network, guide, 2.0, {"label": torch.tensor([4, 5])}, guide_cond={"label": torch.tensor([9, 9])})
    assert torch.equal(model(torch.zeros(2, 1), torch.tensor(1.0)), torch.full((2, 1), 5.0))
    assert seen == [("model", [4, 5]), ("guide", [9, 9])]


def test_a_guide_given_no_class_is_the_guide_with_the_no_class_label():
    net, guide = unet(3, 0), unet(3, 1)
    pipe = UnconditionalPipeline(net, SamplerConfig(sampler="heun", preconditioning="edm"))
    seen = []
    hook = guide.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["class_labels"].tolist()),
                                           with_kwargs=True)  # fmt: skip
    none = pipe(2, steps=4, class_labels=[0, 1], guidance_scale=2.0, guide=guide, guide_labels="none",
                generator=torch.Generator().manual_seed(3), show_progress=False)  # fmt: skip
    hook.remove()
    assert seen and all(labels == [2, 2] for labels in seen)  # the "no class" id is the last one
    assert not torch.allclose(none, draw(pipe, 2.0, guide, [0, 1]))  # the class-seeing guide differs
    # the same as a guide network that always gets the "no class" label
    class NoClass(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m, self.config = guide, guide.config

        def forward(self, x, t, class_labels):
            return self.m(x, t, class_labels=torch.full_like(class_labels, 2))

    assert torch.equal(none, draw(pipe, 2.0, NoClass(), [0, 1]))


@pytest.mark.parametrize(
    ("num_classes", "guide", "labels", "match"),
    [(3, True, "some", "guide_labels must be one of class, none"), (3, False, "none", "autoguidance only"),
     (None, True, "none", "needs a class-conditional model")],
)  # fmt: skip
def test_guide_labels_are_checked(num_classes, guide, labels, match):
    pipe = UnconditionalPipeline(unet(num_classes, 0), SamplerConfig())
    with pytest.raises(ConfigError, match=match):
        pipe(2, steps=2, guidance_scale=2.0, guide=unet(num_classes, 1) if guide else None, guide_labels=labels,
             show_progress=False)  # fmt: skip
