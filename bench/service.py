"""The service, each figure against a baseline measured in the same run, on the random-weight
Llama-3.2-1B-shaped Q4_K_M model of bench/decode.py:

- decode tokens/s through the HTTP API (a streamed chat completion over the Unix socket, timed by the
  client from sending the request to [DONE], less what the server reports spending before the model:
  retrieval, reading the sources' sentences, time to first token) against bare llama-cpp-python on
  the same GGUF; and the service's own CPU per token while it streams, against its engine's;
- time to first token of a follow-up question in a conversation with llama.cpp's prefix cache, against
  the same follow-up after the cache was cleared, without and with retrieval (with retrieval, the first
  turn is sent back with its sources, rag.TurnMemory, so the new sources and question are all that is new);
- the service's resident memory with its engine server's against model file + the KV cache of
  every slot + 400 MB.
Run: python -m bench.service
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import children, cpu_s, row, rss_mb
from bench.decode import N_TOKENS, QUESTION, bare, bench_home, interleaved, model_path

FOLLOW_UP = "Which of those roles needs a security clearance?"


def through_api(home: Path, threads: int) -> dict:
    sock = home.parent / "api.sock"
    env = dict(
        os.environ, APPLIANCE_HOME=str(home), APPLIANCE_THREADS=str(threads), APPLIANCE_TEMPERATURE="0"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "serve", "--socket", str(sock)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read())
            time.sleep(0.1)
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://appliance", timeout=600
        ) as http:

            def streamed(max_tokens: int) -> dict:
                """Client-side: from sending the request to [DONE], less the server's retrieval, reading and
                time to first token (a random-weight model streams many tokens that decode to no text, so
                counting content chunks would undercount)."""
                final = None
                body = {
                    "messages": [{"role": "user", "content": QUESTION}],
                    "max_tokens": max_tokens,
                    "stream": True,
                    "temperature": 0,
                }
                start = time.perf_counter()
                with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
                    for line in r.iter_lines():
                        if line.startswith('data: {"error"'):
                            raise RuntimeError(line)
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            final = chunk if "usage" in chunk else final
                end = time.perf_counter()
                timing = final["appliance"]["timing"]
                decode_s = (
                    end - start - (timing["retrieval_ms"] + timing["reading_ms"] + timing["ttft_ms"]) / 1000
                )
                tokens = final["usage"]["completion_tokens"]
                return {
                    "tokens": tokens,
                    "tokens_per_s": (tokens - 1) / decode_s,
                    "prompt_tokens": final["usage"]["prompt_tokens"],
                    "server_tokens_per_s": timing["tokens_per_s"],
                    "before_model_ms": timing["retrieval_ms"] + timing["reading_ms"],
                }

            streamed(16)  # load and warm
            engines = children(proc.pid, b"llama-server")
            before = cpu_s(proc.pid), sum(map(cpu_s, engines))
            runs = [streamed(N_TOKENS) for _ in range(3)]
            service_s, engine_s = cpu_s(proc.pid) - before[0], sum(map(cpu_s, engines)) - before[1]
            best = max(runs, key=lambda r: r["tokens_per_s"])
            best["rss_mb"] = rss_mb(proc.pid) + sum(map(rss_mb, children(proc.pid)))
            # where the CPU of an answer goes: the service's own work (retrieval, reading, proxying each
            # token, the audit row) against its engine's decoding (none when it generates in process)
            best["service_cpu_ms"] = service_s * 1000 / len(runs)
            best["engine_cpu_ms"] = engine_s * 1000 / len(runs)
            return best
    finally:
        proc.terminate()
        proc.wait(timeout=60)


CANNED = (
    "The staffing plan needs a Cloud Architect (15-1241.00), two Software Developers (15-1252.00) and a "
    "Database Administrator (15-1242.00) [1][2]."
)


def follow_up_ttft(home: Path, threads: int, use_rag: bool) -> tuple[float, float]:
    """(ms with the prefix cache, ms with the cache cleared), best of three each.

    A random-weight model's answer is tokens that decode to no text, which no real conversation sends
    back; so the first answer is replaced by a plausible one (in the stored conversation and in the
    service's memory of the turn), and the KV cache is left as a real model would leave it: holding the
    first exchange as the model saw it, answer included."""
    from appliance.app import Appliance
    from appliance.config import load_settings
    from appliance.engine.prompt import build_messages
    from appliance.retrieval.rag import GREEDY

    with Appliance(load_settings(home=home, threads=threads, max_tokens=N_TOKENS, temperature=0.0)) as app:
        app.ask(QUESTION, use_rag=use_rag, max_tokens=4)  # load and warm
        cached, cleared = [], []
        for _ in range(3):
            for clear, out in ((False, cached), (True, cleared)):
                conversation = app.store.new_conversation("bench")
                first = app.answer(QUESTION, use_rag=use_rag, conversation=conversation, max_tokens=8)
                app.store.conn.execute(
                    "UPDATE messages SET content = ? WHERE conversation_id = ? AND role = 'assistant'",
                    (CANNED, conversation),
                )
                first.raw = CANNED
                app.turns.remember(QUESTION, first)
                seen = [
                    build_messages("", [], use_rag)[0],
                    {"role": "user", "content": first.prompt},
                    {"role": "assistant", "content": CANNED},
                ]
                list(app.engine.stream(seen, max_tokens=1, sampling=GREEDY))
                if clear:
                    app.engine.llm.reset()  # llama.cpp starts from an empty KV cache
                out.append(app.ask(FOLLOW_UP, use_rag=use_rag, conversation=conversation).timing["ttft_ms"])
        return min(cached), min(cleared)


def kv_cache_mb(n_ctx: int) -> float:
    # Llama-3.2-1B: 16 layers, 8 KV heads of 64, f16 keys and values
    return 2 * 16 * n_ctx * 8 * 64 * 2 / 2**20


def run() -> list[str]:
    from appliance.config import Settings

    n_ctx = Settings.model_fields["n_ctx"].default
    slots = Settings.model_fields["slots"].default  # the engine server's: each slot holds n_ctx of KV cache
    threads = os.cpu_count() or 1
    gguf = model_path()
    with tempfile.TemporaryDirectory() as tmp:
        home = bench_home(Path(tmp), gguf)
        api, base = interleaved(
            lambda: through_api(home, threads),
            lambda context: bare(sys.executable, gguf, threads, context),  # decoding at the same position
            "tokens_per_s",
        )
        plain = follow_up_ttft(home, threads, use_rag=False)
        rag = follow_up_ttft(home, threads, use_rag=True)
    model_mb = gguf.stat().st_size / 2**20
    kv_mb = kv_cache_mb(n_ctx) * slots
    budget = model_mb + kv_mb + 400
    return [
        row("what", "measured", "baseline", "ratio", "goal"),
        row(*["---"] * 5),
        row(
            "decode through the HTTP API (tokens/s)",
            f"{api['tokens_per_s']:.2f}",
            f"{base['tg']:.2f} bare llama-cpp-python",
            f"{api['tokens_per_s'] / base['tg']:.2f}x",
            ">= 0.95x",
        ),
        row(
            "follow-up TTFT, no retrieval (ms)",
            f"{plain[0]:.0f} cached",
            f"{plain[1]:.0f} cache cleared",
            f"{plain[1] / plain[0]:.1f}x",
            ">= 5x",
        ),
        row(
            "follow-up TTFT, with retrieval (ms)",
            f"{rag[0]:.0f} cached",
            f"{rag[1]:.0f} cache cleared",
            f"{rag[1] / rag[0]:.1f}x",
            ">= 5x",
        ),
        row(
            "the service's own CPU per answer (ms)",
            f"{api['service_cpu_ms']:.0f}",
            f"{api['engine_cpu_ms']:.0f} its engine's",
            f"{api['service_cpu_ms'] / max(api['engine_cpu_ms'], 1e-9):.2f}x",
            "",
        ),
        row(
            "service + engine resident memory (MB)",
            f"{api['rss_mb']:.0f}",
            f"{budget:.0f} = model {model_mb:.0f} + KV {kv_mb:.0f} ({slots} slots) + 400",
            f"{api['rss_mb'] / budget:.2f}x",
            "<= 1.00x",
        ),
        f"\n{N_TOKENS} tokens per answer after a {api['prompt_tokens']}-token prompt (the bare baseline decodes "
        f"after a prompt of the same length); {threads} threads; n_ctx {n_ctx}; before the model, "
        f"{api['before_model_ms']:.0f} ms of retrieval and reading per question; the service's CPU per "
        f"answer is that, proxying {N_TOKENS} tokens and the audit row",
    ]


if __name__ == "__main__":
    print("\n".join(run()))
