"""The demo's tables, read from what `make setup` built (no run of its own): each stage's time and
training figures from its lineage record, and the release eval's held-out questions, base model against
adapted, from the generation's eval.json. The README's demo figures come from here, so they are the
figures of the model the demo ships.

Run: python -m bench demo   (after `make setup`; `python -m bench.demo --generation DIR` for another build)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import row

ROOT = Path(__file__).resolve().parent.parent
GENERATION = ROOT / "build" / "demo-generation"
KINDS = {  # eval.json's question kinds, as a reader names them
    "lcat_code": "labor-category codes, with retrieval",
    "lcat": "other labor-category questions, with retrieval",
    "document": "questions about the proposals, with retrieval",
}


def _stages(generation: Path) -> dict[str, dict]:
    """The shipped generation's stages (its generation.json names them), each with its lineage record:
    the work directory's (which holds the stage's result) when it is the same run of that stage (the same
    input hashes), else the generation's own copy."""
    shipped = {}
    if (generation / "generation.json").exists():
        lineage = json.loads((generation / "generation.json").read_text()).get("lineage", {})
        shipped = dict(lineage.get("stages", {}))
    work = generation.parent / f".{generation.name}.work" / "stages"
    found = {}
    for name, record in shipped.items() or [
        (p.parent.name, None) for p in sorted(work.glob("*/lineage.json"))
    ]:
        path = work / name / "lineage.json"
        there = json.loads(path.read_text()) if path.exists() else None
        if there is not None and (record is None or there.get("inputs") == record.get("inputs")):
            found[name] = there
        elif record is not None:
            found[name] = record
    return found


def _loss(result: dict) -> str:
    first, last = result.get("first_loss"), result.get("last_loss")
    return f"{first:.2f} -> {last:.2f}" if first is not None and last is not None else ""


def stages_table(generation: Path) -> list[str]:
    stages = _stages(generation)
    if not stages:
        raise SystemExit(f"{generation}: no stage records; run `make setup` (or `builder demo`) first")
    lines = [
        row("stage", "started (UTC)", "seconds", "steps", "tokens/s", "loss, first -> last step"),
        row("---", "---", "---:", "---:", "---:", "---"),
    ]
    total = 0.0
    for name, record in stages.items():
        result = record.get("result") or {}
        seconds = float(record.get("seconds") or 0)
        total += seconds
        rate = result.get("tokens_per_s")
        lines.append(
            row(
                name,
                str(record.get("started", "")).replace("T", " ").rstrip("Z"),
                f"{seconds:,.0f}",
                result.get("steps", ""),
                f"{rate:,.0f}" if rate else "",
                _loss(result),
            )
        )
    lines.append(row("**all stages**", "", f"**{total:,.0f}**", "", "", ""))
    return lines


def _share(value: float, questions: int) -> str:
    return f"{round(value * questions)}/{questions} ({value:.0%})"


def _by_kind(tasks: dict, quant: str) -> dict[str, dict]:
    """One model's results for `quant`, by question kind, with "all" for every question."""
    found = tasks.get(quant) or {}
    return {**found.get("by_kind", {}), "all": found.get("overall", {})}


def eval_table(generation: Path) -> list[str]:
    path = generation / "eval.json"
    if not path.exists():
        raise SystemExit(f"{path} does not exist; run `make setup` (or `builder demo`) first")
    report = json.loads(path.read_text())
    quant = (report.get("gate") or {}).get("quant") or next(iter(report["tasks"]))  # the gated, shipped one
    adapted = _by_kind(report["tasks"], quant)
    base = _by_kind((report.get("baseline") or {}).get("tasks", {}), quant)  # absent: not measured

    def cell(results: dict, kind: str, key: str) -> str:
        t = results.get(kind)
        return _share(t[key], t["questions"]) if t else "not measured"

    lines = [
        row("held-out questions", "base model", f"adapted (the demo generation, {quant})"),
        row("---", "---", "---"),
    ]
    for kind, label in KINDS.items():
        if kind in adapted:
            lines.append(
                row(
                    f"{label} ({adapted[kind]['questions']})",
                    cell(base, kind, "with_retrieval"),
                    cell(adapted, kind, "with_retrieval"),
                )
            )
    lines.append(
        row(
            f"all {adapted['all']['questions']}, without retrieval",
            cell(base, "all", "without_retrieval"),
            cell(adapted, "all", "without_retrieval"),
        )
    )
    ppl = (report.get("comparison") or {}).get("heldout_perplexity_f16") or {}
    if ppl:
        lines.append(
            row("perplexity on the held-out proposal, F16", f"{ppl['base']:.1f}", f"{ppl['adapted']:.1f}")
        )
    for name, value in sorted(report.get("perplexity", {}).items()):
        if name != "F16":
            lines.append(row(f"perplexity, {name}", "", f"{value['perplexity']:.1f}"))
    gate = report.get("gate") or {}
    verdict = "passed" if gate.get("passed") else "failed: " + "; ".join(gate.get("failures", []))
    lines.append(row("release gate", "", verdict))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--generation", type=Path, default=GENERATION)
    generation = parser.parse_args().generation
    for title, table in (("Stages", stages_table), ("Held-out questions", eval_table)):
        print(f"\n### {title}\n")
        print("\n".join(table(generation)))


if __name__ == "__main__":
    main()
