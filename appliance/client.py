"""A client of a running `appliance serve`, for the CLI and the operator UI. While the service runs,
whatever loads the model or writes the database goes through it, so the model is loaded once (in the
service), one process writes, and the service records the caller from the socket. With no service
listening, the CLI and the UI work in-process on an `Appliance`.

`ServiceClient` has the methods of `Appliance` that those callers use (appliance.protocols.Backend),
with the same arguments, returning the same models (appliance.schemas), so a caller holds either; a
service that cannot be reached is an `ApplianceError` (ServiceError) like any other, never a bare
transport error. Files are read here, as the caller, and sent to
the service (ingest, draft): nothing is ingested with the service's permissions that the caller
could not read.

The socket is the setting `socket` (APPLIANCE_SOCKET), else `$XDG_RUNTIME_DIR/appliance.sock` (or
`run/appliance.sock` under the home), else `/run/appliance/api.sock` (config.ClientSettings); one in a
directory others can write, or where the socket or its directory (after following links) belongs to
someone other than the caller, root or the service's user (`service_user`, default `appliance`), is
never used (`config.untrusted_socket`).
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import sys
from collections.abc import Callable
from pathlib import Path

from appliance.config import ClientSettings, trusted_uids, untrusted_socket
from appliance.documents.readers import expand_paths
from appliance.errors import ApplianceError, ExitCode
from appliance.schemas import (
    AnswerReport,
    AuditRows,
    AuditVerdict,
    BundleCheck,
    BundleRequest,
    Conversation,
    DocumentRow,
    Documents,
    DraftReport,
    ExportRequest,
    ExportWritten,
    FeedbackExport,
    FeedbackItems,
    FeedbackRecorded,
    Generations,
    Home,
    IngestReport,
    Installed,
    LookupRows,
    Removed,
    RolledBack,
    SearchResults,
    Source,
    Status,
    WrittenRequest,
)


def find_socket() -> Path | None:
    """The first socket a service answers on, or None."""
    for candidate in ClientSettings().socket_candidates():
        if not candidate.is_socket():
            continue
        why = untrusted_socket(candidate)
        if why:  # what we would send (documents, questions) could go to whoever planted it
            print(f"appliance: not using the service socket {candidate}: {why}", file=sys.stderr)
            continue
        probe = socket.socket(socket.AF_UNIX)
        probe.settimeout(0.5)
        try:
            probe.connect(str(candidate))
            # Who answered, from the kernel: the path was checked, but what listens there now is what counts.
            _, uid, _ = struct.unpack(
                "3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            )
        except OSError:
            continue
        finally:
            probe.close()
        if uid not in trusted_uids():
            print(
                f"appliance: not using the service socket {candidate}: the process listening there runs as uid "
                f"{uid}, not as you, root or the service's user",
                file=sys.stderr,
            )
            continue
        return candidate
    return None


class ServiceError(ApplianceError):
    exit_code = ExitCode.FAILURE


def _sse(response):
    """The JSON events of a server-sent event stream (parsed by httpx-sse: comments, multi-line data
    and the final [DONE] handled as the standard says); an error event is raised as ServiceError."""
    from httpx_sse import EventSource

    for sse in EventSource(response).iter_sse():
        if sse.data.startswith("{"):
            event = json.loads(sse.data)
            if "error" in event:
                raise ServiceError(event["error"]["message"], "see the service's log")
            yield event


def _events(response, progress: Callable | None):
    """Read a progress stream (service.progress_events): report each event, return the result."""
    for event in _sse(response):
        if "result" in event:
            return event["result"]
        if progress:
            progress(event["item"], event["done"], event["total"])
    raise ServiceError("the service closed the stream before the result", "try again; see the service's log")


def running_service(home: Path | None = None) -> ServiceClient | None:
    """A client of the running service that serves `home` (the default home when None), or None: no
    service is listening on a trusted socket, or it serves another home (then work in process)."""
    from appliance.config import default_home

    path = find_socket()
    if path is None:
        return None
    client = ServiceClient(path)
    if Path(home or default_home()).resolve() != client.home().resolve():
        client.close()
        return None
    return client


def _unreachable(path: Path, exc: Exception) -> ServiceError:
    """The service stopped, restarts or timed out: the caller says so and stays up (the next call connects again)."""
    return ServiceError(
        f"the appliance service at {path} is not answering ({type(exc).__name__})",
        "start it again (`systemctl start appliance` or `appliance serve`) and retry",
    )


class ServiceClient:
    def __init__(self, path: Path):
        import httpx

        self.path = path

        class Client(httpx.Client):
            def send(self, *args, **kwargs):  # every request goes through here, streamed or not
                try:
                    return super().send(*args, **kwargs)
                except httpx.TransportError as exc:
                    raise _unreachable(path, exc) from exc

        self.http = Client(
            transport=httpx.HTTPTransport(uds=str(path)),
            base_url="http://appliance",
            timeout=httpx.Timeout(10.0, read=600.0),
        )

    def close(self) -> None:
        self.http.close()

    def _check(self, response):
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise ServiceError(
                f"the service at {self.path} answered {response.status_code}: {message}",
                "see `journalctl -u appliance` or the `appliance serve` output",
            )
        return response.json()

    @contextlib.contextmanager
    def _open(self, method: str, url: str, **kwargs):
        """A streamed response, its error (if any) raised as the service worded it; the connection lost
        while reading it is a ServiceError too."""
        import httpx

        with self.http.stream(method, url, **kwargs) as r:
            if r.status_code >= 400:
                r.read()
                self._check(r)
            try:
                yield r
            except httpx.TransportError as exc:
                raise _unreachable(self.path, exc) from exc

    def _stream(self, method: str, url: str, progress: Callable | None = None, **kwargs):
        with self._open(method, url, **kwargs) as r:
            return _events(r, progress)

    def home(self) -> Path:
        return Path(Home.model_validate(self._check(self.http.get("/appliance/home"))).home)

    def status(self) -> Status:
        return Status.model_validate(self._check(self.http.get("/appliance/status")))

    def documents(self, collection: str | None = None) -> list[DocumentRow]:
        params = {"collection": collection} if collection else {}
        return Documents.model_validate(
            self._check(self.http.get("/appliance/documents", params=params))
        ).documents

    def generations(self) -> Generations:
        return Generations.model_validate(self._check(self.http.get("/appliance/bundles")))

    def audit_rows(self, action: str | None = None, user: str | None = None, limit: int = 50) -> list[dict]:
        params = {k: v for k, v in (("action", action), ("user", user)) if v} | {"limit": limit}
        return AuditRows.model_validate(self._check(self.http.get("/appliance/audit", params=params))).rows

    def audit_verify(self, against: list[str] | None = None) -> AuditVerdict:
        if against is not None:
            return AuditVerdict.model_validate(
                self._check(self.http.post("/appliance/audit/verify", json={"export": against}))
            )
        return AuditVerdict.model_validate(self._check(self.http.get("/appliance/audit/verify")))

    def new_conversation(self, user: str | None = None) -> int:
        """The service records the socket's user, whoever `user` says."""
        return Conversation.model_validate(self._check(self.http.post("/appliance/conversations"))).id

    def lookup(self, query: str, collection: str | None = None, limit: int = 20) -> list[dict]:
        params: dict[str, str | int] = {
            "q": query,
            "limit": limit,
            **({"collection": collection} if collection else {}),
        }
        return LookupRows.model_validate(self._check(self.http.get("/appliance/lookup", params=params))).rows

    def ingest(self, paths: list[Path], collection: str, progress: Callable | None = None) -> IngestReport:
        """Each file is read here and uploaded; unreadable ones are reported like an in-process ingest."""
        skipped: list[dict] = []
        files, missing = expand_paths(paths, skipped)
        report = IngestReport(failed=missing, skipped=skipped)
        for i, path in enumerate(files):
            source = str(path.resolve())
            if progress:
                progress(source, i, len(files))
            try:
                data = path.read_bytes()
            except OSError as exc:
                report.failed.append({"source": source, "error": f"{source}: cannot read ({exc.strerror})"})
                continue
            response = self.http.post(
                "/appliance/documents/upload", content=data, params={"name": source, "collection": collection}
            )
            if response.status_code in (413, 422):  # this file refused; the rest go on
                report.failed.append({"source": source, "error": response.json()["error"]["message"]})
                continue
            report.extend(self._check(response))
        if progress:
            progress("", len(files), len(files))
        return report

    def remove_document(self, doc_id: int) -> DocumentRow:
        return Removed.model_validate(self._check(self.http.delete(f"/appliance/documents/{doc_id}"))).removed

    def verify_bundle(self, directory: Path, progress: Callable | None = None) -> BundleCheck:
        return BundleCheck.model_validate(
            self._check(
                self.http.post(
                    "/appliance/bundles/verify",
                    json=BundleRequest(path=str(directory.resolve())).model_dump(),
                )
            )
        )

    def install_bundle(
        self,
        directory: Path,
        allow_downgrade: bool = False,
        progress: Callable | None = None,
        reembed_progress: Callable | None = None,
    ) -> Installed:
        """The service reads the bundle (it needs the path, not the caller's bytes: the signatures are
        checked where the files are)."""
        return Installed.model_validate(
            self._stream(
                "POST",
                "/appliance/bundles/install",
                progress,
                json=BundleRequest(
                    path=str(directory.resolve()), allow_downgrade=allow_downgrade
                ).model_dump(),
            )
        )

    def feedback(self, answer_audit_id: int, kind: str, **fields) -> FeedbackRecorded:
        body = {
            "audit_id": answer_audit_id,
            "kind": kind,
            **{k: v for k, v in fields.items() if v is not None},
        }
        return FeedbackRecorded.model_validate(self._check(self.http.post("/appliance/feedback", json=body)))

    def feedback_items(
        self, pending_only: bool = False, since: str | None = None, limit: int | None = None
    ) -> list[dict]:
        params: dict[str, str | int | bool] = {
            "pending": pending_only,
            **({"since": since} if since else {}),
            **({"limit": limit} if limit else {}),
        }
        return FeedbackItems.model_validate(
            self._check(self.http.get("/appliance/feedback", params=params))
        ).items

    def feedback_export(self, out: Path, since: str | None = None) -> ExportWritten:
        """The service signs; the files are written here, as the caller (a USB stick the service may
        not see), and only then does the service mark the items exported."""
        from appliance.records.feedback import Export

        data = FeedbackExport.model_validate(
            self._check(
                self.http.post("/appliance/feedback/export", json=ExportRequest(since=since).model_dump())
            )
        )
        export = Export(
            data.export_id,
            {k: v.encode() for k, v in data.files.items()},
            data.manifest.encode(),
            data.signature,
            [],
            data.counts,
        )
        export.write(out)
        return ExportWritten.model_validate(
            self._check(
                self.http.post(
                    f"/appliance/feedback/export/{data.export_id}/written",
                    json=WrittenRequest(out=str(out.resolve())).model_dump(),
                )
            )
        )

    def rollback(self) -> tuple[int, int]:
        data = RolledBack.model_validate(self._check(self.http.post("/appliance/bundles/rollback")))
        return data.left, data.to

    def draft(
        self,
        rfp: Path,
        collections: list[str] | None = None,
        max_tokens: int | None = None,
        progress: Callable | None = None,
    ) -> DraftReport:
        params = {
            "name": str(rfp.resolve()),
            **({"collection": collections} if collections else {}),
            **({"max_tokens": max_tokens} if max_tokens else {}),
        }
        return DraftReport.model_validate(
            self._stream("POST", "/appliance/draft", progress, content=rfp.read_bytes(), params=params)
        )

    def search(self, query: str, k: int | None = None, collection: str | None = None) -> list[Source]:
        params: dict[str, str | int] = {
            "q": query,
            **({"k": k} if k else {}),
            **({"collection": collection} if collection else {}),
        }
        return SearchResults.model_validate(
            self._check(self.http.get("/appliance/search", params=params))
        ).results

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
    ) -> AnswerReport:
        body = {
            "messages": [{"role": "user", "content": question}],
            "stream": True,
            "rag": use_rag,
            **({"collection": collection} if collection else {}),
            **({"conversation": conversation} if conversation is not None else {}),
            **({"max_tokens": max_tokens} if max_tokens else {}),
            **({"temperature": temperature} if temperature is not None else {}),
        }
        pieces, final = [], None
        with self._open("POST", "/v1/chat/completions", json=body) as r:
            for event in _sse(r):
                delta = event["choices"][0]["delta"].get("content")
                if delta:
                    pieces.append(delta)
                    if on_text:
                        on_text(delta)
                if "usage" in event:
                    final = event
        if final is None:
            raise ServiceError("the service closed the answer early", "try again; see the service's log")
        return AnswerReport.from_completion(final, "".join(pieces).strip(), question)
