"""A small CLIP-style BPE vocabulary learned from a training set's captions, for a text encoder trained from
scratch (BPE: Sennrich et al. 2016; CLIP's byte-level variant: Radford et al. 2021).

The captions are split into words exactly as :class:`diffusekit.networks.tokenizer.ClipTokenizer` splits a
prompt (NFC, whitespace folded, lower-cased, CLIP's word pattern, UTF-8 bytes in GPT-2's printable alphabet),
by running that tokenizer with a vocabulary of bare bytes; the ``tokenizers`` library's BPE trainer then learns
merges over those words with CLIP's ``</w>`` end-of-word marker. The vocabulary is laid out as CLIP's: the 256
byte symbols, the same 256 with ``</w>``, one symbol per merge in merge order, then ``<|startoftext|>`` and
``<|endoftext|>`` (also the pad and unknown token). Every byte stays in the vocabulary, so any prompt encodes,
words never seen in training as single bytes. Saved with :func:`diffusekit.io.text.save_tokenizer` as the
``vocab.json`` + ``merges.txt`` folder every CLIP tokenizer loader reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from diffusekit.errors import ConfigError
from diffusekit.limits import check_int
from diffusekit.networks.tokenizer import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, ClipTokenizer, byte_alphabet

BASE_SYMBOLS = 2 * 256 + 2  # bytes, bytes + </w>, BOS, EOS
DEFAULT_VOCAB_SIZE = 1024
MAX_VOCAB_SIZE = 49408  # CLIP's own size; a caption set needs far fewer
MIN_PAIR_COUNT = 2  # a pair seen once is not merged (it would only memorise one caption)


def byte_vocab(merges: Sequence[tuple[str, str]] = ()) -> dict[str, int]:
    """CLIP's vocabulary layout for ``merges``: bytes, bytes + ``</w>``, one symbol per merge, BOS, EOS."""
    symbols = list(byte_alphabet().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConfigError("the learned merges produce a symbol twice")
    return vocab


def caption_words(texts: Iterable[str], *, lowercase: bool = True) -> list[str]:
    """Every word of ``texts`` in the byte alphabet, without ``</w>``, as the CLIP tokenizer splits them
    (special-token text such as ``<|endoftext|>`` is no word and is left out)."""
    splitter = ClipTokenizer(byte_vocab(), [], lowercase=lowercase)
    words: list[str] = []
    for text in texts:
        current = ""
        for symbol in splitter.tokenize(text)[1:-1]:  # without BOS/EOS
            if symbol in (BOS_TOKEN, EOS_TOKEN):
                current = ""
                continue
            current += symbol
            if symbol.endswith(END_OF_WORD):
                words.append(current.removesuffix(END_OF_WORD))
                current = ""
    return words


def train_tokenizer(
    texts: Sequence[str], *, vocab_size: int = DEFAULT_VOCAB_SIZE, model_max_length: int = 77
) -> ClipTokenizer:
    """A :class:`ClipTokenizer` whose merges are learned from ``texts`` (captions): at most ``vocab_size``
    tokens in all (bytes, bytes + ``</w>``, merges, BOS and EOS), merges of pairs seen at least twice."""
    check_int("text vocabulary size", vocab_size, BASE_SYMBOLS, MAX_VOCAB_SIZE)
    words = caption_words(texts)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + BASE_SYMBOLS,  # its count includes the alphabet; the merges are cut below
        min_frequency=MIN_PAIR_COUNT,
        show_progress=False,
        initial_alphabet=list(byte_alphabet().values()),
        end_of_word_suffix=END_OF_WORD,
        special_tokens=[],
    )
    bpe = Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # the words contain no whitespace (byte alphabet)
    bpe.train_from_iterator(iter(words), trainer)
    learned = json.loads(bpe.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned]
    merges = merges[: vocab_size - BASE_SYMBOLS]  # a prefix of a merge list is a consistent BPE
    return ClipTokenizer(byte_vocab(merges), merges, model_max_length=model_max_length)


__all__ = ["BASE_SYMBOLS", "DEFAULT_VOCAB_SIZE", "byte_vocab", "caption_words", "train_tokenizer"]
