"""The optional adversarial term of autoencoder training (Rombach et al. 2022, Appendix G, after Esser et al.
2021, "Taming Transformers for High-Resolution Image Synthesis", sec. 3.2).

A patch-based discriminator D_psi (PatchGAN, Isola et al. 2017, "Image-to-Image Translation with Conditional
Adversarial Networks", sec. 3.2.2) scores overlapping patches of an image as real or reconstructed. It is
trained with the hinge loss (Lim & Ye 2017; Miyato et al. 2018, eq. 14), the autoencoder with the generator
loss -D(x_hat) weighted adaptively (Esser et al. 2021, eq. 7)

    lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta)

with G_L the decoder's last layer, so that neither term overwhelms the other; the term starts only after
``loss.adversarial_start`` steps, once reconstructions are reasonable.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusekit.networks.blocks import init_weights

ADAPTIVE_DELTA = 1e-4  # delta of Esser et al. 2021, eq. 7
MAX_ADAPTIVE_WEIGHT = 1e4  # the clamp of lambda (a vanishing GAN gradient would otherwise give any value)


class PatchDiscriminator(nn.Module):
    """Image (B, C, H, W) -> a map of real/fake logits (B, 1, h, w), one per overlapping patch.

    ``layers`` stride-2 4x4 convolutions (channels doubling from ``channels``, at most 8x), a stride-1 4x4
    convolution and a 4x4 convolution to one channel, with LeakyReLU(0.2) (Isola et al. 2017). GroupNorm
    replaces the original BatchNorm, so the score of an image does not depend on the rest of its batch (nor
    on how DDP splits a batch across processes).
    """

    def __init__(self, in_channels: int, channels: int = 64, layers: int = 3, norm_groups: int = 8) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [
                nn.Conv2d(ch, out, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(min(norm_groups, out), out),
                nn.LeakyReLU(0.2),
            ]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*mods)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 1, h, w)


def patch_map_size(image_size: int, layers: int) -> int:
    """The side of :class:`PatchDiscriminator`'s logit map for ``image_size`` x ``image_size`` images: each
    stride-2 4x4 convolution (padding 1) halves it (rounding down), each stride-1 one takes one away."""
    n = image_size
    for _ in range(layers):  # the first convolution and layers - 1 of the deeper ones have stride 2
        n //= 2
    return n - 2  # the stride-1 convolution and the output convolution


def discriminator_hinge_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """E[max(0, 1 - D(x))] + E[max(0, 1 + D(x_hat))] (hinge loss; Miyato et al. 2018, eq. 14), halved as
    in Esser et al. 2021's implementation so each half is the mean over its images."""
    return 0.5 * (torch.relu(1.0 - logits_real.float()).mean() + torch.relu(1.0 + logits_fake.float()).mean())


def generator_loss(logits_fake: Tensor) -> Tensor:
    """The autoencoder's adversarial loss -E[D(x_hat)] (hinge-GAN generator loss)."""
    return -logits_fake.float().mean()


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor) -> Tensor:
    """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + delta) (Esser et al. 2021, eq. 7), clamped to
    [0, 1e4] and detached (it scales the loss, it is not trained). Both gradients are taken with respect to
    ``last_layer`` (the decoder's output convolution weight), keeping the graph for the real backward pass."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = g_rec.norm() / (g_gan.norm() + ADAPTIVE_DELTA)
    return weight.clamp(0.0, MAX_ADAPTIVE_WEIGHT).detach()
