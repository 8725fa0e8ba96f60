"""`make bench`: every benchmark, printed as markdown tables and written to bench/results/<name>.md, from
which `python -m bench.report` fills the README's measured tables (bench/report.py).

`python -m bench search embed`: only those sections."""

import sys
from pathlib import Path

from bench import bundle, concurrency, decode, demo, embed, reading, report, search, service, shred, staffing

BUILD = Path(__file__).resolve().parent.parent / "build"
AVX512_PYTHON = BUILD / "bench" / "avx512-venv" / "bin" / "python"

if __name__ == "__main__":
    sections = [
        ("search", "Hybrid search", lambda: search.run([10_000, 100_000])),
        ("embed", "Embedding throughput", embed.run),
        ("shred", "Shredding RFPs the code was not written against", shred.run),
        ("staffing", "Staffing plans on RFPs the code was not written against", staffing.run),
        ("bundle", "Bundle verify+install", bundle.run),
        (
            "decode",
            "Decode",
            lambda: decode.run({"avx512": str(AVX512_PYTHON)} if AVX512_PYTHON.exists() else {}),
        ),
        ("service", "The service against bare llama.cpp", service.run),
        ("concurrency", "Concurrent operators", concurrency.run),
        # the demo generation `make setup` built: read from its records, nothing is run
        ("demo-stages", "Demo stages", lambda: demo.stages_table(BUILD / "demo-generation")),
        ("demo-eval", "Demo held-out questions", lambda: demo.eval_table(BUILD / "demo-generation")),
        (  # the demo model `make setup` built, and the base model beside it
            "reading",
            "Reading documents never trained on",
            lambda: reading.run(BUILD / "demo-generation", "test", base=True),
        ),
    ]
    only = set(sys.argv[1:])
    for name, title, fn in sections:
        if only and not any(o.lower() in (name, title.lower()) or o.lower() in title.lower() for o in only):
            continue
        print(f"\n### {title}\n", flush=True)
        lines = fn()
        print("\n".join(lines), flush=True)
        print(f"(written to {report.record(name, lines, f'python -m bench {name}')})", file=sys.stderr)
