"""A client of a running `appliance serve`, for the CLI: while the service runs, `ask`, `search` and
`status` go through it, so the model stays loaded once (in the service) and the service records the
caller from the socket. With no service listening, the CLI works in-process as before.

The socket is `$APPLIANCE_SOCKET`, else `$XDG_RUNTIME_DIR/appliance.sock`, else `/run/appliance/api.sock`.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from appliance.config import default_socket
from appliance.errors import ApplianceError, ExitCode

SYSTEM_SOCKET = Path("/run/appliance/api.sock")


def find_socket() -> Path | None:
    """The first socket a service answers on, or None."""
    explicit = os.environ.get("APPLIANCE_SOCKET")
    for candidate in ([Path(explicit)] if explicit else [default_socket(), SYSTEM_SOCKET]):
        if not candidate.is_socket():
            continue
        probe = socket.socket(socket.AF_UNIX)
        probe.settimeout(0.5)
        try:
            probe.connect(str(candidate))
            return candidate
        except OSError:
            continue
        finally:
            probe.close()
    return None


class ServiceError(ApplianceError):
    exit_code = ExitCode.FAILURE


@dataclass
class RemoteAnswer:
    """What `appliance ask` prints, as the service returned it."""

    answer: str
    sources: list = field(default_factory=list)
    citations: list = field(default_factory=list)
    unknown_citations: list = field(default_factory=list)
    unverified_codes: list = field(default_factory=list)
    miscited_codes: list = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    audit_id: int | None = None
    question: str = ""

    def to_json(self) -> dict:
        return {"question": self.question, "answer": self.answer, "citations": self.citations,
                "unknown_citations": self.unknown_citations, "unverified_codes": self.unverified_codes,
                "miscited_codes": self.miscited_codes,
                "sources": [{"n": i, **s.to_json()} for i, s in enumerate(self.sources, start=1)],
                "model": self.model, "timing": self.timing, "audit_id": self.audit_id}


def _hit(data: dict) -> SimpleNamespace:
    hit = SimpleNamespace(**data)
    hit.to_json = lambda: {k: v for k, v in data.items() if k != "n"}
    return hit


class ServiceClient:
    def __init__(self, path: Path):
        import httpx

        self.path = path
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://appliance",
                                 timeout=httpx.Timeout(10.0, read=600.0))

    def close(self) -> None:
        self.http.close()

    def _check(self, response):
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise ServiceError(f"the service at {self.path} answered {response.status_code}: {message}",
                               "see `journalctl -u appliance` or the `appliance serve` output")
        return response.json()

    def status(self) -> dict:
        return self._check(self.http.get("/appliance/status"))

    def search(self, query: str, k: int, collection: str | None) -> list:
        params = {"q": query, "k": k, **({"collection": collection} if collection else {})}
        return [_hit(h) for h in self._check(self.http.get("/appliance/search", params=params))["results"]]

    def ask(self, question: str, collection: str | None, use_rag: bool, max_tokens: int | None,
            temperature: float | None, on_text: Callable[[str], None] | None = None) -> RemoteAnswer:
        body = {"messages": [{"role": "user", "content": question}], "stream": True, "rag": use_rag,
                **({"collection": collection} if collection else {}),
                **({"max_tokens": max_tokens} if max_tokens else {}),
                **({"temperature": temperature} if temperature is not None else {})}
        pieces, final = [], None
        with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise ServiceError(event["error"]["message"], "see the service's log")
                delta = event["choices"][0]["delta"].get("content")
                if delta:
                    pieces.append(delta)
                    if on_text:
                        on_text(delta)
                if "usage" in event:
                    final = event
        if final is None:
            raise ServiceError("the service closed the answer early", "try again; see the service's log")
        appliance = final.get("appliance", {})
        return RemoteAnswer(answer="".join(pieces).strip(), question=question,
                            sources=[_hit(s) for s in final.get("sources", [])],
                            citations=final.get("citations", []),
                            unknown_citations=final.get("unknown_citations", []),
                            unverified_codes=final.get("unverified_codes", []),
                            miscited_codes=final.get("miscited_codes", []),
                            timing=appliance.get("timing", {}), audit_id=final.get("audit_id"),
                            model={"name": final.get("model"), "generation": appliance.get("generation")})
