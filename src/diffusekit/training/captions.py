"""Captions of an image folder: ``image.txt`` beside ``image.png`` (the community convention of kohya's and
other trainers).

A caption file is read whole as UTF-8 (a leading byte-order mark is dropped) and its whitespace normalised:
line breaks and runs of spaces become one space, both ends are stripped. An empty (or all-whitespace) caption
is allowed and means the empty prompt -- the same text classifier-free guidance uses as its unconditional
input -- so such an image teaches the unconditional model.

An image without a caption file takes the ``default`` caption (``--caption``) when one is given; without one,
a folder where any image lacks its caption is refused naming the images and ``--caption``. A caption file that
is not UTF-8 (or cannot be read, or is larger than :data:`MAX_CAPTION_BYTES`) is refused naming the file, or
with ``skip_bad`` its image is left out of training (named on stderr), as unreadable images are.

Used by the latent text-conditional trainer and by LoRA fine-tuning::

    captions = read_captions(dataset.files, default=args.caption, skip_bad=args.skip_bad_images)
    dataset = keep_images(dataset, captions.kept)   # drops images whose caption file was bad
    texts = captions.texts                            # one caption per kept image, in the dataset's order
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffusekit.errors import ConfigError
from diffusekit.training.data import ImageFolderDataset

CAPTION_SUFFIX = ".txt"
MAX_CAPTION_BYTES = 64 * 1024  # far beyond any text encoder's context (77 tokens); a larger file is no caption
MAX_LISTED = 10  # files named in one message
CAPTION_OPTION = "--caption"


class CaptionError(ConfigError):
    """A caption file is missing, unreadable or not UTF-8; the message names the file(s)."""


@dataclass(frozen=True)
class Captions:
    """The captions of a list of images.

    ``texts[j]`` is the caption of image ``kept[j]`` (an index into the list given to :func:`read_captions`);
    ``skipped`` lists the caption files that were left out with their image (``skip_bad``), each with why;
    ``from_files`` counts the captions read from files (the others are the default caption).
    """

    texts: list[str]
    kept: list[int]
    skipped: list[str]
    from_files: int


def caption_path(image: str | os.PathLike) -> Path:
    """The caption file of an image: the same path with the suffix ``.txt`` (``cat.png`` -> ``cat.txt``)."""
    return Path(image).with_suffix(CAPTION_SUFFIX)


def normalise_caption(text: str) -> str:
    """Line breaks and runs of whitespace -> one space; both ends stripped ("" stays the empty prompt)."""
    return " ".join(text.split())


def read_caption(path: str | os.PathLike) -> str:
    """One caption file as normalised text (see :func:`normalise_caption`). CaptionError naming the file when it
    cannot be read, is larger than :data:`MAX_CAPTION_BYTES` or is not UTF-8 (with the offending byte's offset)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CAPTION_BYTES + 1)
    except OSError as e:
        raise CaptionError(f"{path}: cannot read the caption file ({e.strerror or e})") from None
    if len(data) > MAX_CAPTION_BYTES:
        raise CaptionError(f"{path}: a caption file must be at most {MAX_CAPTION_BYTES} bytes; this one is larger")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CaptionError(
            f"{path}: the caption file is not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r}); "
            "save it as UTF-8"
        ) from None
    return normalise_caption(text)


def read_captions(
    images: Sequence[str | os.PathLike], *, default: str | None = None, skip_bad: bool = False
) -> Captions:
    """The caption of every image in ``images`` (in that order): its ``.txt`` file, else ``default``.

    Refused with a CaptionError (a ConfigError): images without a caption file when ``default`` is None
    (naming a few of them and ``--caption``); caption files that cannot be read or are not UTF-8 (naming
    them), unless ``skip_bad``, which leaves those images out and names them on stderr; no images left.
    """
    if default is not None:
        if not isinstance(default, str):
            raise ConfigError(f"{CAPTION_OPTION} must be a string, got {type(default).__name__}")
        default = normalise_caption(default)
    texts: list[str] = []
    kept: list[int] = []
    bad: list[str] = []
    missing: list[Path] = []
    from_files = 0
    for i, image in enumerate(images):
        path = caption_path(image)
        if not path.is_file():
            if default is None:
                missing.append(Path(image))
                continue
            texts.append(default)
            kept.append(i)
            continue
        try:
            texts.append(read_caption(path))
        except CaptionError as e:
            bad.append(str(e))
            continue
        kept.append(i)
        from_files += 1
    if missing:
        if len(missing) == len(images):
            where = f"{Path(images[0]).parent}: no image has a caption file" if images else "no images"
        else:
            where = f"{len(missing)} of {len(images)} images have no caption file: {_listed(map(str, missing))}"
        raise CaptionError(
            f"{where} (a caption is a .txt file of the same name beside the image, e.g. "
            f"{caption_path(missing[0]).name} for {missing[0].name}); give {CAPTION_OPTION} TEXT to caption "
            "them all with one text"
        )
    if bad:
        if not skip_bad or not kept:
            hint = "; --skip-bad-images trains on the other images without them" if kept else ""
            raise CaptionError(f"{len(bad)} caption files cannot be used: {_listed(bad)}{hint}")
        print(f"note: skipping {len(bad)} images whose caption files cannot be used: {_listed(bad)}", file=sys.stderr)
    return Captions(texts=texts, kept=kept, skipped=bad, from_files=from_files)


def keep_images(dataset: ImageFolderDataset, kept: Sequence[int]) -> ImageFolderDataset:
    """A copy of an image-folder dataset holding only the images ``kept`` (indices, in that order), with
    their labels; the given dataset is left as it was. Used with :attr:`Captions.kept`."""
    if list(kept) == list(range(len(dataset))):
        return dataset
    subset = copy.copy(dataset)
    subset.files = [dataset.files[i] for i in kept]
    if dataset.labels is not None:
        subset.labels = [dataset.labels[i] for i in kept]
    return subset


def _listed(items: object) -> str:
    items = list(items)  # type: ignore[call-overload]
    text = "; ".join(items[:MAX_LISTED])
    return text + (f"; and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


__all__ = [
    "CAPTION_SUFFIX",
    "MAX_CAPTION_BYTES",
    "CaptionError",
    "Captions",
    "caption_path",
    "keep_images",
    "normalise_caption",
    "read_caption",
    "read_captions",
]
