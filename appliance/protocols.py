"""The small interfaces the rest of the appliance depends on, so tests and the UI can swap an edge."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""


class Generator(Protocol):
    name: str

    def count_tokens(self, text: str) -> int: ...

    def stream(self, messages: list[dict], max_tokens: int, temperature: float) -> Iterator[str]:
        """Render the chat template and yield one text piece per generated token (possibly "")."""
