"""Embedding throughput: the appliance's ONNX int8 embedder against sentence-transformers (PyTorch fp32)
on the same texts (the demo corpus's chunks), same thread count. Run: python -m bench.embed
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import row

CORPUS = Path(__file__).resolve().parent.parent / "builder" / "demo_data" / "corpus"


def texts(n: int = 512, min_chars: int = 0) -> list[str]:
    """The demo corpus's chunks (repeated to n); min_chars keeps only the longer prose ones."""
    from appliance.documents.chunking import chunk_document
    from appliance.documents.readers import expand_paths, read_document

    files, _ = expand_paths([CORPUS])
    chunks = [
        c.text
        for f in files
        for c in chunk_document(read_document(f, 10**8), 1200)
        if len(c.text) >= min_chars
    ]
    return (chunks * (n // len(chunks) + 1))[:n]


def rate(fn, items: list[str], rounds: int = 3) -> float:
    fn(items[:32])  # warm-up
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        fn(items)
        best = max(best, len(items) / (time.perf_counter() - start))
    return best


def run(embedder_dir: Path | None = None) -> list[str]:
    lines = []
    for label, min_chars in (("all chunks", 0), ("long chunks (>= 600 characters)", 600)):
        lines += [f"\n{label}:\n", *_run(texts(min_chars=min_chars), embedder_dir)]
    return lines


def _run(items: list[str], embedder_dir: Path | None) -> list[str]:
    import torch
    from sentence_transformers import SentenceTransformer

    from appliance.config import load_settings
    from appliance.retrieval.embed import OnnxEmbedder
    from builder.embedder import default_source, export

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        if embedder_dir is None:
            embedder_dir = Path(tmp)
            export(embedder_dir)
        batch = load_settings().embed_batch
        int8 = OnnxEmbedder(embedder_dir, threads=threads, batch_size=batch, variant="int8")
        fp32 = OnnxEmbedder(embedder_dir, threads=threads, batch_size=batch, variant="fp32")
        st = SentenceTransformer(str(default_source()), device="cpu", local_files_only=True)
        st.max_seq_length = int8.manifest["max_length"]
        # the baseline at its own best batch size, not ours
        st_rates = {
            bs: rate(lambda t, bs=bs: st.encode(t, batch_size=bs, normalize_embeddings=True), items)
            for bs in (8, 16, 32)
        }
        st_batch, r_st = max(st_rates.items(), key=lambda kv: kv[1])
        r_fp32 = rate(fp32.embed, items)
        r_int8 = rate(int8.embed, items)
        cos = float(
            np.min(np.sum(int8.embed(items[:64]) * st.encode(items[:64], normalize_embeddings=True), 1))
        )
    return [
        row("embedder", "chunks/s", "vs sentence-transformers fp32"),
        row("---", "---", "---"),
        row(f"sentence-transformers (PyTorch fp32, batch {st_batch})", f"{r_st:.1f}", "1.00x"),
        row(f"ONNX fp32 (batch {batch})", f"{r_fp32:.1f}", f"{r_fp32 / r_st:.2f}x"),
        row(f"ONNX int8, fused (appliance default, batch {batch})", f"{r_int8:.1f}", f"{r_int8 / r_st:.2f}x"),
        f"\n{len(items)} chunks of the demo corpus ({int(np.mean([len(t) for t in items]))} characters "
        f"mean), {threads} threads; "
        f"int8 vs PyTorch minimum cosine on 64 chunks: {cos:.4f}",
    ]


if __name__ == "__main__":
    print("\n".join(run()))
