"""The small interfaces the rest of the appliance depends on, so tests and the UI can swap an edge."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from appliance.schemas import (
    AnswerReport,
    AuditVerdict,
    BundleCheck,
    DocumentRow,
    DraftReport,
    ExportWritten,
    FeedbackRecorded,
    Generations,
    IngestReport,
    Installed,
    Source,
    Status,
)


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""


@dataclass(frozen=True)
class Sampling:
    """How an answer is decoded, the same in process (llama-cpp-python) and on the engine server
    (llama-server's /completion): `temperature` 0 is greedy; `top_p` the nucleus; `logit_bias` (token
    id, bias) pairs added to the logits before sampling, -100 all but bans a token, as in OpenAI's API;
    `seed`: the same seed, prompt and model give the same answer (None: the engine's own); `stop`:
    strings that end the answer where one first appears (it is not included). The API does not set
    top_k, min_p or the repeat penalty."""

    temperature: float
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()


class Generator(Protocol):
    name: str

    def count_tokens(self, text: str) -> int: ...

    def stream(self, messages: list[dict], max_tokens: int, sampling: Sampling) -> Iterator[str]:
        """Render the chat template and yield one text piece per generated token (possibly "")."""


class Backend(Protocol):
    """What the CLI and the operator UI call: the Appliance in process, or appliance.client.ServiceClient
    through the running service. Both take these arguments and return these types, the contract's
    models (appliance.schemas): tests/test_backend.py compares them, and checks that the CLI and the
    UI call nothing else, so a command behaves the same either way; each may take more (the
    Appliance's `user`, ...)."""

    def status(self) -> Status: ...

    def documents(self, collection: str | None = None) -> list[DocumentRow]: ...

    def generations(self) -> Generations: ...

    def search(self, query: str, k: int | None = None, collection: str | None = None) -> list[Source]: ...

    def lookup(self, query: str, collection: str | None = None, limit: int = 20) -> list[dict]: ...

    def ask(
        self,
        question: str,
        *,
        collection: str | None = None,
        use_rag: bool = True,
        max_tokens: int | None = None,
        temperature: float | None = None,
        on_text: Callable[[str], None] | None = None,
        conversation: int | None = None,
    ) -> AnswerReport: ...

    def new_conversation(self, user: str | None = None) -> int: ...

    def ingest(
        self, paths: list[Path], collection: str, progress: Callable | None = None
    ) -> IngestReport: ...

    def remove_document(self, doc_id: int) -> DocumentRow: ...

    def draft(
        self,
        rfp: Path,
        collections: list[str] | None = None,
        max_tokens: int | None = None,
        progress: Callable | None = None,
    ) -> DraftReport: ...

    def audit_rows(
        self, action: str | None = None, user: str | None = None, limit: int = 50
    ) -> list[dict]: ...

    def audit_verify(self, against: list[str] | None = None) -> AuditVerdict: ...

    def verify_bundle(self, directory: Path, progress: Callable | None = None) -> BundleCheck: ...

    def install_bundle(
        self,
        directory: Path,
        allow_downgrade: bool = False,
        progress: Callable | None = None,
        reembed_progress: Callable | None = None,
    ) -> Installed: ...

    def rollback(self) -> tuple[int, int]: ...

    def feedback(self, answer_audit_id: int, kind: str, **fields) -> FeedbackRecorded: ...

    def feedback_items(
        self, pending_only: bool = False, since: str | None = None, limit: int | None = None
    ) -> list[dict]: ...

    def feedback_export(self, out: Path, since: str | None = None) -> ExportWritten: ...
