"""`builder prepare`: a customer's folders of documents -> the training data of every stage, for any
corpus, with what it decided and the hashes of what it read.

Each file is read by the appliance's own readers and sorted into a kind, and the decision is said:
- `reference`: a table whose code and title columns are found (appliance.documents.columns, by header
  words and by content); its rows teach lookups;
- `rfp`: a solicitation (a folder named rfp/rfps/solicitations, or its text: "Request for Proposal",
  "Section L", "Instructions to Offerors", "Evaluation Factors", "Statement of Work", offerors shall);
- `proposal`: any other prose (past proposals, reports, manuals);
- `table`: a table without a code and a title column: left to retrieval, not trained on.
A folder named like a kind (proposals/, rfps/, reference/) decides for the files under it.

Whole documents are held out, never parts of them: a share of the prose documents (at least one when
there are two or more) and a share of the reference table's rows that no training document names.
The held-out questions ask for the figures the held-out documents state and the codes and titles of
the held-out rows; nothing of theirs is in any training file.

Writes OUT in the layout the workstation pipeline reads (models/*/gpu-workstation.yaml, `--var
data=OUT`). OUT may not overlap the folders read, and an existing OUT must be one prepare wrote; only
what prepare writes is replaced (a run's build/ and the site's general.jsonl stay), once everything
is written, so a failure leaves the last data whole. Files with the same content are read once.
  docs/<folder>/...          the prose documents trained on, copied (continual pre-training, the
                             importance matrix, and with heldout/ and tables/ the eval's retrieval corpus)
  heldout/<folder>/...       the held-out documents (perplexity, and what the held-out questions ask)
  tables/<folder>/...        the tables: retrieval only, never pre-trained on (a held-out row is in them)
  sft-qa.jsonl               question -> cited answer chats, shaped as the appliance sends them
  sft-write.jsonl            requirement -> cited proposal paragraph chats
  pairs.jsonl                preference pairs for DPO ({"prompt", "chosen", "rejected"})
  heldout-questions.jsonl    {"id", "kind", "question", "must_contain", "source"} for `builder eval`
  prepare.json               every input with its sha256, kind, reason and whether it was held out;
                             the table's column mapping; the counts; the settings
General text to replay against forgetting (general.jsonl) is not made here: nothing general is on an
air-gapped workstation unless the site brings it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance.documents.columns import parse_mapping
from appliance.documents.readers import expand_paths, parse_document, read_bytes
from appliance.documents.voice import voice
from appliance.errors import ApplianceError
from appliance.terminal import clean_text
from builder import demo
from builder.errors import BuilderError

FOLDERS = {  # a folder name that decides the kind of the files under it
    "reference": "reference",
    "references": "reference",
    "tables": "reference",
    "rfp": "rfp",
    "rfps": "rfp",
    "solicitations": "rfp",
    "proposals": "proposal",
    "past-proposals": "proposal",
    "past_proposals": "proposal",
}
MAX_BYTES = 50_000_000
SIZES = {  # how much each run writes: a workstation run, and the tests' quick one
    "full": {"lcat": 1200, "write_variants": 4, "pairs": 32, "facts_per_doc": 12},
    "quick": {"lcat": 40, "write_variants": 1, "pairs": 8, "facts_per_doc": 6},
}
MAX_HELD_ROWS = 30


@dataclass
class Decision:
    path: str
    sha256: str
    kind: str
    reason: str
    held_out: bool = False


def _folder_kind(relative: Path) -> tuple[str, str] | None:
    for part in reversed(relative.parent.parts):
        if part.lower() in FOLDERS:
            return FOLDERS[part.lower()], part
    return None


def classify(doc, relative: Path, mapping: dict[str, str] | None = None) -> tuple[str, str]:
    """A document's kind and why (see the module's docstring). `mapping`: the reference table's columns
    named by the user ({role: column}), over what detection finds. A table in a folder named for
    reference tables that has no code or title column is refused, naming the columns it found."""
    folder = _folder_kind(relative)
    if doc.table is not None:
        if mapping and (
            (folder is not None and folder[0] == "reference")
            or set(mapping.values()) <= set(doc.table.columns)
        ):
            # the user's mapping: a table they filed as reference must have its columns (refused, naming them)
            doc.table.use_mapping(mapping)
        roles = doc.table.roles
        if roles.code and roles.title:
            return "reference", f"a table: {roles.describe()}"
        if folder and folder[0] == "reference":
            roles.require_key(str(doc.path))  # the user said it is one: refused with what was found
        return "table", f"a table without a code and a title column ({roles.describe()}): retrieval only"
    if folder and folder[0] != "reference":  # prose filed beside the tables is still prose
        return folder[0], f"in a folder named {folder[1]!r}"
    spoken = voice(doc.text)  # a solicitation asks in the buyer's voice; a proposal answers in its own
    if spoken.solicitation:
        return (
            "rfp",
            f"the buyer's voice ({spoken.asks} phrases like 'the contractor shall') over the seller's "
            f"({spoken.offers})",
        )
    return (
        "proposal",
        f"the seller's voice ({spoken.offers} phrases like 'we will', 'our') over the buyer's ({spoken.asks})",
    )


def _rank(seed: int, sha: str) -> str:
    return hashlib.sha256(f"{seed}:{sha}".encode()).hexdigest()


def held_out_count(n: int, share: float) -> int:
    """Prose documents held out of `n`: the share, at least one when there are two, never all."""
    if n < 2 or share <= 0:
        return 0
    return min(n - 1, max(1, round(n * share)))


def _read(roots: list[Path]) -> tuple[list[tuple], list[dict]]:
    """(document, its destination path under docs/ or heldout/, sha256, its bytes) for every readable
    file, and every other file with the reason it was not read (unsupported type, hidden, too large,
    unreadable, the same content as another). Read once: what is hashed is what is parsed and copied."""
    found, skipped, seen, taken = [], [], {}, set()
    for root in roots:
        passed: list[dict] = []
        files, refused = expand_paths([root], passed)
        skipped += [{"path": r["source"], "reason": r.get("error") or r["reason"]} for r in refused + passed]
        for path in files:
            try:
                data = read_bytes(path, MAX_BYTES)
                doc = parse_document(path, data)
            except (ApplianceError, OSError) as exc:
                skipped.append({"path": str(path), "reason": getattr(exc, "message", None) or str(exc)})
                continue
            sha = hashlib.sha256(data).hexdigest()
            if sha in seen:  # one copy decides: two could fall on both sides of the held-out line
                skipped.append({"path": str(path), "reason": f"the same content as {seen[sha]}"})
                continue
            seen[sha] = path
            # under the root's own name: `prepare ~/proposals` files them as proposals, as a folder inside would
            relative = (
                Path(root.name) / path.relative_to(root) if root.is_dir() else Path("files") / path.name
            )
            unique, n = relative, 1
            while unique in taken:  # two roots with the same name, or two files named alike
                n += 1
                unique = relative.with_name(f"{relative.stem}-{n}{relative.suffix}")
            taken.add(unique)
            found.append((doc, unique, sha, data))
    return found, skipped


OURS = (
    "docs",
    "heldout",
    "tables",
    "sft-qa.jsonl",
    "sft-write.jsonl",
    "pairs.jsonl",
    "heldout-questions.jsonl",
    "prepare.json",
)


def _check_out(out: Path, roots: list[Path]) -> None:
    """OUT must not overlap what is read, and is only ever a folder prepare wrote (or a new one)."""
    for root in roots:
        if out == root or root in out.parents or out in root.parents:
            raise BuilderError(
                f"--out {out} overlaps the documents read from {root}",
                "write the data to a folder outside the documents' folders",
            )
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "prepare.json").is_file())):
        raise BuilderError(
            f"--out {out} exists and was not written by `builder prepare` (no prepare.json)",
            "name a new folder, or one an earlier `builder prepare` wrote",
        )


def _replace_ours(staging: Path, out: Path) -> None:
    """Put the staged data in OUT, replacing only what prepare writes: a training run's build/ or the
    site's general.jsonl beside it stay. The old entries are moved aside first and put back if a move
    fails, so OUT holds one run's data whole."""
    out.mkdir(exist_ok=True)
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    moved: list[str] = []
    placed: list[str] = []
    try:
        for name in OURS:
            if (out / name).exists():
                (out / name).rename(aside / name)
                moved.append(name)
        for name in OURS:
            if (staging / name).exists():
                (staging / name).rename(out / name)
                placed.append(name)
    except BaseException:
        for name in placed:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink()
        for name in moved:
            (aside / name).rename(out / name)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _row_questions(corpus_rows: list[dict], source: str) -> list[dict]:
    items = []
    for row in corpus_rows:
        items.append(
            {
                "id": f"row-{row['code']}-code",
                "kind": "lcat_code",
                "question": f"What labor category code should we bid for {demo.article(row['title'])}?",
                "must_contain": [row["code"]],
                "source": source,
            }
        )
        items.append(
            {
                "id": f"row-{row['code']}-title",
                "kind": "lcat_code",
                "question": f"Which labor category does code {row['code']} stand for?",
                "must_contain": [row["title"]],
                "source": source,
            }
        )
    return items


