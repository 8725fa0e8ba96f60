"""Many operators at once, on the random-weight Llama-3.2-1B-shaped Q4_K_M model of bench/decode.py:

- 1, 2, 4 and 8 concurrent streamed chat clients with retrieval through `appliance serve` (engine:
  llama-server with `--slots` 4): aggregate decode tokens/s, p50/p95 time to first token, p95 total
  latency, each against one client alone;
- the same client code against bare `llama-server --parallel 4` on the same GGUF, sent the exact token
  ids the service sends for the same questions (built by the appliance's own prepare_ask), so the
  service's own cost shows as a ratio; and bare again with the clients starting 100 ms apart (the
  service's requests reach its engine one after another, each prepared first);
- decode alone: 1 and 4 clients asking without retrieval (a prompt of a few dozen tokens) for
  DECODE_TOKENS each, so the ratio is what decoding four answers in one batch gives on this machine
  rather than when each client's 700-token prompt happened to be read between the others' steps;
- searches (p95) sent every 50 ms while 4 answers stream, against searches on an idle service;
- the service's and its engine's resident memory against model file + KV cache of all slots + 400 MB.
Every client asks for the same number of tokens (a random-weight model over 128k tokens almost never
ends early); tokens are counted from the final chunk's usage (the service) or tokens_predicted (bare),
since many of a random model's tokens decode to no text. Run: python -m bench.concurrency
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import children, pct, row, rss_mb
from bench.decode import QUESTION, bench_home, model_path

SLOTS = 4
TOKENS = 48
DECODE_TOKENS = 128
CLIENTS = (1, 2, 4, 8)


def _client(sock: Path) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://x", timeout=900)


def _stream(sock: Path, path: str, body: dict, final) -> dict:
    """One streamed request: `final(event)` gives (tokens, decode seconds) from the last data event
    (server-side counts: many of a random model's tokens decode to no text, so the client cannot see
    them); the first token came `decode seconds` before the end."""
    start = time.perf_counter()
    last = None
    with _client(sock) as http, http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                last = event
    end = time.perf_counter()
    tokens, decode_s = final(last)
    return {
        "ttft": end - decode_s - start,
        "total": end - start,
        "tokens": tokens,
        "start": start,
        "end": end,
    }


def _round(sock: Path, n: int, path: str, body, final, stagger: float = 0.0) -> dict:
    """n clients at once; `stagger`: client i starts i * stagger seconds after the first."""

    def one(i: int) -> dict:
        time.sleep(i * stagger)
        return _stream(sock, path, body(i), final)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        runs = list(pool.map(one, range(n)))
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    decode = max(max(r["end"] for r in runs) - min(r["start"] + r["ttft"] for r in runs), 1e-9)
    return {
        "agg": sum(r["tokens"] for r in runs) / decode,
        "ttft": [r["ttft"] for r in runs],
        "total": [r["total"] for r in runs],
        "wall": wall,
        "first_before_any_end": max(r["start"] + r["ttft"] for r in runs) < min(r["end"] for r in runs),
    }


def _wait(sock: Path, proc: subprocess.Popen, path: str) -> None:
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"exited {proc.returncode}: {proc.stderr.read()[-2000:] if proc.stderr else ''}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError("did not start")
        try:
            if sock.exists() and _client(sock).get(path).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


def _ask(i: int, rag: bool = True) -> dict:
    """Client i's streamed question to the service (with retrieval: TOKENS; without: DECODE_TOKENS)."""
    return {
        "messages": [{"role": "user", "content": f"{QUESTION} (operator {i})"}],
        "stream": True,
        "temperature": 0.0,
        "rag": rag,
        "max_tokens": TOKENS if rag else DECODE_TOKENS,
    }


