"""llama.cpp's own server as the service's engine: one model in memory, N slots decoded together.

On a CPU decode is memory-bandwidth bound: reading the weights once per step for four sequences costs
little more than for one, which llama.cpp's server does with continuous batching (`--parallel N`, a
KV cache and a prompt cache per slot). `EngineServer` runs `llama-server` (built from the same pinned
llama.cpp as the runtime wheel, see the Makefile) as a child on a Unix socket in a directory only the
service's user can enter, and supervises it:

- A request holds a `Lease` while it generates: the model it was prepared for, its tokenizer (the
  same GGUF's vocabulary, loaded without weights) and the stream. The appliance keeps what is its own:
  the prompt is rendered with the signed generation's template and sent as token ids, so the GGUF's
  template and special-token parsing are never used.
- When the installed generation changes (a bundle install, a rollback, the USB import), the next lease
  drains the others: new ones wait, running ones finish on the old model, then the server restarts on
  the new one. Each answer names the model that produced it.
- A server that died (kill -9, out of memory) is noticed: its streams fail with `EngineDown` (503), and
  the next lease starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path

from appliance.bundles.manifest import context_tokens
from appliance.errors import ApplianceError, ConfigError, ExitCode, ModelError
from appliance.protocols import Sampling

log = logging.getLogger("appliance.engine")
START_TIMEOUT_S = 180.0
BINARY = "llama-server"


class EngineBusy(ApplianceError):
    """Every slot is taken and the queue behind them is full: 503 with Retry-After."""

    exit_code = ExitCode.ENGINE


class EngineDown(ApplianceError):
    """The engine server stopped under a request (it is restarted for the next one): 503."""

    exit_code = ExitCode.ENGINE


def find_binary(configured: str | None = None) -> Path | None:
    """`llama-server`: the configured path, else beside this Python (the Makefile puts it in the venv),
    else on PATH; None when there is none (the service then generates in its own process)."""
    if configured:
        path = Path(configured)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ConfigError(
                f"engine binary {path} is not an executable file",
                "build it with `make deps`, or unset APPLIANCE_ENGINE_BINARY",
            )
        return path
    beside = Path(sys.executable).parent / BINARY
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(BINARY)
    return Path(found) if found else None


@dataclass
class Lease:
    """What one request generates with (see the module's docstring)."""

    server: EngineServer
    tokenizer: object  # an appliance.engine.llama.LlamaEngine loaded with the vocabulary only
    model_info: dict

    async def stream(self, tokens: list[int], max_tokens: int, sampling: Sampling) -> AsyncIterator[str]:
        async for piece in self.server.stream(tokens, max_tokens, sampling):
            yield piece

    def generator(self, aside: Callable[[], ContextManager] | None = None) -> SyncGenerator:
        """A blocking generator (appliance.protocols.Generator) on this lease, for work that runs on a
        thread (the draft); `aside()`: entered while the engine decodes (the worker's turn given up)."""
        return SyncGenerator(self, aside)


class SyncGenerator:
    """rag.answer's generator over the engine server, for a thread: tokenizes here, decodes there."""

    def __init__(self, lease: Lease, aside: Callable[[], ContextManager] | None = None):
        self.lease = lease
        self.aside = aside or contextlib.nullcontext
        self.n_ctx = lease.tokenizer.n_ctx
        self.name = lease.model_info.get("name")
        self.prompt_tokens = 0

    def count_tokens(self, text: str) -> int:
        return self.lease.tokenizer.count_tokens(text)

    def stream(self, messages: list[dict], max_tokens: int, sampling: Sampling):
        import httpx
        from httpx_sse import EventSource

        tokens = self.lease.tokenizer.prompt_for(messages, max_tokens, sampling)
        self.prompt_tokens = len(tokens)
        body = _completion(tokens, max_tokens, sampling)
        try:
            with (
                self.aside(),
                httpx.Client(
                    transport=httpx.HTTPTransport(uds=str(self.lease.server.socket)),
                    base_url="http://engine",
                    timeout=httpx.Timeout(None, connect=10),
                ) as http,
                http.stream("POST", "/completion", json=body) as response,
            ):
                if response.status_code != 200:
                    raise ModelError(
                        f"the engine refused the prompt ({response.status_code})",
                        "shorten the requirement or lower max tokens",
                    )
                for sse in EventSource(response).iter_sse():
                    event = json.loads(sse.data)
                    yield event.get("content", "")
                    if event.get("stop"):
                        return
        except httpx.TransportError as exc:
            raise EngineDown(
                f"the engine server stopped during the draft ({type(exc).__name__})",
                "draft again in a moment",
            ) from exc


def _completion(tokens: list[int], max_tokens: int, sampling: Sampling) -> dict:
    """A /completion request with the sampling LlamaEngine.stream uses in process."""
    return {
        "prompt": tokens,
        "n_predict": max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "min_p": sampling.min_p,
        "repeat_penalty": sampling.repeat_penalty,
        "logit_bias": [list(b) for b in sampling.logit_bias],
        "stop": list(sampling.stop),
        "stream": True,
        "cache_prompt": True,
        **({} if sampling.seed is None else {"seed": sampling.seed}),
    }


PIDFILE = "engine.pid"


def _die_with_parent():
    """For Popen's preexec_fn: the child is killed when the service dies, kill -9 included
    (PR_SET_PDEATHSIG); libc is looked up here, before the fork."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def arm() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return arm


class EngineServer:
    def __init__(
        self,
        binary: Path,
        run_dir: Path,
        *,
        slots: int,
        n_ctx: int,
        threads: int = 0,
        mmap: bool = False,
        queue: int = 4,
    ):
        """`queue`: requests that may wait for a slot; past slots + queue, a lease is refused (EngineBusy)."""
        self.binary, self.run_dir = binary, run_dir
        self.slots, self.n_ctx, self.threads, self.mmap, self.queue = slots, n_ctx, threads, mmap, queue
        self.socket = run_dir / "engine.sock"
        self.proc: subprocess.Popen | None = None
        self.generation: int | None = None
        self.context: int | None = None  # each slot's context once started, as the server reports it
        self.tokenizer = None
        self.model_info: dict = {}
        self.active = 0
        self.starts = 0
        self._changing = False
        self._cond: asyncio.Condition | None = None
        self._client = None

    @staticmethod
    def clean_stale(run_root: Path) -> list[str]:
        """Remove what a killed service left under `run_root` (its `engine-<pid>` directories, and the
        engine server still running from one, if kill -9 reached the service before the engine could
        follow); what was done, for the log."""
        done = []
        for directory in sorted(run_root.glob("engine-*")):
            owner = directory.name.removeprefix("engine-")
            if not owner.isdigit() or Path(f"/proc/{owner}").exists():
                continue  # a service that still runs
            try:
                engine = int((directory / PIDFILE).read_text().strip())
                if b"llama-server" in Path(f"/proc/{engine}/cmdline").read_bytes():
                    os.kill(engine, signal.SIGKILL)
                    done.append(f"stopped the engine server ({engine}) of a service that is gone")
            except (OSError, ValueError):
                pass
            shutil.rmtree(directory, ignore_errors=True)
            done.append(f"removed {directory}")
        return done

    # -- the process -------------------------------------------------------------------------------
    def start(self, installed, template_text: str, model_info: dict) -> None:
        """(Re)start on `installed`; returns once the server answers /health."""
        import httpx

        from appliance.engine.llama import LlamaEngine

        self.stop()
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.run_dir.chmod(0o700)  # the socket's directory: the service's user only
        self.socket.unlink(missing_ok=True)
        n_ctx = context_tokens(self.n_ctx, installed.manifest.model)
        cmd = [
            str(self.binary),
            "-m",
            str(installed.model_path),
            "--host",
            str(self.socket),
            "-np",
            str(self.slots),
            "-c",
            str(n_ctx * self.slots),
            "-t",
            str(self.threads or os.cpu_count() or 1),
            "--no-webui",
            "--no-slots",
            "-lm",
            "mmap" if self.mmap else "none",
            # no host-RAM prompt cache beside the slots' own (llama-server's default lets it grow to
            # 8 GB); each slot still keeps its last prompt, which is what a follow-up reuses
            "-cram",
            "0",
        ]
        logfile = open(self.run_dir / "engine.log", "ab")
        start = time.perf_counter()
        self.starts += 1
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            cwd=self.run_dir,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        logfile.close()
        (self.run_dir / PIDFILE).write_text(f"{self.proc.pid}\n")
        deadline = time.monotonic() + START_TIMEOUT_S
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://engine", timeout=5
        ) as http:
            while True:
                if self.proc.poll() is not None:
                    raise ModelError(
                        f"the engine server exited ({self.proc.returncode}) while loading "
                        f"{installed.model_path.name}: {self.log_tail()}",
                        f"see {self.run_dir / 'engine.log'}",
                    )
                if time.monotonic() > deadline:
                    self.stop()
                    raise ModelError(
                        f"the engine server did not answer within {START_TIMEOUT_S:.0f} s",
                        f"see {self.run_dir / 'engine.log'}",
                    )
                try:
                    if self.socket.exists() and http.get("/health").status_code == 200:
                        # what each slot really holds: the server caps it at the model's training context
                        served = http.get("/props").json().get("default_generation_settings", {}).get("n_ctx")
                        n_ctx = min(n_ctx, int(served or n_ctx))
                        break
                except (httpx.TransportError, ValueError):
                    pass
                time.sleep(0.05)
        self.tokenizer = LlamaEngine(
            installed.model_path, template_text, n_ctx=n_ctx, name=model_info["name"], vocab_only=True
        )
        self.context = n_ctx
        self.generation, self.model_info = installed.number, dict(model_info)
        log.info(
            "engine: %s on %d slots of %d tokens (%.1f s)",
            installed.model_path.name,
            self.slots,
            n_ctx,
            time.perf_counter() - start,
        )

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(
                (self.run_dir / "engine.log").read_text(errors="replace").strip().splitlines()[-lines:]
            )
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def state(self) -> dict:
        """For `appliance status`: the slots, how many requests hold the engine now (answers being
        written, drafts), the generation it serves and how often it was (re)started."""
        return {
            "slots": self.slots,
            "busy": self.active,
            "running": self.alive(),
            "generation": self.generation,
            "starts": self.starts,
        }

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.tokenizer is not None:
            self.tokenizer.close()
            self.tokenizer = None
        self.generation = None

    # -- leases --------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lease(self, app, worker) -> AsyncIterator[Lease]:
        """Hold the engine for one request (module docstring: drains and restarts happen here); `worker`:
        the service's worker, where the Appliance is read."""
        if self._cond is None:
            self._cond = asyncio.Condition()
        if self.active >= self.slots + self.queue:
            raise EngineBusy(
                f"the engine is busy: {self.active} answers are being written or waiting for its "
                f"{self.slots} slots",
                "retry in a moment",
            )
        async with self._cond:
            while True:
                await self._cond.wait_for(lambda: not self._changing)
                installed = await worker.submit(lambda: _current(app))
                if self.alive() and self.generation == installed.number:
                    break
                self._changing = True  # no new leases; running ones finish on the model they have
                await self._cond.wait_for(lambda: self.active == 0)
                try:
                    info = {
                        "name": installed.manifest.model.name,
                        "quant": installed.manifest.model.quant,
                        "sha256": installed.manifest.files[installed.manifest.model.file].sha256,
                        "generation": installed.number,
                    }
                    template = (installed.path / installed.manifest.chat_template).read_text()
                    if self.starts:
                        log.warning(
                            "engine: restarting on generation %s (was %s, %s)",
                            installed.number,
                            self.generation,
                            "running" if self.alive() else "stopped",
                        )
                    await asyncio.to_thread(self.start, installed, template, info)
                finally:
                    self._changing = False
                    self._cond.notify_all()
            self.active += 1
            held = Lease(self, self.tokenizer, dict(self.model_info))
        try:
            yield held
        finally:
            async with self._cond:
                self.active -= 1
                self._cond.notify_all()

    async def stream(self, tokens: list[int], max_tokens: int, sampling: Sampling) -> AsyncIterator[str]:
        """Text pieces as the server decodes them; EngineDown when it goes away mid-answer."""
        import httpx
        from httpx_sse import EventSource

        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(self.socket)),
                base_url="http://engine",
                timeout=httpx.Timeout(None, connect=10),
            )
        body = _completion(tokens, max_tokens, sampling)
        try:
            async with self._client.stream("POST", "/completion", json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")[:300]
                    raise ModelError(
                        f"the engine refused the prompt ({response.status_code}: {text})",
                        "shorten the question or lower max tokens",
                    )
                async for sse in EventSource(response).aiter_sse():
                    event = json.loads(sse.data)
                    if event.get("stop"):
                        if event.get("content"):
                            yield event["content"]
                        return
                    yield event.get("content", "")  # one event a token ("" while a character is incomplete)
        except httpx.TransportError as exc:
            raise EngineDown(
                f"the engine server stopped during the answer ({type(exc).__name__}); it is being restarted",
                "ask again in a moment",
            ) from exc

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        await asyncio.to_thread(self.stop)


def _current(app):
    """The generation that should be serving now (another process may have switched `current`)."""
    app.follow_current()
    return app.installed
