"""Fuzzing model folders: the tiny Stable Diffusion pipeline folder with files removed, added, corrupted,
replaced by hostile ones, or swapped for components that do not fit; tokenizer files with corrupt
vocabularies, merges and settings.

Each case is a fresh folder of symlinks to a pristine copy of the fixture, with the mutated files written
in place of their links. Contract (see ``fuzzing``): the loader returns a model, or raises a
DiffusekitError whose message names the folder or a file in it. A model that loads must also generate (one
small text-to-image step), or refuse with a DiffusekitError.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from diffusekit.io.models import load_unet, load_vae, save_unet, save_vae
from diffusekit.io.text import load_text_encoder, load_tokenizer, save_text_encoder
from diffusekit.networks.text_encoder import ClipTextEncoder, TextEncoderConfig
from diffusekit.networks.unet import UNet
from diffusekit.networks.vae import AutoencoderKL
from diffusekit.pipelines.loading import load_pipeline
from diffusekit.pipelines.stable_diffusion import StableDiffusion
from diffusekit.pipelines.text_to_image import TextToImage
from fuzzing import Tally, examples, json_values, mutated, session_tally, string_values

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
SD = FIXTURES / "pipelines" / "stable_diffusion"
pytestmark = pytest.mark.skipif(not SD.is_dir(), reason=f"fixtures not found at {SD}")

FILES = sorted(str(p.relative_to(SD)) for p in SD.rglob("*") if p.is_file()) if SD.is_dir() else ["x"]
JSON_FILES = [f for f in FILES if f.endswith(".json")]
WEIGHT_FILES = [f for f in FILES if f.endswith(".safetensors")]
COMPONENTS = sorted({f.split("/")[0] for f in FILES if "/" in f})
JSON_BASES = {f: json.loads((SD / f).read_text()) for f in JSON_FILES} if SD.is_dir() else {}
STRINGS = string_values(*(v for k, v in JSON_BASES.items() if "vocab" not in k))
EXTRA_NAMES = ["diffusion_pytorch_model.bin", "pytorch_model.bin", "model.ckpt", "extra.safetensors", ".hidden",
               "diffusion_pytorch_model.fp16.safetensors", "config.json.bak",
               "model.safetensors.index.json"]  # fmt: skip


@pytest.fixture(scope="session")
def tally(request: pytest.FixtureRequest) -> Tally:
    return session_tally(request)


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> Path:
    """A private copy of the fixture pipeline: the links of every case point here."""
    copy = tmp_path_factory.mktemp("pristine") / "stable_diffusion"
    shutil.copytree(SD, copy)
    return copy


def link_tree(pristine: Path, folder: Path) -> Path:
    for rel in FILES:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).symlink_to(pristine / rel)
    return folder


def _replace(path: Path) -> Path:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------------------
# Mutations of one file or folder


def _tensor_edit(state: dict[str, torch.Tensor], kind: str, index: int) -> dict[str, torch.Tensor]:
    keys = sorted(state)
    key = keys[index % len(keys)]
    state = dict(state)
    if kind == "drop":
        del state[key]
    elif kind == "extra":
        state["model.extra_weight"] = torch.zeros(2)
    elif kind == "rename":
        state[key + "_renamed"] = state.pop(key)
    elif kind == "reshape":
        state[key] = state[key].reshape(-1)[: max(1, state[key].numel() - 1)].clone()
    elif kind == "unsqueeze":
        state[key] = state[key][None].clone()
    elif kind.startswith("dtype:"):
        dtype = getattr(torch, kind.split(":")[1])
        state[key] = state[key].to(dtype)
    elif kind == "nan":
        state[key] = torch.full_like(state[key], float("nan"))
    elif kind == "empty":
        state = {}
    return state


TENSOR_EDITS = ["drop", "extra", "rename", "reshape", "unsqueeze", "dtype:int64", "dtype:float16", "dtype:bool",
                "dtype:uint8", "dtype:float64", "dtype:bfloat16", "nan", "empty"]  # fmt: skip


def _merges_edit(text: str, kind: str, index: int, junk: str) -> bytes:
    lines = text.split("\n")
    i = 1 + index % max(1, len(lines) - 1)
    if kind == "drop":
        del lines[i]
    elif kind == "junk":
        lines.insert(i, junk)
    elif kind == "dup":
        lines.insert(i, lines[i])
    elif kind == "three":
        lines[i] = lines[i] + " x"
    elif kind == "header":
        lines.insert(i, "#version: 0.2")
    elif kind == "unknown_symbols":
        lines.insert(i, "qqq zzz")
    elif kind == "long":
        lines.insert(i, "a" * 100_000 + " b")
    elif kind == "bytes":
        return "\n".join(lines).encode() + b"\xff\xfe\x00"
    elif kind == "crlf":
        return "\r\n".join(lines).encode()
    return "\n".join(lines).encode()


MERGES_EDITS = ["drop", "junk", "dup", "three", "header", "unknown_symbols", "long", "bytes", "crlf"]


def operations(component: str | None = None) -> st.SearchStrategy[list[tuple]]:
    """Lists of 1-3 mutations, of any file or only of ``component``'s."""

    def of(names: list[str]) -> list[str]:
        return [n for n in names if component is None or n.startswith(component + "/")]

    files, json_files, weight_files = of(FILES), of(JSON_FILES), of(WEIGHT_FILES)
    components = [component] if component else COMPONENTS
    json_op = st.sampled_from(json_files).flatmap(
        lambda f: mutated(JSON_BASES[f], STRINGS, max_ops=3).map(lambda d: ("json", f, d))
    )
    ops = [
        st.tuples(st.just("delete"), st.sampled_from(files + components)),
        st.tuples(st.just("extra"), st.sampled_from(components), st.sampled_from(EXTRA_NAMES), st.binary(max_size=64)),
        json_op,
        json_op,
        st.tuples(st.just("json_raw"), st.sampled_from(json_files), json_values()),
        st.tuples(
            st.just("bytes"),
            st.sampled_from(files),
            st.sampled_from(["empty", "truncate", "garbage"]),
            st.floats(0, 1),
            st.binary(max_size=64),
        ),
        st.tuples(st.just("dir_instead"), st.sampled_from(files)),
    ]
    if weight_files:
        ops += [
            st.tuples(
                st.just("tensors"), st.sampled_from(weight_files), st.sampled_from(TENSOR_EDITS), st.integers(0, 10_000)
            ),
            st.tuples(st.just("index"), st.sampled_from(weight_files), json_values()),
        ]
    if component in (None, "tokenizer"):
        ops.append(
            st.tuples(st.just("merges"), st.sampled_from(MERGES_EDITS), st.integers(0, 10_000), st.text(max_size=20))
        )
    return st.lists(st.one_of(*ops), min_size=1, max_size=3)


