"""The worker that runs what touches the model, embedder or database, and the helpers that stream its
progress: one task at a time (the turn), with a bounded queue (503 with Retry-After past it). A task
that waits on the engine server (the draft's generation) gives up the turn while it waits, so other
requests run in between."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from appliance.errors import ApplianceError
from appliance.service.errors import ApiError
from appliance.service.limits import (
    MAX_UPLOADS,
    MAX_UPLOADS_PER_PEER,
    MIN_UPLOAD_RATE,
    UPLOAD_IDLE_S,
    UPLOAD_TIMEOUT_S,
)


class Worker:
    """Everything that touches the model, embedder or database runs here, one task at a time, with a
    bounded queue. Threads are many so that a task that stepped `aside` does not hold the others up;
    the turn (a lock) is what keeps the Appliance single-threaded."""

    def __init__(self, queue_size: int, before: Callable[[], None] | None = None):
        # threads for the turn's queue and for the uploads and drafts that stepped aside (UploadSlots)
        self.pool = ThreadPoolExecutor(
            max_workers=queue_size + 2 + MAX_UPLOADS, thread_name_prefix="appliance"
        )
        self.before = before
        self.queue_size = queue_size
        self.pending = 0
        self.lock = threading.Lock()
        self.turn = threading.Lock()
        self._holder = threading.local()

    def full(self) -> bool:
        return self.pending >= self.queue_size + 1  # one running, queue_size waiting

    def busy(self) -> ApiError:
        return ApiError(
            503,
            f"the appliance is busy ({self.pending} requests ahead); retry shortly",
            "server_busy",
            {"Retry-After": "2"},
        )

    def submit(self, fn: Callable, *args):
        with self.lock:
            if self.full():
                raise self.busy()
            self.pending += 1
        future = self.pool.submit(self._run, fn, *args)

        def done(_):
            with self.lock:
                self.pending -= 1

        future.add_done_callback(done)
        return asyncio.wrap_future(future)

    def _run(self, fn: Callable, *args):
        with self.turn:
            self._holder.held = True
            try:
                if self.before:
                    self.before()
                return fn(*args)
            finally:
                self._holder.held = False

    @contextlib.contextmanager
    def aside(self) -> Iterator[None]:
        """Give up the turn while the body waits on something that is not the Appliance's (the engine
        server decoding, a file parsed and embedded); taken back before the task goes on. Meanwhile the
        task does not count against the queue. Outside a task, nothing to give up."""
        if not getattr(self._holder, "held", False):
            yield
            return
        self._holder.held = False
        with self.lock:
            self.pending -= 1
        self.turn.release()
        try:
            yield
        finally:
            with self.lock:
                self.pending += 1
            self.turn.acquire()
            self._holder.held = True


def progress_events(
    worker: Worker, work: Callable[[Callable[..., None]], dict], finished: Callable[[], object] | None = None
) -> StreamingResponse:
    """Run `work(report)` on the worker; each `report(item, done, total)` is an event, then the result
    or the error. The queue is checked before the response starts, so a busy service still says 503.
    `finished()` (a function, or one returning an awaitable) runs on the event loop once the work has
    ended, whatever became of it or of the client (an engine lease, an upload slot let go), or at once
    when the work could not be queued."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def put(event: dict) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    def let_go() -> None:
        if finished is not None and inspect.isawaitable(result := finished()):
            asyncio.ensure_future(result)

    def run():
        try:
            put(
                {
                    "result": work(
                        lambda item, done, total: put({"item": str(item or ""), "done": done, "total": total})
                    )
                }
            )
        except ApplianceError as exc:
            put({"error": {"message": str(exc), "type": type(exc).__name__}})
        except Exception as exc:  # reported, never a stream that just stops
            put({"error": {"message": f"internal error: {exc!r}", "type": type(exc).__name__}})
        finally:
            loop.call_soon_threadsafe(let_go)

    try:
        worker.submit(run)
    except BaseException:
        let_go()
        raise

    async def stream():
        while True:
            event = await events.get()
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            if "result" in event or "error" in event:
                return

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class UploadSlots:
    """Uploads and drafts in hand, from their first byte until their work has ended (each body up to
    max_file_mb in memory, each parse and embedding beside the worker): at most MAX_UPLOADS at once and
    MAX_UPLOADS_PER_PEER by one caller, taken before a byte is read (used on the event loop only)."""

    def __init__(self) -> None:
        self.held: collections.Counter = collections.Counter()

    def take(self, who: str) -> Callable[[], None]:
        """A slot for `who`, or ApiError 503; returns its release (safe to call more than once)."""
        if sum(self.held.values()) >= MAX_UPLOADS or self.held[who] >= MAX_UPLOADS_PER_PEER:
            mine = self.held[who] >= MAX_UPLOADS_PER_PEER
            raise ApiError(
                503,
                f"{'you are' if mine else 'the appliance is'} already sending or processing "
                f"{MAX_UPLOADS_PER_PEER if mine else MAX_UPLOADS} files; send this one when one of "
                "those is done",
                "server_busy",
                {"Retry-After": "5"},
            )
        self.held[who] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.held[who] -= 1
                if not self.held[who]:
                    del self.held[who]

        return release


async def received(request: Request, limit: int) -> tuple[bytes, Callable[[], None]]:
    """An upload's body and its slot's release (UploadSlots), the slot taken before anything is read;
    the caller releases it once the upload's work has ended."""
    from appliance.service.deps import user_of

    release = request.app.state.uploads.take(user_of(request) or "unknown")
    try:
        return await read_body(request, limit), release
    except BaseException:
        release()
        raise


async def read_body(request: Request, limit: int, timeout_s: float = UPLOAD_TIMEOUT_S) -> bytes:
    """An upload's body, once the worker has room for it (503 otherwise, before anything is read); 413
    as soon as it passes `limit` bytes (audited); 408 when it stops for UPLOAD_IDLE_S, averages under
    MIN_UPLOAD_RATE after that, or takes longer than `timeout_s`."""
    from appliance.service.deps import refuse

    worker: Worker = request.app.state.worker
    if worker.full():
        raise worker.busy()
    loop = asyncio.get_running_loop()
    body, start = bytearray(), loop.time()
    parts = request.stream().__aiter__()
    while True:
        try:
            part = await asyncio.wait_for(parts.__anext__(), UPLOAD_IDLE_S)
        except StopAsyncIteration:
            return bytes(body)
        except ClientDisconnect as exc:  # the sender went away: nothing to answer, nothing to log
            raise ApiError(400, "the upload ended before its body did", "client_disconnected") from exc
        except TimeoutError as exc:
            raise ApiError(408, f"the upload sent nothing for {UPLOAD_IDLE_S:.0f} s", "timeout") from exc
        body.extend(part)
        if len(body) > limit:
            body.clear()
            await refuse(
                request,
                413,
                f"the upload is larger than {limit / 1e6:.1f} MB (max_file_mb)",
                "too_large",
                {"name": str(request.query_params.get("name", ""))[:300]},
            )
        elapsed = loop.time() - start
        if elapsed > timeout_s:
            raise ApiError(408, f"the upload did not arrive within {timeout_s:.0f} s", "timeout")
        if elapsed > UPLOAD_IDLE_S and len(body) < MIN_UPLOAD_RATE * elapsed:
            raise ApiError(
                408,
                f"the upload arrives at {len(body) / elapsed:.0f} bytes/s; at least "
                f"{MIN_UPLOAD_RATE} are needed",
                "timeout",
            )
