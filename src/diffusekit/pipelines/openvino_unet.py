"""An opt-in engine for a pipeline's U-Net: its forward pass run by OpenVINO's CPU runtime instead of PyTorch.

Why: on a CPU with native bfloat16 (AVX512-BF16, AMX) OpenVINO's kernels run the SD-1.5 U-Net forward about
1.3x faster than PyTorch's (Zen 4, 2 threads: 4.59 s against diffusekit's 6.05 s and the reference's 6.63 s,
``benchmarks/engines.py``); in float32 diffusekit's own path is as fast or faster. The engine is an extra
(``pip install 'diffusekit[engines]'``); nothing else in the library imports ``openvino``.

How: :func:`use_engine` sets the U-Net's ``engine`` hook (:class:`diffusekit.networks.unet.UNet` calls it after
validating its inputs). At the first call with a given set of inputs (SD-1.x: the latents, the timesteps and the
text tokens; SDXL adds the pooled embedding and the size/crop values; inpainting the masked latents), a float32
copy of the network is traced by ``openvino.convert_model`` (shapes stay dynamic, so one conversion serves every
batch size and image size) and saved as OpenVINO IR in the user cache (:func:`default_cache_dir`), keyed by a
SHA-256 of the weights (LoRA adapters included), the inputs, the network code and the library versions: the
conversion (110 s for SD-1.5 on 2 Zen 4 cores) is paid once per model, later runs
read the IR and OpenVINO's own compiled-model cache. The model runs at the U-Net's dtype as OpenVINO's inference
precision (``bf16`` or ``f32``) on ``torch.get_num_threads()`` threads, and the result comes back in the input's
dtype.

Weights changed in place (a LoRA fused or re-weighted, a new adapter attached) are noticed at the next call by a
cheap fingerprint of every tensor's identity and version counter and of the adapters' settings, and lead to a
new (or cached) conversion. Gradients never go through the engine: with autograd recording for an input that
requires grad, the U-Net runs its own PyTorch path.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import diffusekit
from diffusekit.errors import ConfigError, OutputError, check_choice
from diffusekit.io.atomic import folder_atomic, remove_quietly
from diffusekit.networks.layers import PLANNED_LAYERS, Conv2d
from diffusekit.networks.unet import UNet
from diffusekit.user_cache import cache_root

#: ``--engine`` values: PyTorch (diffusekit's own kernels; the default) or OpenVINO's CPU runtime.
ENGINES = ("torch", "openvino")
#: The optional inputs of ``UNet.forward`` that the engine passes on, in the order the converted model takes them.
OPTIONAL_INPUTS = ("context", "class_labels", "concat", "pooled", "time_ids")
IR_NAME = "unet.xml"


def default_cache_dir() -> Path:
    """Where converted models are kept: ``openvino/`` in the user cache folder (``diffusekit.user_cache``)."""
    return cache_root() / "openvino"


def use_engine(
    unet: UNet, name: str, *, cache_dir: str | Path | None = None, notify: Callable[[str], None] | None = None
) -> UNet:
    """Run ``unet``'s forward passes on engine ``name`` (:data:`ENGINES`; ``torch`` removes an engine).
    ``notify`` receives a line before each conversion (it takes a while). ConfigError (naming ``--engine``) for
    an unknown name, a U-Net that is not on the CPU, or OpenVINO not installed. Returns ``unet``."""
    check_engine(name, next(unet.parameters()).device)
    if name == "torch":
        unet.engine = None
        return unet
    unet.engine = OpenVINOEngine(Path(cache_dir) if cache_dir is not None else default_cache_dir(), notify=notify)
    return unet


def check_engine(name: str, device: str | torch.device = "cpu") -> str:
    """``name`` if it is an engine that can run here (a command line calls it before loading a model):
    ConfigError naming ``--engine`` for an unknown name, OpenVINO on a device other than the CPU, or OpenVINO
    not installed."""
    check_choice("--engine", name, ENGINES)
    if name == "torch":
        return name
    if torch.device(device).type != "cpu":
        raise ConfigError(f"--engine openvino runs on the CPU only, and the model is on {device}; "
                          "use --device cpu, or --engine torch")  # fmt: skip
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise ConfigError("--engine openvino needs the openvino package: pip install 'diffusekit[engines]' "
                          "(or use --engine torch)") from None  # fmt: skip
    return name


class _Positional(nn.Module):
    """``unet(x, t, **{names[i]: rest[i]})``: the positional signature the converter traces."""

    def __init__(self, unet: UNet, names: tuple[str, ...]) -> None:
        super().__init__()
        self.unet, self.names = unet, names

    def forward(self, x: torch.Tensor, t: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        return self.unet.forward_torch(x, t, **dict(zip(self.names, rest)))  # inputs validated before the engine


class OpenVINOEngine:
    """The U-Net's ``engine`` hook (module docstring). One compiled model per (inputs, precision) for the current
    weights; the IR on disk is shared by every process that runs the same weights."""

    def __init__(self, cache_dir: Path, *, notify: Callable[[str], None] | None = None) -> None:
        import openvino

        self.cache_dir = cache_dir
        self.notify = notify
        self.core = openvino.Core()
        try:  # a folder that cannot be written fails now, with the way out, not at the first step
            (cache_dir / "compiled").mkdir(parents=True, exist_ok=True)
            self.core.set_property({"CACHE_DIR": str(cache_dir / "compiled")})
        except (OSError, RuntimeError) as e:
            raise OutputError(f"{cache_dir}: the cache of converted OpenVINO models cannot be created "
                              f"({getattr(e, 'strerror', None) or str(e).strip().splitlines()[-1]}); set "
                              f"DIFFUSEKIT_CACHE to a writable folder") from None  # fmt: skip
        self.conversions = 0  # models converted by this engine (the rest came from the cache)
        self._compiled: dict[tuple, Any] = {}  # (inputs, precision) -> compiled model, for the weights below
        self._weights: tuple | None = None  # the fingerprint of the weights the compiled models hold

    def __call__(self, unet: UNet, x: torch.Tensor, t: torch.Tensor, **inputs: torch.Tensor | None) -> torch.Tensor:
        if torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (x, *inputs.values())):
            return unet.forward_torch(x, t, **inputs)
        names = tuple(n for n in OPTIONAL_INPUTS if inputs.get(n) is not None)
        args = [x, t.float().reshape(-1).expand(x.shape[0]), *(inputs[n] for n in names)]
        precision = "bf16" if _is_bf16(unet) else "f32"
        weights = fingerprint(unet)
        if weights != self._weights:  # models of weights no longer in the U-Net are let go (they hold gigabytes)
            self._compiled, self._weights = {}, weights
        compiled = self._compiled.get((names, precision))
        if compiled is None:
            compiled = self._compiled[(names, precision)] = self._compile(unet, names, args, precision)
        arrays = [(a if a.dtype == torch.int64 else a.float()).contiguous().numpy() for a in args]
        out = compiled(arrays)[0]
        return torch.from_numpy(out).to(x.dtype)

    def _compile(self, unet: UNet, names: tuple[str, ...], args: list[torch.Tensor], precision: str) -> Any:
        folder = self.cache_dir / model_digest(unet, names)
        config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": torch.get_num_threads(),
                  "PERFORMANCE_HINT": "LATENCY"}  # fmt: skip
        if (folder / IR_NAME).is_file():
            try:
                return self.core.compile_model(str(folder / IR_NAME), "CPU", config)
            except RuntimeError:  # a damaged IR (a crash while it was written, a full disk): convert again
                remove_quietly(folder)
        self._convert(unet, names, args, folder)
        return self.core.compile_model(str(folder / IR_NAME), "CPU", config)

    def _convert(self, unet: UNet, names: tuple[str, ...], args: list[torch.Tensor], folder: Path) -> None:
        import openvino

        if self.notify is not None:
            self.notify(f"converting the U-Net for OpenVINO (once per model and set of inputs; kept in {folder})")
        traced = float32_copy(unet)
        example = tuple(a if a.dtype == torch.int64 else a.float() for a in args)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: harmless
            warnings.simplefilter("ignore", DeprecationWarning)  # the converter uses torch.jit.trace
            model = openvino.convert_model(_Positional(traced, names), example_input=example)
        with folder_atomic(folder, what="OpenVINO model") as tmp:
            # a bf16 model's weights are exact in float16 (8 of its 11 mantissa bits, the exponent within range
            # but for tiny values): half the disk of a float32 IR. A float32 model keeps float32 weights.
            openvino.save_model(model, str(tmp / IR_NAME), compress_to_fp16=_is_bf16(unet))
        self.conversions += 1


def _is_bf16(unet: UNet) -> bool:
    return next(unet.parameters()).dtype == torch.bfloat16


def float32_copy(unet: UNet) -> UNet:
    """A float32 copy of ``unet`` on PyTorch's plain kernels (no engine, no planned float32 compute, no fast
    convolutions), in eval mode: what the converter traces."""
    engine, unet.engine = unet.engine, None  # the engine (an OpenVINO runtime) is not copied
    try:
        twin = copy.deepcopy(unet).float().eval()
    finally:
        unet.engine = engine
    for m in twin.modules():
        if isinstance(m, PLANNED_LAYERS):
            m.compute_dtype = None
        if isinstance(m, Conv2d):
            m.fast = False
    return twin


def _tensors(unet: UNet) -> list[tuple[str, torch.Tensor]]:
    """Every tensor the forward pass reads: parameters and buffers, and the adapters' (not module children)."""
    found = [(name, t) for name, t in (*unet.named_parameters(), *unet.named_buffers())]
    for name, m in unet.named_modules():
        for i, term in enumerate(getattr(m, "adapters", ())):
            found += [(f"{name}.adapters.{i}.{n}", t) for n, t in (*term.named_parameters(), *term.named_buffers())]
    return found


