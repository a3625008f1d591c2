"""Character-level text corpora that need no download.

The default corpus is the documentation CPython ships for ``help()``:
``pydoc_data.topics.topics``, a dict of topic name → text (79 topics, about 465 000 characters
in CPython 3.11). The topics are joined in sorted-name order (separated by a blank line), so the
corpus, its vocabulary and its splits are the same on every machine running the same Python
version. A local UTF-8 text file may be used instead.

Splits follow the enwik8/text8 convention (Mikolov et al. 2012; Mahoney's benchmarks): one
contiguous stream cut into its first 90 % (train), the next 5 % (validation) and the last 5 %
(test), with one character vocabulary built from the whole stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["CharCorpus", "load_text", "pydoc_topics_text", "load_corpus", "SPLITS"]

SPLITS = ("train", "valid", "test")


def pydoc_topics_text() -> str:
    """The text of every ``help()`` topic CPython ships (``pydoc_data.topics``), sorted by name."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def load_text(path: str | Path | None = None) -> str:
    """``path``'s UTF-8 text, or the ``help()`` topics when ``path`` is None.

    Raises ``FileNotFoundError`` / ``IsADirectoryError`` for a missing path and ``ValueError``
    for a file that is not UTF-8 text or is empty."""
    if path is None:
        return pydoc_topics_text()
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not text:
        raise ValueError(f"{path}: the file is empty")
    return text


@dataclass
class CharCorpus:
    """A character stream split into contiguous ``train``/``valid``/``test`` parts.

    ``vocab``: the sorted distinct characters; ``train``, ``valid``, ``test``: int64 token ids
    of shape ``(n_split,)``; ``name``: where the text came from."""

    name: str
    vocab: list[str]
    train: Tensor
    valid: Tensor
    test: Tensor

    @classmethod
    def from_text(cls, text: str, *, name: str = "text", fractions: tuple[float, float] = (0.9, 0.05),
                  min_split: int = 2) -> "CharCorpus":
        """Split ``text`` into train (first ``fractions[0]``), valid (next ``fractions[1]``) and
        test (the rest). Raises ``ValueError`` if a split would hold fewer than ``min_split``
        characters (too short a text to give each split one target) or the fractions are invalid."""
        f_train, f_valid = fractions
        if not (0 < f_train < 1 and 0 < f_valid < 1 and f_train + f_valid < 1):
            raise ValueError(f"split fractions must be in (0, 1) and sum to < 1, got {fractions}")
        vocab = sorted(set(text))
        ids = _ids(text, vocab)
        n = ids.numel()
        a, b = int(n * f_train), int(n * (f_train + f_valid))
        if min(a, b - a, n - b) < min_split:
            raise ValueError(f"{name}: {n} characters are too few for train/valid/test splits of "
                             f"{fractions[0]:.0%}/{fractions[1]:.0%}/rest (each needs ≥ {min_split})")
        return cls(name, vocab, ids[:a], ids[a:b], ids[b:])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, name: str) -> Tensor:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    def encode(self, text: str) -> Tensor:
        """Token ids of ``text`` (``KeyError`` naming a character outside the vocabulary)."""
        unknown = set(text) - set(self.vocab)
        if unknown:
            raise KeyError(f"character {min(unknown)!r} is not in the corpus vocabulary")
        return _ids(text, self.vocab)

    def decode(self, ids: Tensor) -> str:
        return "".join(map(self.vocab.__getitem__, ids.reshape(-1).tolist()))

    def windows(self, split: str, length: int) -> Tensor:
        """Non-overlapping windows ``(n, length + 1)`` of ``split``: inputs are ``w[:, :-1]``,
        next-character targets ``w[:, 1:]``; consecutive windows share their boundary character,
        so every character after the first is a target exactly once. The tail shorter than a
        full window is dropped (``ValueError`` if the split has no full window)."""
        if length < 1:
            raise ValueError(f"window length must be >= 1, got {length}")
        ids = self.split(split)
        n = (ids.numel() - 1) // length
        if n < 1:
            raise ValueError(f"{self.name}: the {split} split ({ids.numel()} characters) is shorter than one "
                             f"window of {length} + 1 characters")
        return ids[: n * length + 1].unfold(0, length + 1, length)


def _ids(text: str, vocab: list[str]) -> Tensor:
    """Index of each character of ``text`` in the sorted ``vocab`` (which holds all of them)."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.array([ord(c) for c in vocab], dtype=np.uint32)  # sorted, as vocab is
    return torch.from_numpy(np.searchsorted(table, points).astype(np.int64))


def load_corpus(path: str | Path | None = None, *, max_chars: int | None = None) -> CharCorpus:
    """The corpus of ``path`` (default: the ``help()`` topics), optionally truncated to its first
    ``max_chars`` characters before splitting."""
    text = load_text(path)
    if max_chars is not None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        text = text[:max_chars]
    name = "pydoc_topics" if path is None else str(path)
    return CharCorpus.from_text(text, name=name)
