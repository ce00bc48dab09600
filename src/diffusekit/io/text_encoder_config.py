"""The reference's ``CLIPTextModel`` ``config.json`` (the ``text_encoder/`` folder of a diffusers pipeline)
<-> our :class:`TextEncoderConfig`. A ``CLIPTextModelWithProjection`` config (SDXL's ``text_encoder_2/``, told by
its ``architectures``) adds ``projection_dim``: the width of the pooled feature's projection.
"""

from __future__ import annotations

from typing import Any

from diffusekit.errors import ConfigError, check_choice
from diffusekit.limits import translating
from diffusekit.networks.text_encoder import ACTIVATIONS, TextEncoderConfig

# The reference config keys we read, and the name of each in our config.
_SIZE_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "mlp_size",
    "max_position_embeddings": "max_positions",
    "hidden_act": "activation",
    "layer_norm_eps": "layer_norm_eps",
}
_OPTIONAL_KEYS = ("hidden_act", "layer_norm_eps")
_ID_KEYS = {"bos_token_id": "bos_id", "eos_token_id": "eos_id", "pad_token_id": "pad_id"}
# our field names -> the file's keys (for error messages)
_FILE_KEYS = {ours: key for key, ours in {**_SIZE_KEYS, **_ID_KEYS}.items() if key != ours}
# Old CLIP configs (SD-1.x and SD-2.x text_encoder/config.json among them) carry placeholder special ids
# bos=0, pad=1, eos=2; the reference then pools at argmax(input_ids), i.e. at the first occurrence of the
# largest id, <|endoftext|> = vocab_size - 1. We translate that placeholder (or a missing eos id) into
# CLIP's real ids here.
_LEGACY_EOS_ID = 2
WITH_PROJECTION = "CLIPTextModelWithProjection"


@translating("text encoder config", names=_FILE_KEYS)
def text_encoder_from_diffusers(config: dict[str, Any]) -> TextEncoderConfig:
    """Translate a reference ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` ``config.json`` (or a
    ``CLIPModel`` one with a ``text_config``). Unknown keys are ignored; a missing size key raises ConfigError
    naming it. ``projection_dim`` is read only for ``CLIPTextModelWithProjection`` (plain ``CLIPTextModel``
    configs carry one too, for a projection they do not have)."""
    if not isinstance(config, dict):
        raise ConfigError(f"text encoder config must be a JSON object, got {type(config).__name__}")
    with_projection = WITH_PROJECTION in (config.get("architectures") or ())
    if isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    kwargs: dict[str, Any] = {}
    for key, ours in _SIZE_KEYS.items():
        if key in config:
            kwargs[ours] = config[key]
        elif key not in _OPTIONAL_KEYS:
            raise ConfigError(f"text encoder config lacks the key {key!r}")
    if "activation" in kwargs:
        check_choice("hidden_act", kwargs["activation"], ACTIVATIONS)
    vocab = kwargs["vocab_size"]
    ids = {ours: config.get(key) for key, ours in _ID_KEYS.items()}
    if isinstance(vocab, int) and ids["eos_id"] in (None, _LEGACY_EOS_ID):
        ids = {"bos_id": vocab - 2, "eos_id": vocab - 1, "pad_id": vocab - 1}  # CLIP's <|...|> tokens
    elif isinstance(ids["eos_id"], int):
        ids["bos_id"] = ids["eos_id"] - 1 if ids["bos_id"] is None else ids["bos_id"]
        ids["pad_id"] = ids["eos_id"] if ids["pad_id"] is None else ids["pad_id"]
    if with_projection:
        if "projection_dim" not in config:
            raise ConfigError(f"a {WITH_PROJECTION} config needs the key 'projection_dim'")
        kwargs["projection_dim"] = config["projection_dim"]
    return TextEncoderConfig(**kwargs, **ids)


def text_encoder_to_diffusers(c: TextEncoderConfig) -> dict[str, Any]:
    """The reference ``config.json`` for ``c`` (``CLIPTextModel``, or ``CLIPTextModelWithProjection`` when ``c``
    has a projection)."""
    return {
        "architectures": ["CLIPTextModel" if c.projection_dim is None else WITH_PROJECTION],
        "model_type": "clip_text_model",
        **{key: getattr(c, ours) for key, ours in {**_SIZE_KEYS, **_ID_KEYS}.items()},
        "projection_dim": c.hidden_size if c.projection_dim is None else c.projection_dim,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
    }