def apply(folder: Path, pristine: Path, ops: list[tuple]) -> None:
    for op in ops:
        kind, target = op[0], op[1]
        if kind == "delete":
            p = folder / target
            if p.is_symlink() or p.is_file():
                p.unlink()
            elif p.is_dir():
                shutil.rmtree(p)
        elif kind == "extra":
            _replace(folder / target / op[2]).write_bytes(op[3])
        elif kind == "json":
            _replace(folder / target).write_text(json.dumps(op[2]))
        elif kind == "json_raw":
            _replace(folder / target).write_text(json.dumps(op[2]))
        elif kind == "bytes":
            original = (pristine / target).read_bytes()
            if op[2] == "empty":
                data = b""
            elif op[2] == "truncate":
                data = original[: int(len(original) * op[3])]
            else:
                data = op[4] + original[len(op[4]) :]
            _replace(folder / target).write_bytes(data)
        elif kind == "tensors":
            state = _tensor_edit(load_file(str(pristine / target)), op[2], op[3])
            save_file(state, str(_replace(folder / target)))
        elif kind == "merges":
            text = (pristine / "tokenizer" / "merges.txt").read_text()
            _replace(folder / "tokenizer" / "merges.txt").write_bytes(_merges_edit(text, op[1], op[2], op[3]))
        elif kind == "dir_instead":
            _replace(folder / target).mkdir()
        elif kind == "index":  # replace the weights by a shard index with a hostile weight map
            weights = folder / target
            _replace(weights).unlink(missing_ok=True)
            weight_map = op[2] if isinstance(op[2], dict) else {"a": op[2], "b": "../unet/" + weights.name}
            (weights.parent / (weights.name + ".index.json")).write_text(json.dumps({"weight_map": weight_map}))


