"""The CLIP text transformer (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", sec. 2.4), as Stable Diffusion uses it for its ``context`` (cross-attention) conditioning.

A GPT-2-style causal transformer: token + learned position embeddings, pre-LayerNorm blocks
(``x += attn(ln1(x))``, ``x += mlp(ln2(x))``) with causal self-attention, and a final LayerNorm. The pooled
feature is the final state at the first end-of-text token; the projection-headed variant (OpenCLIP's text
tower as SDXL's second encoder uses it) maps it by a bias-free ``text_projection`` to the joint image-text
embedding space (Radford et al. 2021, sec. 2.5: ``T_e = l2_normalize(T_f W_t)``, here without the
normalisation, as SDXL conditions on it).

The reference's ``config.json`` (``CLIPTextModel``) is translated to and from :class:`TextEncoderConfig` at
the boundary, in ``diffusekit.io.text_encoder_config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffusekit.errors import ConfigError, check_choice
from diffusekit.limits import MAX_POSITIONS, MAX_TEXT_LAYERS, MAX_VOCAB, MAX_WIDTH, check_int, translating
from diffusekit.networks.config_dict import config_from_dict, config_to_dict
from diffusekit.networks.layers import LayerNorm, Linear

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class TextEncoderConfig:
    """Sizes of a CLIP text transformer. Defaults: the SD-1.x encoder (CLIP ViT-L/14's text tower).
    ``projection_dim``: width of the pooled feature's bias-free projection (the reference's
    ``CLIPTextModelWithProjection``); None: no projection."""

    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_size: int = 3072
    max_positions: int = 77
    activation: str = "quick_gelu"  # quick_gelu (OpenAI CLIP) | gelu (exact erf GELU, OpenCLIP)
    layer_norm_eps: float = 1e-5
    bos_id: int = 49406
    eos_id: int = 49407  # pooling position = first occurrence of this id
    pad_id: int = 49407  # informational: no padding mask is used (as in SD)
    projection_dim: int | None = None

    def __post_init__(self) -> None:
        _check_sizes(self)
        check_choice("activation", self.activation, ACTIVATIONS)
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if not (isinstance(self.layer_norm_eps, (int, float)) and 0 < self.layer_norm_eps < 1):
            raise ConfigError(f"layer_norm_eps must be a number in (0, 1), got {self.layer_norm_eps!r}")
        for name in ("bos_id", "eos_id", "pad_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name} must be an integer in [0, {self.vocab_size}), got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    @translating("text encoder config")
    def from_dict(cls, d: dict[str, Any]) -> TextEncoderConfig:
        return config_from_dict(cls, d)


def _check_sizes(c: TextEncoderConfig) -> None:
    """Refuse sizes beyond ``diffusekit.limits`` (and values of the wrong type) before any module is built."""
    check_int("vocab_size", c.vocab_size, 1, MAX_VOCAB)
    for name in ("hidden_size", "mlp_size", "num_heads"):
        check_int(name, getattr(c, name), 1, MAX_WIDTH)
    check_int("num_layers", c.num_layers, 1, MAX_TEXT_LAYERS)
    check_int("max_positions", c.max_positions, 1, MAX_POSITIONS)
    if c.projection_dim is not None:
        check_int("projection_dim", c.projection_dim, 1, MAX_WIDTH)


# Named sizes. "sd1": OpenAI CLIP ViT-L/14 text tower (SD-1.x). "sd2": OpenCLIP ViT-H/14 text tower as SD-2.x
# uses it: 24 layers trained, the last dropped (SD-2.x conditions on the penultimate layer), GELU; its
# tokenizer pads with "!" (id 0).
TEXT_ENCODER_PRESETS: dict[str, TextEncoderConfig] = {
    "sd1": TextEncoderConfig(),
    "sd2": TextEncoderConfig(hidden_size=1024, num_layers=23, num_heads=16, mlp_size=4096, activation="gelu", pad_id=0),
    "tiny": TextEncoderConfig(
        vocab_size=1000,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        mlp_size=37,
        bos_id=998,
        eos_id=999,
        pad_id=999,
    ),
}


@dataclass(frozen=True)
class TextEncoderOutput:
    """``last_hidden_state`` (B, L, D) after the final LayerNorm: SD's cross-attention context.
    ``pooled`` (B, D): ``last_hidden_state`` at each row's first EOS (position 0 if a row has none).
    ``hidden_states`` (N + 1, B, L, D): the embedding output and each computed layer's output, before the
    final LayerNorm. ``text_embeds`` (B, projection_dim): ``text_projection(pooled)`` for an encoder with a
    projection, else None."""

    last_hidden_state: torch.Tensor
    pooled: torch.Tensor
    hidden_states: torch.Tensor = field(repr=False)
    text_embeds: torch.Tensor | None = None

    @property
    def pooler_output(self) -> torch.Tensor:  # the reference's name for ``pooled``
        return self.pooled


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)``, the GELU approximation OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = Linear(cfg.hidden_size, cfg.hidden_size)
        self.k = Linear(cfg.hidden_size, cfg.hidden_size)
        self.v = Linear(cfg.hidden_size, cfg.hidden_size)
        self.out = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        # (B, L, D) -> (B, heads, L, head_dim)
        q, k, v = (proj(x).view(B, L, self.num_heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # softmax(QK^T/sqrt(d) + causal) V
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.fc1 = Linear(cfg.hidden_size, cfg.mlp_size)
        self.fc2 = Linear(cfg.mlp_size, cfg.hidden_size)
        self.act = quick_gelu if cfg.activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClipTextEncoder(nn.Module):
    """CLIP text transformer: ``encoder(input_ids (B, L)) -> TextEncoderOutput`` (Radford et al. 2021)."""

    def __init__(self, config: TextEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or TextEncoderConfig()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.text_projection = (
            Linear(cfg.hidden_size, cfg.projection_dim, bias=False) if cfg.projection_dim is not None else None
        )
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """CLIP's initialisation (its ``initialize_parameters``): normal embeddings, projections scaled by
        width and depth, LayerNorms at identity, zero biases."""
        cfg = self.config
        if self.token_embedding.weight.is_meta:
            return
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.01)
        attn_std = cfg.hidden_size**-0.5
        proj_std = attn_std * (2 * cfg.num_layers) ** -0.5
        fc_std = (2 * cfg.hidden_size) ** -0.5
        for block in self.blocks:
            for lin in (block.attn.q, block.attn.k, block.attn.v):
                nn.init.normal_(lin.weight, std=attn_std)
            nn.init.normal_(block.attn.out.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
        if self.text_projection is not None:
            nn.init.normal_(self.text_projection.weight, std=attn_std)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(input_ids, torch.Tensor):
            raise ConfigError(f"input_ids must be a tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ConfigError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}")
        if input_ids.ndim != 2:
            raise ConfigError(f"input_ids must have shape (batch, length), got shape {tuple(input_ids.shape)}")
        if not 1 <= input_ids.shape[1] <= cfg.max_positions:
            raise ConfigError(
                f"input_ids length {input_ids.shape[1]} must be in [1, max_positions={cfg.max_positions}]"
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size):
            raise ConfigError(
                f"input_ids must lie in [0, vocab_size={cfg.vocab_size}), got values in "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )

    def forward(self, input_ids: torch.Tensor, *, clip_skip: int = 0) -> TextEncoderOutput:
        """Encode ``input_ids`` (B, L) int64, L <= max_positions.

        ``clip_skip=k`` stops after ``num_layers - k`` layers (``k=1``: the penultimate layer, as SD-2.x and
        "clip skip 2" in other tools use it); the final LayerNorm is applied to that layer's output.
        """
        self._check_ids(input_ids)
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip < len(self.blocks):
            raise ConfigError(f"clip_skip must be an integer in [0, {len(self.blocks) - 1}], got {clip_skip!r}")
        B, L = input_ids.shape
        positions = torch.arange(L, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)  # (B, L, D)
        states = [x]
        for block in self.blocks[: len(self.blocks) - clip_skip]:
            x = block(x)
            states.append(x)
        h = self.final_norm(x)  # (B, L, D)
        eos_at = (input_ids == self.config.eos_id).int().argmax(dim=1)  # first EOS per row, (B,)
        pooled = h[torch.arange(B, device=h.device), eos_at]  # (B, D)
        embeds = self.text_projection(pooled) if self.text_projection is not None else None  # (B, projection_dim)
        return TextEncoderOutput(
            last_hidden_state=h, pooled=pooled, hidden_states=torch.stack(states), text_embeds=embeds
        )

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return "" if self.token_embedding.weight.is_meta else f"params={self.num_parameters:,}"


__all__ = [
    "ACTIVATIONS",
    "TEXT_ENCODER_PRESETS",
    "ClipTextEncoder",
    "TextEncoderConfig",
    "TextEncoderOutput",
    "quick_gelu",
]