def _fact_questions(docs: list, kinds: dict, rng: random.Random, per_doc: int) -> list[dict]:
    """The figures the held-out documents state, asked as a proposal team asks (builder.demo's
    `figure_facts`), at most `per_doc` a document, each figure asked once."""
    held = demo.Corpus(docs, [], kinds=kinds, headless=True)
    by_doc: dict[Path, list] = {}
    for (doc, _chunk), question, _sentence, figure in demo.figure_facts(held):
        by_doc.setdefault(doc.path, []).append((question, figure))
    items = []
    for path, facts in by_doc.items():
        seen, chosen = set(), []
        for question, figure in facts:
            if figure not in seen:
                seen.add(figure)
                chosen.append((question, figure))
        for question, figure in rng.sample(chosen, min(per_doc, len(chosen))):
            items.append(
                {
                    "id": f"doc-{len(items) + 1}-{path.stem[:40]}",
                    "kind": "document",
                    "question": question,
                    "must_contain": [figure],
                    "source": path.name,
                }
            )
    return items


def prepare(
    roots: list[Path],
    out: Path,
    *,
    held_out_share: float = 0.2,
    seed: int = 0,
    size: str = "full",
    company: str | None = None,
    columns: str | None = None,
    log=None,
) -> dict:
    """Read `roots`, decide, hold out, write OUT (see the module's docstring); returns prepare.json.
    `columns`: "code=COLUMN,title=COLUMN,..." for a reference table whose headers say nothing."""
    printer = log or (lambda line: print(line, file=sys.stderr))

    def say(line: str) -> None:  # file names and reasons come from the documents: no escapes reach a terminal
        printer(clean_text(line))

    mapping = parse_mapping(columns) if columns else None
    if not 0 <= held_out_share < 1:
        raise BuilderError(
            f"--held-out {held_out_share}: a share from 0 to below 1", "for example --held-out 0.2"
        )
    if size not in SIZES:
        raise BuilderError(f"size {size!r} is not one of {', '.join(SIZES)}")
    roots = [r.resolve() for r in roots]
    out = out.resolve()
    _check_out(out, roots)
    out.parent.mkdir(parents=True, exist_ok=True)
    found, skipped = _read(roots)
    if not found:
        raise BuilderError(
            f"no readable documents under {', '.join(map(str, roots))}"
            + (
                f" ({len(skipped)} could not be read: {skipped[0]['path']}: {skipped[0]['reason']})"
                if skipped
                else ""
            ),
            "point prepare at folders of txt, md, pdf, docx, csv or xlsx files",
        )
    decisions: dict[Path, Decision] = {}
    relatives = {}
    for doc, relative, sha, _ in found:
        relatives[doc.path] = relative
        kind, reason = classify(doc, relative, mapping)
        decisions[doc.path] = Decision(str(doc.path), sha, kind, reason)
    if mapping and not any(
        d.table is not None and all(d.table.roles.how.get(role) == "mapping" for role in mapping)
        for d, _, _, _ in found
    ):
        tables = [
            f"{d.path.name}: {', '.join(d.table.columns)}" for d, _, _, _ in found if d.table is not None
        ]
        raise BuilderError(
            f"--columns names {', '.join(repr(c) for c in mapping.values())}, which no table has together",
            "the tables' columns: " + ("; ".join(tables) if tables else "no table was found"),
        )
    docs = {doc.path: doc for doc, _, _, _ in found}
    contents = {doc.path: data for doc, _, _, data in found}
    prose = sorted(
        (p for p, d in decisions.items() if d.kind in ("proposal", "rfp")),
        key=lambda p: _rank(seed, decisions[p].sha256),
    )
    held = set(prose[: held_out_count(len(prose), held_out_share)])
    for path in held:
        decisions[path].held_out = True
    tables = [p for p, d in decisions.items() if d.kind == "reference" and docs[p].table is not None]
    for extra in tables[1:]:
        decisions[extra].reason += "; not trained on: only the first reference table teaches lookups"
    kinds = {p: d.kind for p, d in decisions.items() if d.kind in ("proposal", "rfp")}
    rng = random.Random(seed)
    sizes = SIZES[size]

    eval_items = _fact_questions([docs[p] for p in sorted(held)], kinds, rng, sizes["facts_per_doc"])
    table_info = None
    train_docs = [docs[p] for p in prose if p not in held] + ([docs[tables[0]]] if tables else [])
    if tables:
        table_doc = docs[tables[0]]
        probe = demo.Corpus([table_doc], [], company=company)
        rows = sorted(probe.rows, key=lambda r: _rank(seed, r["code"]))
        n_held = min(MAX_HELD_ROWS, math.floor(len(rows) * held_out_share)) if len(rows) >= 5 else 0
        # only rows no training document names: a proposal's staffing table would teach the answer
        trained_text = " ".join(docs[p].text for p in prose if p not in held)
        held_rows = [r for r in rows if r["code"] not in trained_text and r["title"] not in trained_text][
            :n_held
        ]
        eval_items += _row_questions(held_rows, table_doc.path.name)
        table_info = {
            "path": str(table_doc.path),
            "columns": probe.roles.describe() if probe.roles else "",
            "rows": len(rows),
            "held_out_rows": [r["code"] for r in held_rows],
        }
    corpus = demo.Corpus(train_docs, eval_items, kinds=kinds, company=company, headless=True)
    if not corpus.prose and not corpus.rows:
        raise BuilderError(
            f"nothing to train on: {len(prose) - len(held)} prose documents to train on hold no passage of "
            f"text, and no reference table was found ({len(held)} documents held out)",
            "add documents or a reference table, or lower --held-out",
        )
    qa = demo.qa_chats(corpus, rng, sizes["lcat"] if corpus.rows else sizes["lcat"] // 4)
    write = demo.write_chats(corpus, rng, variants=sizes["write_variants"])
    pairs = demo.preference_pairs(rng, qa, sizes["pairs"]) if corpus.rows else []
    # tables go apart from what pre-training reads: a held-out row must not be learnt from its table
    copies = {
        p: Path("heldout" if p in held else "tables" if docs[p].table is not None else "docs") / rel
        for p, rel in relatives.items()
    }

    report = {
        "format": 1,
        "roots": [str(r) for r in roots],
        "settings": {
            "held_out_share": held_out_share,
            "seed": seed,
            "size": size,
            "company": company,
            "columns": mapping,
        },
        "inputs": [asdict(d) for d in sorted(decisions.values(), key=lambda d: d.path)],
        "skipped": skipped,
        "table": table_info,
        "counts": {
            "training_documents": sum(1 for c in copies.values() if c.parts[0] == "docs"),
            "qa_chats": len(qa),
            "writing_chats": len(write),
            "preference_pairs": len(pairs),
            "held_out_questions": len(eval_items),
            "held_out_documents": len(held),
        },
        "files": {},
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for folder in ("docs", "heldout", "tables"):  # each there, empty or not: the pipeline names all three
            (staging / folder).mkdir()
        for source, copy in copies.items():
            (staging / copy).parent.mkdir(parents=True, exist_ok=True)
            (staging / copy).write_bytes(contents[source])  # the bytes hashed and parsed
        for name, rows in (
            ("sft-qa.jsonl", [{"messages": c} for c in qa]),
            ("sft-write.jsonl", [{"messages": c} for c in write]),
            ("pairs.jsonl", pairs),
            ("heldout-questions.jsonl", eval_items),
        ):
            path = demo.write_jsonl(staging / name, rows)
            report["files"][name] = hashlib.sha256(path.read_bytes()).hexdigest()
        (staging / "prepare.json").write_text(json.dumps(report, indent=2) + "\n")
        _replace_ours(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for d in report["inputs"]:
        say(f"  {d['kind']:<9} {'held out ' if d['held_out'] else ''}{Path(d['path']).name}: {d['reason']}")
    for s in skipped:
        say(f"  skipped   {s['path']}: {s['reason']}")
    if not any(q["kind"] == "lcat_code" for q in eval_items):
        say(
            "note: no reference-table questions: set the pipeline's gate `kind: document` (the workstation "
            "pipeline gates on lcat_code)"
        )
    if not eval_items:
        say(
            f"warning: heldout-questions.jsonl is empty ({len(held)} documents held out, none stating a figure "
            f"prepare can ask for; {len(table_info['held_out_rows']) if table_info else 0} table rows held out), "
            "so `builder eval` cannot measure this data: add documents, or raise --held-out"
        )
    c = report["counts"]
    say(
        f"prepared {out}: {c['training_documents']} documents to train on, {c['qa_chats']} QA chats, "
        f"{c['writing_chats']} writing chats, {c['preference_pairs']} preference pairs; held out "
        f"{c['held_out_documents']} documents"
        + (f" and {len(table_info['held_out_rows'])} table rows" if table_info else "")
        + f", asked by {c['held_out_questions']} questions in heldout-questions.jsonl"
    )
    return report