def _generate(sd: StableDiffusion) -> None:
    m = sd.latent_multiple
    out = TextToImage(sd)("a red cube", height=m, width=m, steps=1, guidance_scale=7.5, show_progress=False,
                          generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.images.shape == (1, 3, m, m)


def _load_and_generate(folder: Path) -> bool:
    _generate(load_pipeline(folder))
    return True


# ---------------------------------------------------------------------------------------------------------
# Whole pipeline folders


@examples(30)
@given(ops=operations())
def test_pipeline_folder(tally, tmp_path_factory, pristine, ops):
    folder = link_tree(pristine, tmp_path_factory.mktemp("case") / "model")
    apply(folder, pristine, ops)
    tally.check("load_pipeline (mutated folder)", lambda: _load_and_generate(folder), names=[str(folder)],
                describe=lambda: repr(ops)[:1500])  # fmt: skip


def test_pristine_folder_loads_and_generates(tally, tmp_path, pristine):
    folder = link_tree(pristine, tmp_path / "model")
    assert tally.check("load_pipeline (mutated folder)", lambda: _load_and_generate(folder)) is True


LOADERS = {
    "unet": load_unet,
    "vae": load_vae,
    "text_encoder": load_text_encoder,
    "tokenizer": load_tokenizer,
}


@examples(100)
@given(data=st.sampled_from(sorted(LOADERS)).flatmap(lambda c: st.tuples(st.just(c), operations(c))))
def test_component_folder(tally, tmp_path_factory, pristine, data):
    component, ops = data
    folder = link_tree(pristine, tmp_path_factory.mktemp("case") / "model")
    apply(folder, pristine, ops)
    tally.check(f"load_{component} (mutated folder)", lambda: LOADERS[component](folder / component),
                names=[str(folder)], describe=lambda: repr(ops)[:1500])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Tokenizer files


def _tokenize(tok, prompts: list[str]) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation warnings
        ids = tok(prompts)
    assert ids.shape == (len(prompts), tok.model_max_length)
    assert int(ids.min()) >= 0 and int(ids.max()) < max(tok.vocab.values()) + 1


TOKENIZER_SETTINGS = st.fixed_dictionaries(
    {},
    optional={
        "model_max_length": st.one_of(json_values(), st.sampled_from([1, 2, 77, 10**6, 10**6 + 1, 10**30, 1e30])),
        "do_lower_case": json_values(),
        "bos_token": st.one_of(json_values(), st.sampled_from(["<|startoftext|>", "!", "zzz"])),
        "eos_token": st.one_of(json_values(), st.sampled_from(["<|endoftext|>", "!", "zzz"])),
        "pad_token": st.one_of(json_values(), st.sampled_from(["<|endoftext|>", "!", {"content": "!"}])),
        "unk_token": st.one_of(json_values(), st.sampled_from(["<|endoftext|>", {"content": None}])),
    },
)


@examples(150)
@given(
    vocab_ops=st.one_of(st.just({}), mutated(JSON_BASES.get("tokenizer/vocab.json", {"a": 1}), STRINGS, max_ops=4)),
    merges=st.lists(
        st.tuples(st.sampled_from(MERGES_EDITS), st.integers(0, 10_000), st.text(max_size=20)), max_size=2
    ),  # fmt: skip
    settings_=TOKENIZER_SETTINGS,
    settings_file=st.sampled_from(["tokenizer_config.json", "special_tokens_map.json"]),
    prompts=st.lists(st.text(max_size=200), min_size=1, max_size=3),
)
def test_tokenizer_files(tally, tmp_path_factory, pristine, vocab_ops, merges, settings_, settings_file, prompts):
    folder = link_tree(pristine, tmp_path_factory.mktemp("case") / "model") / "tokenizer"
    if vocab_ops:
        _replace(folder / "vocab.json").write_text(json.dumps(vocab_ops))
    text = (pristine / "tokenizer" / "merges.txt").read_text()
    data = text.encode()
    for kind, index, junk in merges:
        data = _merges_edit(data.decode("utf-8", errors="replace"), kind, index, junk)
    _replace(folder / "merges.txt").write_bytes(data)
    if settings_:
        base = json.loads((pristine / "tokenizer" / settings_file).read_text())
        _replace(folder / settings_file).write_text(json.dumps({**base, **settings_}))

    def call():
        _tokenize(load_tokenizer(folder), prompts)

    tally.check("load_tokenizer + tokenize (corrupt files)", call, names=[str(folder)],
                describe=lambda: repr((vocab_ops and "vocab mutated", merges, settings_, prompts))[:1500])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Hostile paths and components that do not fit together


WEIGHTS, MEM = "diffusion_pytorch_model.safetensors", "/proc/self/mem"


def test_hostile_paths(tally, tmp_path, pristine):
    cases = {
        "a directory instead of config.json": lambda f: _replace(f / "unet" / "config.json").mkdir(),
        "a FIFO instead of the weights": lambda f: os.mkfifo(_replace(f / "vae" / WEIGHTS)),
        "config.json links to /proc/self/mem": lambda f: _replace(f / "unet" / "config.json").symlink_to(MEM),
        "weights link to /proc/self/mem": lambda f: _replace(f / "unet" / WEIGHTS).symlink_to(MEM),
        "vocab.json links to /dev/zero": lambda f: _replace(f / "tokenizer" / "vocab.json").symlink_to("/dev/zero"),
        "a symlink loop": lambda f: _replace(f / "vae" / "config.json").symlink_to(f / "vae" / "config.json"),
        "a shard index escaping the folder": lambda f: (
            _replace(f / "unet" / "diffusion_pytorch_model.safetensors").unlink(missing_ok=True),
            (f / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"a": "../vae/diffusion_pytorch_model.safetensors"}})
            ),
        ),
        "an absolute shard path": lambda f: (
            _replace(f / "text_encoder" / "model.safetensors").unlink(missing_ok=True),
            (f / "text_encoder" / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"a": str(pristine / "vae" / "diffusion_pytorch_model.safetensors")}})
            ),
        ),
        "an unreadable file": lambda f: _unreadable(_replace(f / "scheduler" / "scheduler_config.json")),
    }  # fmt: skip
    for i, (name, make) in enumerate(cases.items()):
        folder = link_tree(pristine, tmp_path / f"case{i}")
        make(folder)
        result = tally.check("load_pipeline (hostile paths)", lambda f=folder: load_pipeline(f),
                             names=[str(folder)], describe=name)  # fmt: skip
        assert result is None, name