def through_service(home: Path, threads: int, clients: tuple[int, ...]) -> tuple[dict, dict]:
    """(results by client count, search, decode-alone and memory figures)."""
    sock = home.parent / "api.sock"
    env = dict(
        os.environ,
        APPLIANCE_HOME=str(home),
        APPLIANCE_THREADS=str(threads),
        APPLIANCE_ENGINE="server",
        APPLIANCE_SLOTS=str(SLOTS),
        APPLIANCE_N_CTX="2048",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "serve", "--socket", str(sock)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait(sock, proc, "/v1/models")

        def content(event: dict) -> tuple[int, float]:
            timing = event["appliance"]["timing"]
            n = event["usage"]["completion_tokens"]
            return n, (n - 1) / timing["tokens_per_s"] if timing["tokens_per_s"] else 0.0

        results = {n: _round(sock, n, "/v1/chat/completions", _ask, content) for n in clients}
        alone = {
            n: _round(sock, n, "/v1/chat/completions", lambda i: _ask(i, rag=False), content)
            for n in (1, SLOTS)
        }
        with _client(sock) as http:
            idle = [
                _timed(http.get, "/appliance/search", params={"q": "cloud architect code"}) for _ in range(20)
            ]
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                busy_run = pool.submit(_round, sock, 4, "/v1/chat/completions", _ask, content)
                busy = []
                while not busy_run.done():
                    busy.append(_timed(http.get, "/appliance/search", params={"q": "cloud architect code"}))
                    time.sleep(0.05)
        engine_pid = children(proc.pid, b"llama-server")[0]
        memory = {"service": rss_mb(proc.pid), "engine": rss_mb(engine_pid)}
        return results, {"idle": idle, "busy": busy, "memory": memory, "alone": alone}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs).raise_for_status()
    return (time.perf_counter() - start) * 1000


