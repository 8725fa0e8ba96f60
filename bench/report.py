"""The README's measured tables, generated from what the benchmarks wrote: one source, so a figure in the
README is the figure a run printed, with the machine it ran on.

`make bench` (bench/__main__.py) writes each section's table to `bench/results/<name>.md`, its first line
naming the machine, the date and the command. The README holds each generated table between
`<!-- bench:<name> -->` and `<!-- /bench:<name> -->`; `python -m bench.report` copies the results in,
`python -m bench.report --check` fails when the README and the results differ (tests/test_bench.py)."""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- bench:([\w-]+) -->\n)(.*?)(<!-- /bench:\2 -->)", re.DOTALL)


def machine() -> str:
    """The CPU as a reader compares it: model, cores, the vector instructions that matter to llama.cpp."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = (
        "AVX-512" + (" BF16" if "avx512_bf16" in flags else "")
        if "avx512f" in flags
        else "AVX2"
        if "avx2" in flags
        else "no AVX2"
    )
    return f"{model}, {os.cpu_count()} cores, {simd}, no GPU"


def record(name: str, lines: list[str], command: str) -> Path:
    """Write one section's table, headed by the machine, the date and the command that made it."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    head = f"Measured on {machine()}, {time.strftime('%Y-%m-%d')}, by `{command}`:"
    while lines and not lines[0].strip():
        lines = lines[1:]
    path.write_text("\n".join([head, "", *lines]) + "\n")
    return path


def splice(readme: str) -> str:
    """The README with every generated block replaced by its result file (a missing one is an error)."""

    def block(match: re.Match) -> str:
        path = RESULTS / f"{match.group(2)}.md"
        if not path.exists():
            raise SystemExit(
                f"README names bench result {match.group(2)!r}, but {path} does not exist: "
                f"run `make bench` (or `python -m bench {match.group(2)}`)"
            )
        return match.group(1) + path.read_text() + match.group(4)

    return BLOCK.sub(block, readme)


def main(argv: list[str]) -> int:
    text = README.read_text()
    spliced = splice(text)
    if "--check" in argv:
        stale = [m.group(2) for m in BLOCK.finditer(text) if m.group(0) not in spliced]
        if stale:
            print(
                f"README.md's tables {', '.join(stale)} differ from bench/results: run `python -m bench.report`",
                file=sys.stderr,
            )
            return 1
        return 0
    README.write_text(spliced)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
