"""Hybrid search latency at 10k and 100k chunks, beside a brute-force numpy scan of the same vectors.

Chunks are synthetic: 120 words each drawn with a Zipf distribution (exponent 1.1, as in natural
text) over the demo corpus's words plus made-up ones (20,000 in all), and random unit vectors of
the embedder's 384 dimensions. Queries are four words from the same distribution and a precomputed
vector, so the figures are the store's, not the embedder's. "cached" is a long-lived process
(service, UI) holding the vectors in memory; "vec0" is a one-shot command letting sqlite-vec scan.
Run: python -m bench.search [--sizes 10000 100000]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

from appliance.retrieval.rag import fts_query, query_words, search, selective_words
from appliance.retrieval.store import NewChunk, Store
from bench.common import pct, row, time_each

DIM = 384
CORPUS = Path(__file__).resolve().parent.parent / "builder" / "demo_data" / "corpus"


class FixedEmbedder:
    """Returns precomputed query vectors: the benchmark measures retrieval, not embedding."""

    name, dim = "bench-random", DIM

    def __init__(self, vectors):
        self.vectors = vectors
        self.i = 0

    def embed(self, texts):
        self.i = (self.i + 1) % len(self.vectors)
        return self.vectors[self.i : self.i + 1]


def vocabulary(size: int = 20_000) -> list[str]:
    import re

    words = set()
    for p in CORPUS.rglob("*"):
        if p.suffix in {".md", ".txt", ".csv"}:
            words |= set(re.findall(r"[a-z]{3,}", p.read_text().lower()))
    rng = random.Random(7)
    made_up = {"".join(rng.choices("abcdefghiklmnoprstuvwy", k=rng.randint(4, 10))) for _ in range(size)}
    return (sorted(words) + sorted(made_up - words))[:size]


class ZipfWords:
    def __init__(self, words: list[str], seed: int, exponent: float = 1.1):
        order = words[:]
        random.Random(seed).shuffle(order)  # which words are common is arbitrary
        self.words = order
        self.weights = [1 / (rank + 1) ** exponent for rank in range(len(order))]
        self.rng = random.Random(seed)

    def sample(self, k: int) -> list[str]:
        return self.rng.choices(self.words, weights=self.weights, k=k)


def unit(n: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def build(path: Path, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    zipf = ZipfWords(vocabulary(), seed)
    vectors = unit(n, rng)
    with Store(path) as store:
        store.ensure_embedder(FixedEmbedder.name, DIM, lambda t: unit(len(t), rng))
        per_doc = 100
        for d in range(n // per_doc):
            chunks = [
                NewChunk(
                    i,
                    "Section",
                    " ".join(zipf.sample(120))
                    + f" code {10 + (d * per_doc + i) % 89}-{1000 + (d * per_doc + i) % 8999}.00",
                )
                for i in range(per_doc)
            ]
            store.add_document(
                "bench",
                f"/bench/{d}",
                f"doc {d}",
                "txt",
                f"{d:064x}",
                1,
                chunks,
                vectors[d * per_doc : (d + 1) * per_doc],
            )
    return vectors


def keyword_only(store: Store, text: str) -> list:
    match = fts_query(text, selective_words(store, query_words(text)))
    return store.keyword_search(match, 20) if match else []


def brute_force(vectors: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    scores = vectors @ query
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def run(sizes: list[int], queries: int = 200) -> list[str]:
    lines = [
        row(
            "chunks",
            "hybrid cached p50 ms",
            "hybrid cached p95 ms",
            "hybrid vec0 p95 ms",
            "keyword p95 ms",
            "vector cached p95 ms",
            "vec0 KNN p95 ms",
            "numpy brute-force p95 ms",
            "hybrid cached p95 / brute-force p95",
        ),
        row(*["---"] * 9),
    ]
    rng = np.random.default_rng(1)
    zipf = ZipfWords(vocabulary(), 0)  # same distribution as the chunks
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            vectors = build(Path(tmp) / "bench.db", n)
            build_s = time.perf_counter() - start
            qv = unit(queries, rng)
            texts = [" ".join(zipf.sample(4)) for _ in range(queries)]
            emb = FixedEmbedder(qv)
            with Store(Path(tmp) / "bench.db") as store:
                direct = time_each(partial(search, store, emb, k=5), texts, queries)
                knn = time_each(partial(store.vector_search, k=20), list(qv), queries)
                keyword = time_each(partial(keyword_only, store), texts, queries)
            with Store(Path(tmp) / "bench.db", cache_vectors=True) as store:
                hybrid = time_each(partial(search, store, emb, k=5), texts, queries)
                cached_knn = time_each(partial(store.vector_search, k=20), list(qv), queries)
            numpy_ms = time_each(partial(brute_force, vectors, k=20), list(qv), queries)
            lines.append(
                row(
                    f"{n:,}",
                    f"{pct(hybrid, 50):.2f}",
                    f"{pct(hybrid, 95):.2f}",
                    f"{pct(direct, 95):.2f}",
                    f"{pct(keyword, 95):.2f}",
                    f"{pct(cached_knn, 95):.2f}",
                    f"{pct(knn, 95):.2f}",
                    f"{pct(numpy_ms, 95):.2f}",
                    f"{pct(hybrid, 95) / pct(numpy_ms, 95):.1f}x",
                )
            )
            print(f"  built {n:,} chunks in {build_s:.0f} s", flush=True)
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    print("\n".join(run(args.sizes)))