def _adapter_settings(unet: UNet) -> list[tuple]:
    """The adapters' plain settings (weight, scale, alpha, active/fused flags) by layer."""
    settings = []
    for name, m in unet.named_modules():
        for term in getattr(m, "adapters", ()):
            plain = sorted((k, v) for k, v in vars(term).items() if isinstance(v, bool | int | float | str))
            settings.append((name, tuple(plain)))
    return settings


def fingerprint(unet: UNet) -> tuple:
    """Cheap at every call: the identity and version counter of every tensor and the adapters' settings, which
    change whenever the weights do (in-place updates bump a tensor's version)."""
    return (tuple((id(t), t._version) for _, t in _tensors(unet)), tuple(_adapter_settings(unet)))


def model_digest(unet: UNet, names: tuple[str, ...]) -> str:
    """SHA-256 naming a conversion: weights (bytes, names, shapes, dtypes), adapter settings, network config,
    inputs, the code of ``diffusekit.networks`` and the versions of diffusekit, torch and openvino."""
    h = hashlib.sha256()
    for name, t in _tensors(unet):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(repr(_adapter_settings(unet)).encode())
    h.update(repr(unet.config).encode())
    h.update(repr(names).encode())
    for source in sorted(Path(__file__).parents[1].joinpath("networks").glob("*.py")):
        h.update(source.read_bytes())
    versions = (diffusekit.__version__, torch.__version__, importlib.metadata.version("openvino"))
    h.update(repr(versions).encode())
    return h.hexdigest()[:32]
