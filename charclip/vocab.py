"""The vocabulary: the sorted set of the corpus's characters, stored with every checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from charclip.errors import CharclipError


@dataclass(frozen=True)
class Vocab:
    chars: str  # sorted, no repeats; index i is token i

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        return cls("".join(sorted(set(text))))

    def __post_init__(self) -> None:
        if not self.chars:
            raise CharclipError("the vocabulary is empty")
        if list(self.chars) != sorted(set(self.chars)):
            raise CharclipError("the vocabulary must be sorted characters without repeats")

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str, *, what: str = "text") -> np.ndarray:
        index = {c: i for i, c in enumerate(self.chars)}
        unknown = sorted(set(text) - index.keys())
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise CharclipError(
                f"{what} has {len(unknown)} character(s) outside the model's vocabulary: {shown}"
            )
        return np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)
