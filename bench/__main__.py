"""`make bench`: every benchmark, printed as markdown tables (the README's table comes from here)."""

import sys
from pathlib import Path

from bench import bundle, concurrency, decode, embed, search

AVX512_PYTHON = Path(__file__).resolve().parent.parent / "build" / "bench" / "avx512-venv" / "bin" / "python"

if __name__ == "__main__":
    sections = [("Hybrid search", lambda: search.run([10_000, 100_000])),
                ("Embedding throughput", embed.run),
                ("Bundle verify+install", bundle.run),
                ("Decode", lambda: decode.run({"avx512": str(AVX512_PYTHON)} if AVX512_PYTHON.exists() else {})),
                ("Concurrent operators", concurrency.run)]
    only = set(sys.argv[1:])
    for title, fn in sections:
        if only and not any(o.lower() in title.lower() for o in only):
            continue
        print(f"\n### {title}\n", flush=True)
        print("\n".join(fn()), flush=True)
