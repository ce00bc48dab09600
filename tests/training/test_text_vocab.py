"""The caption vocabulary: CLIP's layout, whole words for frequent caption words, any text encodable, and the
saved folder read back by our tokenizer loader."""

from __future__ import annotations

import pytest

from diffusekit.io.text import load_tokenizer, save_tokenizer
from diffusekit.networks.tokenizer import BOS_TOKEN, EOS_TOKEN, byte_alphabet
from diffusekit.training.text_vocab import BASE_SYMBOLS, caption_words, train_tokenizer

CAPTIONS = ["a handwritten seven", "a handwritten three", "A  bold\nseven", "a bold three", "café au lait"] * 3


def test_layout_is_clips():
    tok = train_tokenizer(CAPTIONS, vocab_size=600)
    symbols = list(byte_alphabet().values())
    assert [tok.vocab[s] for s in symbols] == list(range(256))
    assert [tok.vocab[s + "</w>"] for s in symbols] == list(range(256, 512))
    assert tok.vocab[BOS_TOKEN] == len(tok.vocab) - 2 and tok.vocab[EOS_TOKEN] == len(tok.vocab) - 1
    assert BASE_SYMBOLS < len(tok.vocab) <= 600
    for i, (a, b) in enumerate(tok.merges):  # one symbol per merge, in merge order
        assert tok.vocab[a + b] == 512 + i


def test_frequent_words_become_one_token_and_anything_encodes():
    tok = train_tokenizer(CAPTIONS, vocab_size=600)
    assert tok.tokenize("A handwritten SEVEN") == [BOS_TOKEN, "a</w>", "handwritten</w>", "seven</w>", EOS_TOKEN]
    unseen = "zebra \u00fc 42!"
    ids = tok.encode_unpadded(unseen)
    assert tok.unk_token not in tok.tokenize(unseen)[1:-1]
    assert tok.decode(ids) == "zebra \u00fc 4 2 !"  # CLIP splits digits and punctuation into words


def test_vocab_size_caps_the_merges():
    small = train_tokenizer(CAPTIONS, vocab_size=BASE_SYMBOLS + 3)
    assert len(small.merges) == 3 and len(small.vocab) == BASE_SYMBOLS + 3
    assert small.merges == train_tokenizer(CAPTIONS, vocab_size=600).merges[:3]  # the most frequent pairs first
    with pytest.raises(Exception, match="text vocabulary size"):
        train_tokenizer(CAPTIONS, vocab_size=100)


def test_words_follow_the_clip_split():
    assert caption_words(["It's  A dog<|endoftext|>!"]) == ["it", "'s", "a", "dog", "!"]


def test_saved_folder_round_trips(tmp_path):
    tok = train_tokenizer(CAPTIONS, vocab_size=600, model_max_length=16)
    save_tokenizer(tok, tmp_path / "tokenizer")
    assert {p.name for p in (tmp_path / "tokenizer").iterdir()} >= {"vocab.json", "merges.txt"}
    back = load_tokenizer(tmp_path / "tokenizer")
    assert back.vocab == tok.vocab and back.merges == tok.merges and back.model_max_length == 16
    for text in CAPTIONS + ["zebra \u00fc"]:
        assert back(text).tolist() == tok(text).tolist()
