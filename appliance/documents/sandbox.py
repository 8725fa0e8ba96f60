"""Parsing untrusted files in a child process with memory and time limits.

The document readers cap what they know to cap (appliance.documents.readers), but PDF, DOCX, XLSX and CSV
parsers are large and a crafted file can still find a runaway in one of them. So the service never
parses those in its own process: a `Sandbox` keeps one child (`python -m appliance.documents.sandbox`) with an
address-space limit (RLIMIT_AS), no core files and a small file-descriptor budget, and gives each file
a wall-clock limit. A file that exhausts either is reported as that file's error, the child is
replaced, and the batch goes on; the service's memory is never at stake. Plain text is decoded in
the caller: its size is already bounded by `max_file_mb`.

Frames on the pipes: 8-byte big-endian length, then that many bytes (a JSON header, then the data).
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from appliance.documents.readers import MAX_PAGES, TEXT_SUFFIXES, Document, Table, parse_document
from appliance.errors import IngestError

DEFAULT_MEMORY_MB = 1536
DEFAULT_TIMEOUT_S = 120.0
MAX_REPLY = 320 << 20  # what the child answers: MAX_TEXT_CHARS of text (4 bytes each at worst) and its table


def _frame(payload: bytes) -> bytes:
    return struct.pack(">Q", len(payload)) + payload


def _read_exact(fh, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise EOFError
    return data


class Sandbox:
    """One child process that parses files; use as a context manager."""

    def __init__(self, memory_mb: int = DEFAULT_MEMORY_MB, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.memory_mb = memory_mb
        self.timeout_s = timeout_s
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()  # one file at a time on the pipes (an ingest parses beside a draft)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe:
                    pipe.close()

    def _child(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "appliance.documents.sandbox", str(self.memory_mb)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                close_fds=True,
                cwd="/",
                env={k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "LANG", "LC_ALL")},
            )
        return self._proc

    def parse(self, path: Path, data: bytes) -> Document:
        """The document in `data` (named `path`), or IngestError for this file alone."""
        if path.suffix.lower() in TEXT_SUFFIXES:
            return parse_document(path, data)
        with self._lock:
            return self._parse(path, data)

    def _parse(self, path: Path, data: bytes) -> Document:
        proc = self._child()
        header = json.dumps({"name": str(path)}).encode()
        try:
            proc.stdin.write(_frame(header) + _frame(data))
            proc.stdin.flush()
            reply = self._reply(proc, path)
        except (BrokenPipeError, EOFError, OSError):
            reply = None
        if reply is None:  # killed: over its memory, its time, or crashed
            code = proc.poll()
            self.close()
            if code is None:
                raise IngestError(
                    f"{path}: parsing took longer than {self.timeout_s:.0f} s; stopped",
                    "the file may be crafted to stall parsers; re-save it, or split it",
                )
            raise IngestError(
                f"{path}: the parser ran out of its {self.memory_mb} MB or crashed (exit {code})",
                "the file may be crafted to exhaust memory; re-save it from its application",
            )
        if "error" in reply:
            raise IngestError(reply["error"], reply.get("fix"))
        doc = reply["document"]
        table = Table(doc["table"]["columns"], doc["table"]["rows"]) if doc["table"] else None
        return Document(
            path=path,
            kind=doc["kind"],
            title=doc["title"],
            text=doc["text"],
            table=table,
            pages=checked_pages(doc, path),
        )

    def _reply(self, proc: subprocess.Popen, path: Path) -> dict | None:
        deadline = time.monotonic() + self.timeout_s
        fd = proc.stdout.fileno()
        chunks: list[bytes] = []
        want, got, size = 8, 0, None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise IngestError(
                    f"{path}: parsing took longer than {self.timeout_s:.0f} s; stopped",
                    "the file may be crafted to stall parsers; re-save it, or split it",
                )
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            part = os.read(fd, min(want - got, 1 << 20))
            if not part:
                proc.wait()
                return None
            chunks.append(part)
            got += len(part)
            if got < want:
                continue
            if size is None:
                size = struct.unpack(">Q", b"".join(chunks))[0]
                if size > MAX_REPLY:
                    self.close()
                    raise IngestError(
                        f"{path}: the parsed document is {size >> 20} MB (at most {MAX_REPLY >> 20} MB)",
                        "split the file",
                    )
                chunks, want, got = [], size, 0
                if size == 0:
                    return None
                continue
            return json.loads(b"".join(chunks))


def checked_pages(doc: dict, path: Path) -> list[int]:
    """The page offsets the child answered, checked as the parent relies on them: whole numbers
    (not booleans), non-decreasing, the first 0, none past the text; one page or none is no pages."""
    pages, text = doc.get("pages") or [], doc.get("text")
    if not (
        isinstance(text, str)
        and isinstance(pages, list)
        and len(pages) <= MAX_PAGES
        and all(type(p) is int for p in pages)
        and pages == sorted(pages)
        and (not pages or (pages[0] == 0 and pages[-1] <= len(text)))
    ):
        raise IngestError(f"{path}: the parser answered malformed page offsets", "report this file")
    return pages if len(pages) > 1 else []


def _limit(memory_mb: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def _serve(memory_mb: int) -> None:
    """The child: parse each framed file and answer with its document or its error."""
    _limit(memory_mb)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            header = json.loads(_read_exact(stdin, struct.unpack(">Q", _read_exact(stdin, 8))[0]))
            data = _read_exact(stdin, struct.unpack(">Q", _read_exact(stdin, 8))[0])
        except EOFError:
            return
        path = Path(header["name"])
        try:
            doc = parse_document(path, data)
            reply = {
                "document": {
                    "kind": doc.kind,
                    "title": doc.title,
                    "text": doc.text,
                    "table": {"columns": doc.table.columns, "rows": doc.table.rows} if doc.table else None,
                    "pages": doc.pages,
                }
            }
        except IngestError as exc:
            reply = {"error": exc.message, "fix": exc.fix}
        except MemoryError:
            reply = {
                "error": f"{path}: parsing needs more than {memory_mb} MB",
                "fix": "the file may be crafted to exhaust memory; re-save it from its application",
            }
        except RecursionError:
            reply = {"error": f"{path}: nested too deeply to parse", "fix": "re-save it from its application"}
        except Exception as exc:  # a parser's own bug on a malformed file: this file's error, not the batch's
            reply = {
                "error": f"{path}: unreadable ({type(exc).__name__}: {exc})",
                "fix": "re-save it from the application that made it",
            }
        del data
        stdout.write(_frame(json.dumps(reply, ensure_ascii=False).encode()))
        stdout.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
