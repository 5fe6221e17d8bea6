"""`Pattern`: unstructured, or N:M (keep N of every M consecutive weights along the input dimension).

Parsed once, where a request arrives, and passed inward as this value; it serialises back to the
text a user writes ("2:4", "unstructured"). Kernels take the plain (n, m) pair.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NM = re.compile(r"^(\d+):(\d+)$")
MAX_M = 64


@dataclass(frozen=True)
class Pattern:
    """Unstructured when n = m = 0, else keep `n` of every `m` weights along the input dimension."""

    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def sparsity(self) -> float | None:
        """The sparsity an N:M pattern fixes; None for unstructured."""
        return 1.0 - self.n / self.m if self.structured else None

    @property
    def nm(self) -> tuple[int, int]:
        return self.n, self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else "unstructured"

    @classmethod
    def parse(cls, text: str | Pattern) -> Pattern:
        """'unstructured' or 'N:M' with 0 < N < M <= 64; a ValueError says what to write instead."""
        if isinstance(text, Pattern):
            return text
        if not isinstance(text, str):
            raise ValueError(f"pattern must be a string such as '2:4' or 'unstructured', not {text!r}")
        text = text.strip().lower()
        if text == "unstructured":
            return cls()
        match = _NM.match(text)
        if not match:
            raise ValueError(f"pattern {text!r} is neither 'unstructured' nor 'N:M' (for example '2:4')")
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise ValueError(f"pattern {text!r}: N:M needs 0 < N < M (keep N of every M weights), e.g. '2:4'")
        if m > MAX_M:
            raise ValueError(f"pattern {text!r}: M must be at most {MAX_M}")
        return cls(n=n, m=m)


UNSTRUCTURED = Pattern()
