"""CLIP BPE tokenizer: exact ids against both reference tokenizers, truncation, padding, errors, I/O."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file

from diffusekit.errors import ConfigError, WeightsError
from diffusekit.io.text import load_tokenizer, save_tokenizer
from diffusekit.networks.tokenizer import ClipTokenizer, byte_alphabet


@pytest.fixture(scope="module")
def tiny_case(fixtures_dir):
    case = fixtures_dir / "models" / "tokenizer"
    meta = json.loads((case / "meta.json").read_text(encoding="utf-8"))
    return load_tokenizer(case / "tokenizer"), meta, load_file(case / "io.safetensors")


@pytest.fixture(scope="module")
def real_case(fixtures_dir):
    folder = fixtures_dir / "clip_tokenizer_real"
    expected = json.loads((folder / "expected_ids.json").read_text(encoding="utf-8"))
    return load_tokenizer(folder), expected["cases"]


def test_byte_alphabet_is_a_bijection_onto_printable_characters():
    table = byte_alphabet()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert table[ord("a")] == "a" and table[ord(" ")] == chr(256 + 32) and table[0] == chr(256)
    assert all(c.isprintable() and not c.isspace() for c in table.values())


def test_tiny_tokenizer_special_ids(tiny_case):
    tok, meta, _ = tiny_case
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (meta["bos_token_id"], meta["eos_token_id"], meta["pad_token_id"])
    assert tok.vocab_size == meta["vocab_size"] and len(tok.merges) == meta["num_merges"]
    assert tok.model_max_length == meta["model_max_length"] == 77


def test_tiny_tokenizer_padded_ids_match_reference(tiny_case):
    tok, meta, io = tiny_case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tok(meta["prompts"])
    assert ids.dtype == torch.int64 and ids.shape == (len(meta["prompts"]), 77)
    assert torch.equal(ids, io["input_ids"])
    assert ids.tolist() == meta["input_ids"]


def test_tiny_tokenizer_unpadded_ids_and_tokens_match_reference(tiny_case):
    tok, meta, _ = tiny_case
    for prompt, ids, tokens in zip(meta["prompts"], meta["input_ids_unpadded"], meta["tokens_unpadded"]):
        assert tok.encode_unpadded(prompt, max_length=77) == ids, prompt
        if len(tok.encode_unpadded(prompt)) <= 77:
            assert tok.tokenize(prompt) == tokens, prompt


def test_real_vocab_sizes(real_case):
    tok, _ = real_case
    assert tok.vocab_size == 49408 and len(tok.merges) == 48894
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (49406, 49407, 49407)


def test_real_tokenizer_matches_reference_on_every_awkward_prompt(real_case):
    tok, cases = real_case
    assert len(cases) == 12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        padded = tok([c["prompt"] for c in cases])
    for row, case in zip(padded.tolist(), cases):
        assert tok.encode_unpadded(case["prompt"]) == case["input_ids_unpadded_untruncated"], case["prompt"]
        assert row == case["input_ids_padded_77"], case["prompt"]


def test_long_prompt_warns_once_and_keeps_bos_and_eos(real_case):
    tok, _ = real_case
    long = " ".join(["word"] * 200)
    with pytest.warns(UserWarning, match="truncated") as record:
        ids = tok([long, long, "short"])
    assert len(record) == 1
    assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id and ids.shape == (3, 77)
    assert torch.equal(ids[0], ids[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok("a prompt that fits")


def test_custom_max_length_and_string_input(real_case):
    tok, _ = real_case
    ids = tok("a photo of a cat", max_length=10)
    assert ids.tolist() == [[49406, 320, 1125, 539, 320, 2368, 49407, 49407, 49407, 49407]]
    with pytest.warns(UserWarning):
        assert tok("a photo of a cat", max_length=4).tolist() == [[49406, 320, 1125, 49407]]
    assert tok.encode_unpadded("a photo of a cat", max_length=4) == [49406, 320, 1125, 49407]


def test_literal_special_tokens_and_case(real_case):
    tok, _ = real_case
    assert tok.encode_unpadded("<|endoftext|>") == [49406, 49407, 49407]
    assert tok.encode_unpadded("A CAT") == tok.encode_unpadded("a cat")
    assert tok.decode(tok.encode_unpadded("A  photo of a   café!")) == "a photo of a café !"


def test_bad_prompts_raise_config_error(real_case):
    tok, _ = real_case
    with pytest.raises(ConfigError, match="prompts"):
        tok([])
    with pytest.raises(ConfigError, match="prompts"):
        tok(["ok", 3])
    with pytest.raises(ConfigError, match="max_length"):
        tok("x", max_length=1)


def test_save_and_load_round_trip(tmp_path, tiny_case):
    tok, meta, io = tiny_case
    save_tokenizer(tok, tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    again = load_tokenizer(tmp_path / "tok")
    assert again.vocab == tok.vocab and again.merges == tok.merges
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(again(meta["prompts"]), io["input_ids"])


def test_model_root_and_dict_special_tokens(tmp_path, fixtures_dir):
    src = fixtures_dir / "models" / "tokenizer" / "tokenizer"
    root = tmp_path / "root"
    shutil.copytree(src, root / "tokenizer")
    (root / "tokenizer" / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<|startoftext|>", "lstrip": False}, "pad_token": "!"})
    )
    tok = load_tokenizer(root)  # a model root: tokenizer/ is found
    assert tok.pad_id == tok.vocab["!"] and tok.bos_id == 738
    assert tok("a")[0, -1].item() == tok.vocab["!"]


def test_missing_and_corrupt_files_name_the_file(tmp_path, fixtures_dir):
    src = fixtures_dir / "models" / "tokenizer" / "tokenizer"
    folder = tmp_path / "t"
    shutil.copytree(src, folder)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="tokenizer_config.json"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").unlink()
    (folder / "vocab.json").unlink()
    with pytest.raises(WeightsError, match="vocab.json"):
        load_tokenizer(folder)
    shutil.copy(src / "vocab.json", folder / "vocab.json")
    (folder / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(WeightsError, match="merges.txt, line 2"):
        load_tokenizer(folder)
    (folder / "merges.txt").write_text("#version: 0.2\nzz qq\n")
    with pytest.raises(ConfigError, match="merges"):
        load_tokenizer(folder)
    with pytest.raises(WeightsError, match="not found"):
        load_tokenizer(tmp_path / "nowhere")


def test_special_token_must_be_in_vocab():
    vocab = {c: i for i, c in enumerate(byte_alphabet().values())}
    with pytest.raises(ConfigError, match="bos_token"):
        ClipTokenizer(vocab, [])
