"""Staffing plans on RFPs the code was not written against: task -> labor-category rows against keys.

The material is bench/shred/<set>/: each RFP's `rfpNN.staffing.json` (every task of its statement of
work and the categories of the set's table, `lcats-<set>.csv`, that do it), written by the helpers that
wrote the RFPs, who saw no code. Their tables' headers are their own ("LCAT Code", "Functional
Responsibility", "Min. Yrs Exp" ...), and the tasks describe the work without naming a category.
`tuned` chose MATCH and MARGIN (appliance/drafting/staffing.py); `held-out` only reports.

    python -m bench.staffing                  # both sets
    python -m bench.staffing --set tuned --rows  # and each task's categories, right and wrong

Columns, per RFP: tasks (the key's), task -> category rows the key lists, the plan's rows, right (in
the key), precision and recall, rows marked for review and how many of them were wrong.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import frac, row
from bench.shred import HERE

BUILD = Path(__file__).resolve().parent.parent / "build"


def table_rows(path: Path) -> list[dict]:
    """The rows of a labor-category table as the store gives them to drafting (code, title, data)."""
    from appliance.documents.readers import read_document
    from appliance.retrieval.ingest import _table_row

    table = read_document(path, 10**8).table
    return [{**_table_row(table, r), "source": str(path)} for r in table.rows]


def embedder(directory: Path | None = None):
    from appliance.retrieval.embed import OnnxEmbedder

    return OnnxEmbedder(directory or BUILD / "demo-generation" / "embedder", threads=2)


def measure(name: str, embed) -> list[dict]:
    from appliance.documents.readers import read_document
    from appliance.drafting.shred import shred
    from appliance.drafting.staffing import matches

    folder = HERE / name
    rows = table_rows(next(folder.glob("lcats-*.csv")))
    out = []
    for key_path in sorted(folder.glob("rfp*.staffing.json")):
        stem = key_path.name.removesuffix(".staffing.json")
        key = {t["id"]: set(t["categories"]) for t in json.loads(key_path.read_text())["tasks"]}
        reqs = shred(read_document(folder / f"{stem}.text.md", 10**8)).requirements
        # each match counts for the key's task that holds its requirement (C.4.3 holds C.4.3.2(b)),
        # at whatever depth the key's author staffed the work
        got: dict[str, list] = {}
        for m in matches(reqs, rows, embed.embed):
            task = next((t for t in sorted(key, key=len, reverse=True) if _under(m.req.id, t)), None)
            if task:
                got.setdefault(task, []).append(m)
        pairs = {(t, m.row["code"]) for t, found in got.items() for m in found}
        want = {(t, c) for t, codes in key.items() for c in codes}
        review = {(t, m.row["code"]) for t, found in got.items() for m in found if m.review}
        out.append(
            {
                "rfp": stem,
                "tasks": len(key),
                "tasks_found": len(set(got) & set(key)),
                "want": len(want),
                "got": len(pairs),
                "right": len(pairs & want),
                "review": len(review),
                "review_wrong": len(review - want),
                "detail": {t: (sorted(key[t]), sorted({m.row["code"] for m in got.get(t, [])})) for t in key},
            }
        )
    return out


def _under(rid: str, task: str) -> bool:
    return rid == task or rid.startswith((task + ".", task + "("))


def table(sets: list[str], embed=None) -> list[str]:
    embed = embed or embedder()
    lines = [
        row(*["set", "RFP", "tasks found", "precision", "recall", "marked for review (wrong)"]),
        row(*["---"] * 6),
    ]
    for name in sets:
        for m in measure(name, embed):
            lines.append(
                row(
                    name,
                    m["rfp"],
                    frac(m["tasks_found"], m["tasks"]),
                    frac(m["right"], m["got"]),
                    frac(m["right"], m["want"]),
                    f"{m['review']} ({m['review_wrong']})",
                )
            )
    return lines


def run() -> list[str]:
    return table(["tuned", "held-out"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", choices=["tuned", "held-out"])
    parser.add_argument(
        "--rows", action="store_true", help="each task's categories: the key's and the plan's"
    )
    args = parser.parse_args()
    sets = args.set or ["tuned", "held-out"]
    embed = embedder()
    print("\n".join(table(sets, embed)))
    if args.rows:
        for name in sets:
            for m in measure(name, embed):
                print(f"\n## {name}/{m['rfp']}")
                for task, (want, got) in m["detail"].items():
                    print(
                        f"{task}: key {want} plan {got} missing {sorted(set(want) - set(got))} extra {sorted(set(got) - set(want))}"
                    )