def trained_context(gguf_path: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    return int(reader.fields[f"{arch}.context_length"].parts[-1][0])


def service_prompts(home: Path, template: Path, n: int, rag: bool = True) -> list[list[int]]:
    """The token ids the service sends its engine for each client's question (with retrieval or not), with
    the context its slots have (2048, or the model's own when that is less, as the engine caps it)."""
    from appliance.app import Appliance
    from appliance.config import load_settings
    from appliance.engine.llama import LlamaEngine

    with Appliance(load_settings(home=home, n_ctx=2048)) as app:
        n_ctx = min(2048, trained_context(app.installed.model_path))
        tok = LlamaEngine(app.installed.model_path, template.read_text(), n_ctx=n_ctx, vocab_only=True)
        prompts = [
            tok.encode_prompt(
                app.prepare_ask(
                    f"{QUESTION} (operator {i})",
                    use_rag=rag,
                    max_tokens=TOKENS if rag else DECODE_TOKENS,
                    tokenizer=tok,
                ).prep.messages
            )
            for i in range(n)
        ]
        tok.close()
    return prompts


def bare_server(
    gguf: Path,
    prompts: list[list[int]],
    threads: int,
    tmp: Path,
    clients: tuple[int, ...],
    stagger: float = 0.0,
    tokens: int = TOKENS,
) -> dict:
    """The same clients against llama-server itself, sent the service's own prompt tokens; `stagger`:
    seconds between the clients' starts (operators do not press enter in the same millisecond)."""
    from appliance.engine.server import find_binary

    sock = tmp / f"bare-{stagger}-{tokens}" / "engine.sock"
    sock.parent.mkdir(mode=0o700)
    cmd = [
        str(find_binary()),
        "-m",
        str(gguf),
        "--host",
        str(sock),
        "-np",
        str(SLOTS),
        "-c",
        str(2048 * SLOTS),
        "-t",
        str(threads),
        "--no-webui",
        "--no-slots",
        "-lm",
        "none",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(sock, proc, "/health")

        def body(i: int) -> dict:
            return {
                "prompt": prompts[i],
                "n_predict": tokens,
                "temperature": 0.0,
                "stream": True,
                "cache_prompt": True,
                "top_p": 0.95,
                "top_k": 40,
                "min_p": 0.05,
                "repeat_penalty": 1.1,
            }

        def final(event: dict) -> tuple[int, float]:
            t = event["timings"]
            return t["predicted_n"], t["predicted_ms"] / 1000 * (t["predicted_n"] - 1) / max(
                t["predicted_n"], 1
            )

        return {n: _round(sock, n, "/completion", body, final, stagger) for n in clients}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def run(gguf: Path | None = None, clients: tuple[int, ...] = CLIENTS) -> list[str]:
    """`gguf`: another model (the tests use the tiny generation's); `clients`: the rows."""
    threads = os.cpu_count() or 1
    gguf = gguf or model_path()
    template = Path(__file__).resolve().parent.parent / "builder" / "templates" / "chat_template.jinja"
    with tempfile.TemporaryDirectory() as tmp:
        home = bench_home(Path(tmp), gguf)
        service, extra = through_service(home, threads, clients)
        prompts = service_prompts(home, template, max(clients))
        bare = bare_server(gguf, prompts, threads, Path(tmp), clients)
        apart = bare_server(gguf, prompts, threads, Path(tmp), clients, stagger=0.1)
        short = service_prompts(home, template, SLOTS, rag=False)
        bare_alone = bare_server(gguf, short, threads, Path(tmp), (1, SLOTS), tokens=DECODE_TOKENS)
    one = service[1]["agg"]
    lines = [
        row(
            "clients",
            "aggregate decode tok/s",
            "vs one client",
            "vs bare llama-server",
            "TTFT p50 / p95 s",
            "total p95 s",
            "every first token before any answer ended",
        ),
        row(*["---"] * 7),
    ]
    for n in clients:
        s, b = service[n], bare[n]
        lines.append(
            row(
                n,
                f"{s['agg']:.1f}",
                f"{s['agg'] / one:.2f}x",
                f"{s['agg'] / b['agg']:.2f}x",
                f"{statistics.median(s['ttft']):.2f} / {pct(s['ttft'], 95):.2f}",
                f"{pct(s['total'], 95):.2f}",
                "yes" if s["first_before_any_end"] else "no",
            )
        )
    lines.append("")
    lines.append(f"prompts: {min(map(len, prompts))}-{max(map(len, prompts))} tokens")
    lines.append(
        f"bare llama-server --parallel {SLOTS}: "
        + ", ".join(f"{n} clients {bare[n]['agg']:.1f} tok/s" for n in clients)
    )
    lines.append(
        "bare llama-server, clients 100 ms apart: "
        + ", ".join(f"{n} clients {apart[n]['agg']:.1f} tok/s" for n in clients)
    )
    alone = extra["alone"]
    lines.append(
        f"decode alone ({min(map(len, short))}-{max(map(len, short))}-token prompts, {DECODE_TOKENS} tokens each): "
        f"1 client {alone[1]['agg']:.1f} tok/s, {SLOTS} clients {alone[SLOTS]['agg']:.1f} tok/s = "
        f"{alone[SLOTS]['agg'] / alone[1]['agg']:.2f}x one client; bare llama-server "
        f"{bare_alone[1]['agg']:.1f} and {bare_alone[SLOTS]['agg']:.1f} tok/s "
        f"(service {alone[SLOTS]['agg'] / bare_alone[SLOTS]['agg']:.2f}x bare at {SLOTS})"
    )
    lines.append(
        f"search while 4 answers stream: p95 {pct(extra['busy'], 95):.1f} ms ({len(extra['busy'])} searches); "
        f"idle p95 {pct(extra['idle'], 95):.1f} ms"
    )
    size = gguf.stat().st_size / 2**20
    kv = 2 * 16 * 8 * 64 * 2 * 2048 * SLOTS / 2**20  # layers x kv heads x head dim x f16, K and V, per token
    m = extra["memory"]
    lines.append(
        f"resident: service {m['service']:.0f} MB + engine {m['engine']:.0f} MB = "
        f"{m['service'] + m['engine']:.0f} MB; budget model {size:.0f} + KV {kv:.0f} + 400 = "
        f"{size + kv + 400:.0f} MB"
    )
    return lines


if __name__ == "__main__":
    print("\n".join(run()))
