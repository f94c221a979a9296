"""A small word-level vocabulary saved with the model (``vocab.json``).

Policy for words the vocabulary doesn't know: they map to ``<unk>`` and a ``UnknownTokenWarning`` is issued
(``unknown="warn"``, the default), or ``UnknownTokenError`` is raised (``unknown="error"``). Text longer than the
model's limit is refused with ``TextTooLongError`` (``too_long="error"``, the default) or cut with a warning
(``too_long="truncate"``).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

from deploykit.errors import DataError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


class UnknownTokenWarning(UserWarning):
    """Input text had words outside the vocabulary; they were replaced by <unk>."""


class UnknownTokenError(DataError):
    """Input text had words outside the vocabulary and the policy is to refuse."""


class TextTooLongError(DataError):
    """Input text is longer than the model's text limit."""


class TextTooLongWarning(UserWarning):
    """Input text was cut to the model's text limit."""


def split_words(text: str) -> list[str]:
    """Lower-case words and punctuation marks as separate tokens."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


class Vocab:
    """Word <-> id mapping; ids 0..3 are <pad>, <bos>, <eos>, <unk>."""

    def __init__(self, words: list[str]):
        self.itos = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, texts: list[str]) -> Vocab:
        """Vocabulary of every word in ``texts``, in sorted order (deterministic)."""
        return cls(sorted({w for t in texts for w in split_words(t)}))

    def encode(self, text: str, max_len: int | None = None, unknown: str = "warn", too_long: str = "error"
               ) -> list[int]:
        """Word ids of ``text`` under the documented unknown-word and length policies."""
        words = split_words(text)
        if not words:
            raise DataError("empty text; give at least one word")
        unk = [w for w in words if w not in self.stoi]
        if unk:
            msg = (f"word(s) {sorted(set(unk))} are not in the model's vocabulary ({len(self)} words); "
                   "they are replaced by <unk>")
            if unknown == "error":
                raise UnknownTokenError(msg.replace("they are replaced by <unk>", "rephrase with known words, or "
                                                    "pass unknown='warn' to map them to <unk>"))
            warnings.warn(msg, UnknownTokenWarning, stacklevel=2)
        if max_len is not None and len(words) > max_len:
            if too_long == "error":
                raise TextTooLongError(f"text has {len(words)} words, the model takes at most {max_len}; shorten "
                                       "it, or pass too_long='truncate' to cut it")
            warnings.warn(f"text of {len(words)} words cut to {max_len}", TextTooLongWarning, stacklevel=2)
            words = words[:max_len]
        return [self.stoi.get(w, self.unk_id) for w in words]

    def decode(self, ids: list[int]) -> str:
        """Words of ``ids`` up to the first <eos>, specials dropped."""
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i >= len(SPECIALS):
                out.append(self.itos[i])
        return " ".join(out)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"itos": self.itos}, indent=0) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        p = Path(path)
        if not p.exists():
            raise DataError(f"vocabulary file {p} is missing; re-export the model")
        itos = json.loads(p.read_text())["itos"]
        if list(itos[:4]) != list(SPECIALS):
            raise DataError(f"{p} is not a deploykit MuE vocabulary (first ids must be {SPECIALS})")
        return cls(itos[4:])
