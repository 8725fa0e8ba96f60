"""Shredding RFPs the code was not written against: the compliance matrix's rows against answer keys.

The material is in bench/shred/<set>/: RFPs in the Uniform Contract Format written by helpers that saw
no code, each as Markdown text with page footers, a DOCX and a PDF (bench/shred/render.py), with a key
(`rfpNN.key.json`: every requirement row's ID, section, page and first words; the Government's own
obligations and other traps). `tuned` is the set the shredder's rules were adjusted on; `held-out` was
never looked at while writing them: only its figures are reported; `reviewed` was measured once, blind
(408 of 453 rows found), then its failures were read and the rules mended; `blind` was written after
that and measured once.

    python -m bench.shred            # both sets, every format
    python -m bench.shred --set tuned --misses   # and what was missed or wrongly listed

Columns, per RFP file:
- found: key rows the matrix holds (matched by their first words);
- ID, section, page right: of the rows found, those whose identifier, section letter and page agree
  with the key (a key row without an identifier counts as right when ours is marked derived);
- extra: matrix rows the key does not list; traps listed: the key's non-requirements (the
  Government's obligations, background) listed as ours.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import frac, row

HERE = Path(__file__).resolve().parent / "shred"
FORMATS = (".text.md", ".docx", ".pdf")


def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


@dataclass
class Score:
    name: str
    expected: int = 0
    found: int = 0
    ids: int = 0
    sections: int = 0
    pages: int = 0
    extra: int = 0
    traps: int = 0
    misses: list[str] = field(default_factory=list)


def score(path: Path, key: dict) -> Score:
    from appliance.documents.readers import read_document
    from appliance.drafting.shred import shred

    rows = shred(read_document(path, 10**8)).requirements
    texts = [_norm(r.text) for r in rows]
    result = Score(path.name, expected=len(key["requirements"]))
    used: set[int] = set()
    for want in key["requirements"]:
        start = _norm(want["starts"])
        hit = next((i for i, t in enumerate(texts) if i not in used and t.startswith(start)), None)
        if hit is None:
            hit = next((i for i, t in enumerate(texts) if i not in used and start in t), None)
        if hit is None:
            result.misses.append(f"missed {want.get('id')} p{want.get('page')}: {want['starts'][:70]}")
            continue
        used.add(hit)
        got = rows[hit]
        result.found += 1
        id_right = got.id == want["id"] if want.get("id") else got.derived
        result.ids += id_right
        result.sections += got.section == want.get("section")
        result.pages += got.page == want.get("page")
        if not id_right or got.section != want.get("section") or got.page != want.get("page"):
            result.misses.append(
                f"wrong {got.id} {got.section} p{got.page} (key {want.get('id')} {want.get('section')} "
                f"p{want.get('page')}): {want['starts'][:50]}"
            )
    traps = [_norm(t["starts"]) for t in key.get("not_requirements", [])]
    for i, r in enumerate(rows):
        if i in used:
            continue
        if any(t and (texts[i].startswith(t) or t in texts[i]) for t in traps):
            result.traps += 1
            result.misses.append(f"trap listed {r.id}: {r.text[:70]}")
        else:
            result.extra += 1
            result.misses.append(f"extra {r.id} {r.section} p{r.page}: {r.text[:70]}")
    return result


def scores(name: str) -> list[Score]:
    out = []
    for key_path in sorted((HERE / name).glob("rfp*.key.json")):
        key = json.loads(key_path.read_text())
        stem = key_path.name.removesuffix(".key.json")
        for suffix in FORMATS:
            path = key_path.parent / f"{stem}{suffix}"
            if path.exists():
                out.append(score(path, key))
    return out


def table(sets: list[str]) -> list[str]:
    lines = [
        row(
            *["set", "RFP file", "found", "ID right", "section right", "page right", "extra", "traps listed"]
        ),
        row(*["---"] * 8),
    ]
    for name in sets:
        for s in scores(name):
            lines.append(
                row(
                    *[
                        name,
                        s.name,
                        frac(s.found, s.expected),
                        frac(s.ids, s.found),
                        frac(s.sections, s.found),
                        frac(s.pages, s.found),
                        str(s.extra),
                        str(s.traps),
                    ]
                )
            )
    return lines


def run() -> list[str]:
    return table(["tuned", "held-out", "reviewed", "blind"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", choices=["tuned", "held-out", "reviewed", "blind"])
    parser.add_argument("--misses", action="store_true", help="list each miss, wrong field, extra row")
    args = parser.parse_args()
    sets = args.set or ["tuned", "held-out", "reviewed", "blind"]
    print("\n".join(table(sets)))
    if args.misses:
        for name in sets:
            for s in scores(name):
                print(f"\n## {name}/{s.name}")
                print("\n".join(s.misses) or "(none)")