def test_files_of_a_model_folder_given_as_the_model(tally, tmp_path, pristine):
    """model_index.json or a component's weights passed where the model folder belongs: refused, naming the
    folder that holds them."""
    folder = link_tree(pristine, tmp_path / "model")
    for inner in ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json"]:
        result = tally.check("load_pipeline (a file of a model folder)", lambda i=inner: load_pipeline(folder / i),
                             names=[f"pass the folder that holds it: {folder}"], describe=inner)  # fmt: skip
        assert result is None, inner


def _unreadable(path: Path) -> None:
    path.write_text("{}")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: use a file that cannot be read instead
        path.unlink()
        path.symlink_to("/proc/self/mem")


def _save_component(folder: Path, component: str) -> None:
    """Replace ``component`` by one of a different size than the rest of the pipeline expects."""
    from diffusekit.io.models import load_unet as _lu
    from diffusekit.io.text import load_text_encoder as _lt

    torch.manual_seed(0)
    target = _replace(folder / component.split(":")[0])
    if component == "unet:cross_attention_dim":
        c = _lu(SD / "unet").config
        save_unet(UNet(type(c).from_dict({**c.to_dict(), "cross_attention_dim": 16})), target)
    elif component == "unet:out_channels":
        c = _lu(SD / "unet").config
        save_unet(UNet(type(c).from_dict({**c.to_dict(), "out_channels": 3})), target)
    elif component == "unet:in_channels":
        c = _lu(SD / "unet").config
        save_unet(UNet(type(c).from_dict({**c.to_dict(), "in_channels": 5})), target)
    elif component == "vae:latent_channels":
        c = load_vae(SD / "vae").config
        save_vae(AutoencoderKL(type(c).from_dict({**c.to_dict(), "latent_channels": 3})), target)
    elif component.startswith("text_encoder:"):
        c = _lt(SD / "text_encoder").config
        change = {"text_encoder:vocab_size": {"vocab_size": 100, "bos_id": 98, "eos_id": 99, "pad_id": 99},
                  "text_encoder:max_positions": {"max_positions": 16},
                  "text_encoder:hidden_size": {"hidden_size": 16}}[component]  # fmt: skip
        save_text_encoder(ClipTextEncoder(TextEncoderConfig(**{**c.to_dict(), **change})), target)


@pytest.mark.parametrize(
    "component",
    ["unet:cross_attention_dim", "unet:out_channels", "unet:in_channels", "vae:latent_channels",
     "text_encoder:vocab_size", "text_encoder:max_positions", "text_encoder:hidden_size"],
)  # fmt: skip
def test_components_that_do_not_fit_together(tally, tmp_path, pristine, component):
    folder = link_tree(pristine, tmp_path / "model")
    _save_component(folder, component)
    result = tally.check("load_pipeline (mismatched components)", lambda: _load_and_generate(folder),
                         names=[str(folder)], describe=component)  # fmt: skip
    assert result is None, f"{component}: a pipeline whose parts do not fit was accepted"
