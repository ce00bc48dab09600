"""The CLIP byte-level BPE tokenizer (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"; BPE: Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword
Units"; byte-level alphabet: Radford et al. 2019, GPT-2).

The pipeline, built here from a ``vocab.json`` + ``merges.txt`` pair with the ``tokenizers`` library:

1. special-token text (``<|startoftext|>``, ``<|endoftext|>``, and any other token the folder names as
   bos/eos/pad/unk) is matched in the raw prompt and mapped to its id;
2. the rest is NFC-normalised, whitespace runs collapse to one space, and it is lower-cased;
3. it is split into words with the CLIP pattern (contractions, runs of letters, single digits, runs of
   other non-space symbols); whitespace is dropped;
4. each word's UTF-8 bytes are mapped to GPT-2's printable byte alphabet, ``</w>`` is appended to the last
   symbol, and merges are applied by rank;
5. ``[BOS] + ids + [EOS]``, truncated to ``max_length`` (BOS first and EOS last are kept), padded with the
   pad token.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers

from diffusekit.errors import ConfigError, check_positive_int

END_OF_WORD = "</w>"  # suffix marking a symbol that ends a word (CLIP's BPE convention)
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# CLIP's word-splitting pattern: contractions, runs of letters, single digits, runs of other non-space
# symbols. The special tokens come first so that they stay whole (they matter only when their text
# appears with different case and is lower-cased into them; exact matches are extracted before this).
_CLIP_WORDS = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def byte_alphabet() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters (Radford et al. 2019).

    Bytes 33-126, 161-172 and 174-255 map to the character with the same code point; the other 68 bytes,
    in increasing order, map to chr(256), chr(257), ... . BPE symbols are strings over this alphabet.
    """
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    shifted = [b for b in range(256) if b not in kept]
    table = {b: chr(b) for b in kept}
    table.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return table


class ClipTokenizer:
    """Byte-level BPE tokenizer with CLIP's conventions; ``tok(prompts) -> LongTensor (B, max_length)``.

    ``vocab`` maps token strings to ids, ``merges`` lists symbol pairs from highest to lowest priority.
    ``bos_token`` / ``eos_token`` / ``pad_token`` / ``unk_token`` must be in the vocabulary. As in the
    reference implementation, every one of them is a *special* token: its literal text in a prompt maps to
    its id (note: SD-2.x folders name ``!`` as the pad token, so a ``!`` in a prompt becomes the pad id,
    which is what the reference does too).
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str = EOS_TOKEN,
        unk_token: str | None = EOS_TOKEN,
        model_max_length: int = 77,
        lowercase: bool = True,
    ) -> None:
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.model_max_length = check_positive_int("model_max_length", model_max_length, minimum=2)
        self.lowercase = bool(lowercase)
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = (
            bos_token,
            eos_token,
            pad_token,
            unk_token,
        )
        for name, token in [
            ("bos_token", bos_token),
            ("eos_token", eos_token),
            ("pad_token", pad_token),
            ("unk_token", unk_token),
        ]:
            if token is not None and token not in self.vocab:
                raise ConfigError(f"{name}={token!r} is not in the vocabulary ({len(self.vocab)} tokens)")
        self.bos_id = self.vocab[bos_token]
        self.eos_id = self.vocab[eos_token]
        self.pad_id = self.vocab[pad_token]
        self._tokenizer = self._build()
        self._id_to_token = {i: t for t, i in self.vocab.items()}

    def _build(self) -> Tokenizer:
        try:
            bpe = models.BPE(
                self.vocab,
                self.merges,
                unk_token=self.unk_token,
                continuing_subword_prefix="",
                end_of_word_suffix=END_OF_WORD,
                fuse_unk=False,
            )
        except Exception as e:  # the library reports merges whose symbols are not in the vocabulary
            raise ConfigError(f"merges do not fit the vocabulary: {e}") from None
        tk = Tokenizer(bpe)
        steps = [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " ")]
        if self.lowercase:
            steps.append(normalizers.Lowercase())
        tk.normalizer = normalizers.Sequence(steps)
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                # keep the matches of the CLIP pattern, drop everything between them (whitespace)
                pre_tokenizers.Split(Regex(_CLIP_WORDS), behavior="removed", invert=True),
                # UTF-8 bytes -> GPT-2's printable byte alphabet, no prefix space
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        specials = dict.fromkeys(
            t for t in (self.bos_token, self.eos_token, self.pad_token, self.unk_token) if t
        )
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        return tk

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _content_ids(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise ConfigError(
                f"prompts must be str or a list of str, got an item of type {type(prompt).__name__}"
            )
        return self._tokenizer.encode(prompt, add_special_tokens=False).ids

    def encode_unpadded(self, prompt: str, max_length: int | None = None) -> list[int]:
        """``[BOS] + ids + [EOS]`` without padding; truncated (keeping BOS and EOS) only if ``max_length``."""
        ids = self._content_ids(prompt)
        if max_length is not None:
            check_positive_int("max_length", max_length, minimum=2)
            ids = ids[: max_length - 2]
        return [self.bos_id, *ids, self.eos_id]

    def tokenize(self, prompt: str) -> list[str]:
        """The token strings of ``encode_unpadded(prompt)`` (for debugging)."""
        return [self._id_to_token[i] for i in self.encode_unpadded(prompt)]

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Ids back to text (lower-cased and whitespace-normalised, as the prompt was encoded)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        specials = {self.bos_id, self.eos_id, self.pad_id}
        byte_of = {c: b for b, c in byte_alphabet().items()}
        words, current = [], ""
        for i in ids:
            if i in specials:
                words += [current, "" if skip_special else self._id_to_token[i]]
                current = ""
                continue
            token = self._id_to_token[i]
            current += token
            if token.endswith(END_OF_WORD):
                words.append(current)
                current = ""
        words.append(current)
        text = []
        for w in words:
            if w in (self.bos_token, self.eos_token, self.pad_token):
                text.append(w)
            elif w:
                raw = bytes(byte_of[c] for c in w.removesuffix(END_OF_WORD))
                text.append(raw.decode("utf-8", errors="replace"))
        return " ".join(text)

    def __call__(self, prompts: str | Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """Token ids ``(B, max_length)`` int64: BOS, tokens, EOS, then the pad id.

        ``max_length`` defaults to ``model_max_length`` (77). Longer prompts are truncated, keeping BOS first
        and EOS last, with one warning per call.
        """
        max_length = self.model_max_length if max_length is None else max_length
        check_positive_int("max_length", max_length, minimum=2)
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ConfigError(f"prompts must be a str or a non-empty list of str, got {prompts!r}")
        out = torch.full((len(prompts), max_length), self.pad_id, dtype=torch.long)
        truncated = 0
        for row, prompt in enumerate(prompts):
            ids = self._content_ids(prompt)
            if len(ids) > max_length - 2:
                truncated += 1
                ids = ids[: max_length - 2]
            ids = [self.bos_id, *ids, self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        if truncated:
            warnings.warn(
                f"{truncated} of {len(prompts)} prompt(s) are longer than max_length={max_length} tokens "
                "and were truncated (the text encoder sees only the first tokens)",
                stacklevel=2,
            )
        return out

    def __repr__(self) -> str:
        return (
            f"ClipTokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, bos={self.bos_id}, "
            f"eos={self.eos_id}, pad={self.pad_id}, model_max_length={self.model_max_length})"
        )


__all__ = ["ClipTokenizer", "END_OF_WORD", "BOS_TOKEN", "EOS_TOKEN"]
