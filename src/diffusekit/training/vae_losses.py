"""The losses of the KL-regularised autoencoder (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", sec. 3 and Appendix G).

Appendix G trains the encoder E and decoder D with

    L_Autoencoder = min_{E,D} max_psi ( L_rec(x, D(E(x))) - L_adv(D(E(x))) + log D_psi(x) + L_reg(x; E, D) )

where L_reg is a KL penalty towards a standard normal, weighted "by a factor ~10^-6" relative to the
reconstruction loss summed over pixels. Here the whole objective is divided by the number of pixel values
C*H*W of an image, so the logged reconstruction loss reads as a per-pixel error; the minimiser and the
weighting between the terms are the paper's (``kl_weight`` multiplies the KL summed over the latent, exactly
as the paper's factor does).

The perceptual (LPIPS) term of the paper needs pretrained VGG weights, which this project cannot download;
it is not offered. The adversarial term (a PatchGAN discriminator with the hinge loss and the adaptive
weight of Esser et al. 2021, "Taming Transformers", eq. 7) is in ``diffusekit.training.vae_adversarial``.
"""

from __future__ import annotations

from torch import Tensor

from diffusekit.errors import ConfigError
from diffusekit.networks.vae import DiagonalGaussian

RECONSTRUCTION_LOSSES = ("l1", "l2")


def reconstruction_loss(x_hat: Tensor, x: Tensor, kind: str) -> Tensor:
    """Per-pixel reconstruction error per image (B,): mean |x_hat - x| (``l1``) or mean (x_hat - x)^2
    (``l2``) over the C*H*W values of each image."""
    diff = (x_hat.float() - x.float()).flatten(1)  # (B, C*H*W)
    if kind == "l1":
        return diff.abs().mean(dim=1)
    if kind == "l2":
        return diff.pow(2).mean(dim=1)
    raise ConfigError(f"loss.reconstruction={kind!r} is not supported; allowed values: 'l1', 'l2'")


def vae_loss(
    x_hat: Tensor, x: Tensor, posterior: DiagonalGaussian, *, kind: str, kl_weight: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, rec, kl): the batch means of L_rec + kl_weight * L_reg (both per pixel, see the module
    docstring), of L_rec alone and of the summed KL per image (for logging)."""
    rec = reconstruction_loss(x_hat, x, kind)  # (B,)
    kl = posterior.kl().float()  # (B,)
    pixels = x[0].numel()
    loss = rec.mean() + kl_weight * kl.mean() / pixels
    return loss, rec.mean(), kl.mean()
