"""`builder feedback import`: operator feedback exported by appliances, into datasets the stages read.

Each export directory is checked first (appliance.records.feedback.verify_export: signed by a trusted
appliance key, every file's sha256, nothing missing or extra) and refused whole otherwise, naming
the file. An export already imported (same export id) is skipped as a replay; records already in
the dataset (same content, whichever export brought them) are skipped as duplicates. Each question
falls into `heldout/` or not by a hash of its text (every record names it, `feedback.question`), so
all its records stay on one side, across files and across imports.

The dataset directory:
  sft.jsonl, dpo.jsonl        for `builder sft` / `builder align` (`datasets:`)
  retrieval.jsonl, ratings.jsonl
  questions.jsonl             corrected questions as {id, question, must_contain, kind: feedback} for
                              `builder eval` (`questions:`): the codes the correction names must appear
  heldout/                    the same files for the held-out questions
  imports.json                every export imported: id, appliance key, manifest sha256, counts, time
Stages that read these files record imports.json in their lineage (builder.lineage), so a model's
lineage names the exports that went into it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from appliance.bundles.identity import key_id, load_public
from appliance.bundles.manifest import utc_stamp
from appliance.documents.readers import CODE_RE
from appliance.errors import FeedbackError
from appliance.records.feedback import FILES, verify_export

IMPORTS = "imports.json"
QUESTIONS = "questions.jsonl"


def trusted_keys(paths: list[Path]) -> dict:
    """{key id: public key} of appliance.pub files."""
    keys = {}
    for path in paths:
        try:
            key = load_public(path.read_bytes(), str(path))
        except OSError as exc:
            raise FeedbackError(
                f"{path}: cannot read ({exc.strerror})", "give the appliance.pub file"
            ) from exc
        keys[key_id(key)] = key
    return keys


def record_key(record: dict) -> str:
    """A record's identity across imports: its content without the feedback bookkeeping."""
    body = {k: v for k, v in record.items() if k != "feedback"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def heldout(question: str, fraction: float) -> bool:
    digest = hashlib.sha256(question.strip().lower().encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def eval_question(record: dict) -> dict | None:
    """A corrected DPO record as an eval question: the codes the correction names must be in the answer."""
    codes = list(dict.fromkeys(CODE_RE.findall(record["chosen"])))
    if not codes:
        return None
    return {
        "id": f"feedback-{record['feedback']['id']}-{record_key(record)[:8]}",
        "question": record["feedback"]["question"],
        "must_contain": codes,
        "kind": "feedback",
    }


@dataclass
class ImportReport:
    imported: list[dict] = field(default_factory=list)
    replayed: list[dict] = field(default_factory=list)
    added: dict = field(default_factory=dict)
    duplicates: int = 0

    def to_json(self) -> dict:
        return vars(self)


def _read(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def import_exports(
    directories: list[Path], trust: list[Path], out: Path, heldout_fraction: float = 0.2
) -> ImportReport:
    keys = trusted_keys(trust)
    if not keys:
        raise FeedbackError("no trusted appliance key", "pass --trust with each appliance's appliance.pub")
    verified = [verify_export(d, keys) for d in directories]  # all checked before anything is written
    out.mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(exist_ok=True)
    history = json.loads((out / IMPORTS).read_text()) if (out / IMPORTS).exists() else []
    seen_exports = {h["export_id"]: h for h in history}
    names = [*FILES, QUESTIONS]
    existing = {(split, name): _read(out / split / name) for split in ("", "heldout") for name in names}
    seen = {record_key(r) for rows in existing.values() for r in rows}
    report = ImportReport(added={name: 0 for name in names})
    for export in verified:
        export_id = export.manifest["export_id"]
        if export_id in seen_exports:
            report.replayed.append(
                {
                    "export_id": export_id,
                    "directory": str(export.directory),
                    "first_imported": seen_exports[export_id]["imported"],
                }
            )
            continue
        for name in FILES:
            for record in export.records.get(name, []):
                extra = [(QUESTIONS, q) for q in [eval_question(record)] if q] if name == "dpo.jsonl" else []
                for target, row in [(name, record), *extra]:
                    key = record_key(row)
                    if key in seen:
                        report.duplicates += target == name
                        continue
                    seen.add(key)
                    split = "heldout" if heldout(record["feedback"]["question"], heldout_fraction) else ""
                    existing[(split, target)].append(row)
                    report.added[target] += 1
        entry = {
            "export_id": export_id,
            "directory": str(export.directory.resolve()),
            "appliance_key_id": export.manifest["appliance"]["key_id"],
            "manifest_sha256": export.manifest_sha256,
            "created": export.manifest["created"],
            "imported": utc_stamp(),
            "counts": {n: m["records"] for n, m in export.manifest["files"].items()},
        }
        history.append(entry)
        seen_exports[export_id] = entry
        report.imported.append(entry)
    for (split, name), rows in existing.items():
        path = out / split / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
        tmp.replace(path)
    (out / IMPORTS).write_text(json.dumps(history, indent=2) + "\n")  # last: a crash before it re-imports
    for r in report.replayed:
        print(
            f"feedback: export {r['export_id']} was imported on {r['first_imported']}; skipped (replay)",
            file=sys.stderr,
        )
    return report


def lineage_of(inputs: list[Path]) -> list[dict]:
    """The feedback exports behind a stage's inputs (imports.json beside any input file)."""
    found: dict[str, dict] = {}
    for path in inputs:
        for directory in (path.parent, path.parent.parent):
            history = directory / IMPORTS
            if path.is_file() and history.is_file():
                for entry in json.loads(history.read_text()):
                    found[entry["export_id"]] = {
                        k: entry[k] for k in ("export_id", "appliance_key_id", "manifest_sha256", "created")
                    }
                break
    return list(found.values())
