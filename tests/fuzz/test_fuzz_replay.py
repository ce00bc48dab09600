"""Fuzzing ``--replay``: the generation settings a PNG carries are input from whoever made the file.

A real PNG is made once with ``diffusekit txt2img`` on the tiny fixture pipeline. Cases: its bytes truncated
and corrupted; its ``diffusekit`` metadata replaced by mutated settings (wrong types, huge sizes and step
counts, NaN, unknown samplers, paths to missing, hostile or pickled files), random text, invalid or deeply
nested JSON, a compressed chunk that inflates to a huge size; LoRA entries naming missing, pickled, damaged
or foreign files and hostile weights; the ``parameters`` text of other SD tools (web-UI sampler names, schedule
types, ``<lora:...>`` tags); and the same recipes as JSON objects sent to ``Recipe.from_dict`` (as a server
receives them). Contract (see ``fuzzing``): the
replay makes an image, or raises a DiffusekitError naming the PNG, a field or an option -- and never reads a
pickle, whatever the PNG says.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import zlib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from diffusekit.cli.main import build_parser
from diffusekit.pipelines.recipe import (
    METADATA_KEY,
    Recipe,
    read_png_metadata,
    recipe_from_metadata,
    recipe_from_parameters,
)
from diffusekit.samplers.names import WEB_UI
from fuzzing import Tally, examples, json_values, mutated, session_tally, string_values

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
SD = FIXTURES / "pipelines" / "stable_diffusion"
pytestmark = pytest.mark.skipif(not SD.is_dir(), reason=f"fixtures not found at {SD}")


@pytest.fixture(scope="session")
def tally(request: pytest.FixtureRequest) -> Tally:
    return session_tally(request)


def run_cli(argv: list[str]) -> int:
    """A ``diffusekit`` command with its DiffusekitError propagating (main() would print it)."""
    args = build_parser().parse_args(argv)
    return args.run(args)


@pytest.fixture(scope="session")
def made(tmp_path_factory) -> tuple[Path, dict]:
    """A PNG written by txt2img on the tiny pipeline, and its metadata."""
    out = tmp_path_factory.mktemp("made")
    run_cli(["txt2img", "a red cube", "--model", str(SD), "--size", "16x16", "--steps", "2", "--seed", "3",
             "--out", str(out), "--quiet"])  # fmt: skip
    png = next(out.glob("*.png"))
    return png, read_png_metadata(png)


def settings_from_metadata(meta: dict, path: Path) -> Recipe:
    return recipe_from_metadata(meta, f"--replay {path}")


def write_png(path: Path, text: str | None, *, compressed: bool = False) -> Path:
    image = Image.new("RGB", (16, 16), (30, 60, 90))
    info = PngImagePlugin.PngInfo()
    if text is not None:
        info.add_text(METADATA_KEY, text, zip=compressed)
    image.save(path, format="PNG", pnginfo=info)
    return path


def _replay(png: Path, out: Path, *extra: str) -> int:
    return run_cli(["txt2img", "--replay", str(png), "--out", str(out), "--quiet", *extra])


@examples(200)
@given(data=st.data())
def test_replay_settings(tally, tmp_path_factory, made, data):
    """Mutated settings, through the parser and validation only (cheap): settings or a named error."""
    _, meta = made
    strings = [*string_values(meta), "dpm++2m", "euler-a", "plms", "float16", "bfloat16", "img2img", "inpaint",
               "DPM++ 2M Karras", "Euler a", "LCM"]  # fmt: skip
    mutated_meta = data.draw(mutated(meta, strings, max_ops=4))
    path = write_png(tmp_path_factory.mktemp("png") / "x.png", json.dumps(mutated_meta))

    def call():
        return settings_from_metadata(read_png_metadata(path), path)

    tally.check("--replay settings", call, names=[str(path), "--replay"], describe=lambda: repr(mutated_meta))


LORA = FIXTURES / "pipelines" / "lora" / "kohya.safetensors"
LORA_ENTRIES = [
    [], [{"path": str(LORA), "weight": 0.5}], [{"path": str(LORA)}, {"path": str(LORA), "weight": -1}],
    [{"path": "/nonexistent.safetensors"}], [{"path": str(SD / "model_index.json")}],  # missing; not weights
    [{"path": str(next((SD / "unet").glob("*.safetensors"), SD))}],  # a U-Net's weights: no LoRA keys
    [{"path": str(LORA), "weight": float("nan")}], [{"path": str(LORA), "weight": 1e300}],
    [{"path": str(LORA), "sha256": "0" * 64}], [{"path": str(LORA), "sha256": "x"}], [{"path": ""}],
    [{"path": str(LORA), "scale": 2}], ["style.safetensors"], "style.safetensors", [{"path": "/dev/zero"}],
    [{"path": str(LORA)}] * 40,
]  # fmt: skip


@examples(16)
@given(data=st.data())
def test_replay_run(tally, tmp_path_factory, made, data):
    """Mutated settings, replayed for real (model loading and generation included) while small enough."""
    _, meta = made
    base = {**meta, "steps": 1}
    change = data.draw(
        st.fixed_dictionaries(
            {},
            optional={
                "steps": st.sampled_from([0, 1, 2, -1, 10**9, 1.5, "2", None]),
                "guidance": st.sampled_from([0.0, 1.0, 7.5, -1.0, float("nan"), 1e300, "7"]),
                "sampler": st.sampled_from(["ddim", "euler-a", "dpm++2m", "pndm", "ddpm", "nope", None, 3,
                                            "DPM++ 2M Karras", "dpm2 karras", "LCM", "UniPC"]),
                "karras": st.sampled_from([True, False, None, "yes", 1, 2.0]),
                "loras": st.sampled_from(LORA_ENTRIES),
                "width": st.sampled_from([8, 16, 17, 0, -16, 10**6, None]),
                "height": st.sampled_from([8, 16, 24, 0, None]),
                "eta": st.sampled_from([None, 0.0, 0.5, 2.0]),
                "seed": st.sampled_from([0, -1, 2**63, 2**64, "x"]),
                "dtype": st.sampled_from(["float32", "float16", "bfloat16", "int8", None]),
                "prompt": st.one_of(st.text(max_size=50), st.just("x" * 20_000)),
                "negative_prompt": st.text(max_size=20),
                "model": st.sampled_from([str(SD), str(SD / "unet"), "/nonexistent", "", str(SD / "model_index.json")]),
                "mode": st.sampled_from(["txt2img", "img2img", "inpaint", "x"]),
            },
        )
    )  # fmt: skip
    path = write_png(tmp_path_factory.mktemp("png") / "x.png", json.dumps({**base, **change}))
    out = path.parent / "out"
    names = [str(path), "--replay", "--", *([str(change["model"])] if change.get("model") else []),
             *[str(x["path"]) for x in change.get("loras") or () if isinstance(x, dict) and "path" in x]]  # fmt: skip
    tally.check("--replay run", lambda: _replay(path, out), names=names,
                describe=lambda: repr(change))  # fmt: skip


@examples(200)
@given(data=st.data())
def test_recipe_from_a_json_body(tally, made, data):
    """A recipe sent as a JSON object (as a server receives it): a recipe or a ConfigError naming the field;
    what is accepted serialises to standard JSON that reads back to the same recipe."""
    _, meta = made
    body = {f.name: meta[f.name] for f in dataclasses.fields(Recipe)}
    strings = [*string_values(body), "dpm++2m", "euler-a", "float16", "img2img", "inpaint"]
    mutated_body = data.draw(mutated(body, strings, max_ops=4))
    recipe = tally.check("recipe from JSON", lambda: Recipe.from_dict(mutated_body), names=["field '"],
                         describe=lambda: repr(mutated_body))  # fmt: skip
    if recipe is not None:
        text = recipe.to_json()
        assert Recipe.from_dict(json.loads(text)) == recipe
        assert "NaN" not in text and "Infinity" not in text


HOSTILE_TEXTS = st.one_of(
    st.text(max_size=300),
    json_values().map(json.dumps),
    st.just("[" * 100_000 + "]" * 100_000),
    st.just('{"format": "diffusekit-generation", "format_version": 1' + ', "a": 1' * 100_000 + "}"),
    st.just("9" * 5000),
    st.just("{" * 200_000),
    st.just("x" * 2_000_000),
)


@examples(120)
@given(text=HOSTILE_TEXTS, compressed=st.booleans())
def test_replay_hostile_metadata_text(tally, tmp_path_factory, text, compressed):
    path = write_png(tmp_path_factory.mktemp("png") / "x.png", text, compressed=compressed)
    tally.check("--replay hostile text", lambda: settings_from_metadata(read_png_metadata(path), path),
                names=[str(path)], describe=lambda: repr(text[:300]))  # fmt: skip


@examples(150)
@given(cut=st.floats(0, 1), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), max_size=4))
def test_replay_corrupt_png(tally, tmp_path_factory, made, cut, flips):
    data = bytearray(made[0].read_bytes())
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    data = data[: max(1, int(len(data) * cut))] if cut < 1 else data
    path = tmp_path_factory.mktemp("png") / "x.png"
    path.write_bytes(bytes(data))
    tally.check("--replay corrupt PNG", lambda: settings_from_metadata(read_png_metadata(path), path),
                names=[str(path)], describe=lambda: f"cut={cut} flips={flips}")  # fmt: skip


def test_replay_compressed_chunk_bomb(tally, tmp_path):
    """A zTXt chunk of a few hundred kB that inflates to 256 MiB must not be inflated."""
    path = write_png(tmp_path / "bomb.png", None)
    z = zlib.compressobj(9)
    block = b" " * (1 << 20)
    bomb = z.compress(b"{") + b"".join(z.compress(block) for _ in range(256)) + z.flush()  # 256 MiB, streamed
    chunk_type, body = b"zTXt", METADATA_KEY.encode() + b"\0\0" + bomb
    chunk = len(body).to_bytes(4, "big") + chunk_type + body + zlib.crc32(chunk_type + body).to_bytes(4, "big")
    data = path.read_bytes()
    path.write_bytes(data[:33] + chunk + data[33:])  # after the 8-byte signature and the IHDR chunk
    result = tally.check("--replay hostile text", lambda: read_png_metadata(path), names=[str(path)])
    assert result is None


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".safetensors"])
def test_replay_never_unpickles_the_model_it_names(tally, tmp_path, made, suffix):
    marker = tmp_path / "CODE-RAN"
    model = tmp_path / f"evil{suffix}"
    model.write_bytes(pickle.dumps({"state_dict": {"w": _RunsCode(marker)}}))
    meta = {**made[1], "model": str(model), "tokenizer": str(SD / "tokenizer")}
    png = write_png(tmp_path / "evil.png", json.dumps(meta))
    result = tally.check("--replay pickled model", lambda: _replay(png, tmp_path / "out"), names=[str(model)])
    assert result is None and not marker.exists()
    # --allow-pickle given beside --replay: torch.load(weights_only=True) still refuses to run code
    result = tally.check("--replay pickled model", lambda: _replay(png, tmp_path / "out", "--allow-pickle"),
                         names=[str(model)])  # fmt: skip
    assert result is None and not marker.exists()


def test_replay_of_an_untouched_png_reproduces_it(tally, tmp_path, made):
    png, _ = made
    out = tmp_path / "again"
    assert tally.check("--replay run", lambda: _replay(png, out)) == 0
    again = next(out.glob("*.png"))
    with Image.open(png) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()


_SETTINGS_PIECES = st.sampled_from(
    ["Steps: 2", "Steps: -1", "Steps: 99999999999999999999", "Steps: x", "CFG scale: 7", "CFG scale: nan",
     "CFG scale: inf", "Seed: 18446744073709551616", "Seed: -1", "Size: 16x16", "Size: 0x0", "Size: 9x9999999",
     "Size: big", "Schedule type: Karras", "Schedule type: Exponential", "Schedule type: ", "Eta: 0.5",
     "Denoising strength: 2", "Clip skip: 2", 'Lora hashes: "a: 1, b: 2"', 'Sampler: "Euler, a"', "Sampler: ",
     *(f"Sampler: {n.name}" for n in WEB_UI), "Sampler: DPM++ 3M SDE", "Sampler: dpmpp_2m", "Model: x"]
)  # fmt: skip
_PROMPTS = st.one_of(st.text(max_size=60), st.sampled_from(
    ["a <lora:style:0.5> b", "<lora:x>", "<lora:x:abc>", "<lora::>", "<lora:a:1:2>", "<hypernet:h:1>",
     "<lyco:l:inf>", "x" * 20_000]))  # fmt: skip


@examples(200)
@given(prompt=_PROMPTS, negative=st.one_of(st.none(), st.text(max_size=30)),
       pieces=st.lists(_SETTINGS_PIECES, max_size=4), tail=st.one_of(st.just(""), st.text(max_size=30)),
       steps=st.booleans())  # fmt: skip
def test_replay_parameters_text_of_other_tools(tally, prompt, negative, pieces, tail, steps):
    """Another tool's ``parameters`` text: recipe fields, or a ConfigError naming the PNG; what it reads
    either makes a valid recipe (with a model given) or a ConfigError naming the key or field."""
    settings = ", ".join(["Steps: 2"] * steps + pieces) + tail
    lines = [prompt, *([f"Negative prompt: {negative}"] if negative is not None else []), settings]
    text = "\n".join(lines)
    read = tally.check("--replay other tool's text", lambda: recipe_from_parameters(text, "--replay w.png"),
                       names=["--replay w.png"], describe=lambda: repr(text[:500]))  # fmt: skip
    if read is not None:
        body = {"mode": "txt2img", "model": "/m", **read.fields}
        tally.check("--replay other tool's text", lambda: Recipe.from_dict(body), names=["field '"],
                    describe=lambda: repr(body))  # fmt: skip
