"""Staffing an RFP from a labor-category table: the only module that maps the RFP's work to categories.

`matches(requirements, rows, embed)` finds, for each obligation of the statement of work (sections C
and J, where a PWS is attached), the categories it calls for, and `plan(matches)` groups them by task:
C.4.1 holds C.4.1.2(a), 5.3 holds 5.3.1. A requirement calls for:
- a category whose title a requirement names ("the Program Manager shall ...");
- for each requirement (a lettered item read with its lead-in), the row whose work (its title and
  duties) is closest: the embedder's cosine plus the words they share, each weighted by how few rows
  use it (LEXICAL; "penetration" says more than "support"), when the cosine is close enough (MATCH). A
  close call (under MARGIN ahead of the runner-up) is marked for review.
`named(text, rows, find)` finds the roles the RFP names anywhere ("Key personnel: ..."), by exact title
first, retrieval second. Codes, titles and qualifications come from the table, never from a model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from appliance.documents.columns import detect
from appliance.drafting.shred import paragraph_id
from appliance.schemas import Requirement, Role, TaskStaffing

# Least cosine (all-MiniLM-L6-v2) between a requirement and a row's work for the row to staff it, and
# the lead over the runner-up under which the match is a close call: chosen on bench/shred/tuned
# (python -m bench.staffing), reported on bench/shred/held-out.
MATCH = 0.30
MARGIN = 0.03
# Weight of the shared words beside the cosine. On bench/shred/tuned, the cosine alone staffed 24 of the
# key's 37 task -> category rows with 9 wrong ones; with the words at 1.0, 30 with 1 wrong.
LEXICAL = 1.0
# Words that say nothing of the work in an RFP, a response or a table's duties.
STOP_WORDS = frozenset(
    "the a an and or of to in on for with by at from as is are be will shall must all each any its it their "
    "they this that these those which who has have been into per than not our we contractor government "
    "within including".split()
)


def _stems(text: str) -> set[str]:
    return {w[:6] for w in re.findall(r"[a-z][a-z0-9-]+", text.lower()) if w not in STOP_WORDS and len(w) > 2}


class _Words:
    """The rows' work as word stems with their inverse document frequency over the table."""

    def __init__(self, works: list[str]):
        self.rows = [_stems(w) for w in works]
        counts: dict[str, int] = {}
        for stems in self.rows:
            for w in stems:
                counts[w] = counts.get(w, 0) + 1
        self.idf = {w: math.log(len(works) / n) for w, n in counts.items()}
        self.norm = [1 + sum(self.idf[w] for w in stems) for stems in self.rows]

    def scores(self, text: str) -> np.ndarray:
        asked = _stems(text)
        return np.array(
            [
                sum(self.idf[w] for w in asked & stems) / norm
                for stems, norm in zip(self.rows, self.norm, strict=True)
            ]
        )


def title_pattern(title: str) -> re.Pattern:
    return re.compile(r"\b" + re.escape(title) + r"(?:s|es)?\b", re.IGNORECASE)


def row_work(row: dict) -> str:
    """What a reference row says its category does: the title and the row's longest other value (the
    duties column of a labor-category table, whatever it is called)."""
    values = [v for v in row["data"].values() if v and v not in (row["code"], row["title"])]
    return f"{row['title']}. {max(values, key=len)}" if values else row["title"]


def role(name: str, row: dict, how: str, *, review: bool = False, key: bool = False) -> Role:
    columns = detect(list(row["data"]))  # by header: "Minimum Education", "Years of Experience" ...
    return Role(
        name=name,
        code=row["code"],
        title=row["title"],
        education=columns.get(row["data"], "education"),
        years=columns.get(row["data"], "years"),
        certification=columns.get(row["data"], "certification"),
        table=row.get("source", ""),
        how=how,
        review=review,
        key=key,
    )


def named(text: str, rows: list[dict], find: Callable[[str], dict | None]) -> list[Role]:
    """Roles named in the RFP text, each with its labor category from the reference rows; those in a
    "Key personnel: ..." line are marked key."""
    roles: dict[str, Role] = {}
    remaining = text
    keys = " ".join(re.findall(r"key personnel\s*(?:are|include|:)\s*([^\n.;]+)", text, re.IGNORECASE))
    patterns = titled(rows)
    key_codes = {row["code"] for row, _ in titles_in(keys, patterns)}
    for row, words in titles_in(text, patterns):
        roles[row["code"]] = role(words, row, "exact title", key=row["code"] in key_codes)
        remaining = title_pattern(row["title"]).sub(" ", remaining)
    # Roles the table does not name word for word: "Key personnel: X and Y", "Other roles: ...".
    for listing in re.findall(r"(?:personnel|roles)\s*:\s*([^\n.]+)", remaining, re.IGNORECASE):
        for phrase in re.split(r",|\band\b|;", listing):
            phrase = re.split(r"\b(?:with|who|having|at least)\b", phrase, flags=re.IGNORECASE)[0]
            phrase = " ".join(re.sub(r"\b(?:a|an|the)\b", " ", phrase, flags=re.IGNORECASE).split())
            if len(phrase) < 4 or not phrase[0].isupper():
                continue
            row = find(phrase)
            if row and row["code"] not in roles:
                roles[row["code"]] = role(phrase, row, "retrieval", key=phrase.lower() in keys.lower())
    return list(roles.values())


def titled(rows: list[dict]) -> list[tuple[dict, re.Pattern]]:
    """The rows with a code and a title, each with its title's pattern compiled once, longest first."""
    keep = sorted((r for r in rows if r["title"] and r["code"]), key=lambda r: -len(r["title"]))
    return [(r, title_pattern(r["title"])) for r in keep]


def titles_in(text: str, rows: list[tuple[dict, re.Pattern]]) -> list[tuple[dict, str]]:
    """The rows (from `titled`) whose title the text names, each with the words the text uses:
    "Senior Database Administrator" is not also a "Database Administrator"."""
    found = []
    for row, pattern in rows:
        match = pattern.search(text)
        if match:
            found.append((row, match.group(0)))
            text = pattern.sub(" ", text)
    return found


_TASK_RE = re.compile(
    r"^((?:[A-M][.-]|(?:PWS|SOW|SOO|Task|Subtask)\s+)?\d{1,3}(?:\.\d{1,3})?)(?:\.\d{1,3})*$", re.IGNORECASE
)


def task_of(req: Requirement) -> str | None:
    """The task a statement-of-work requirement belongs to (its identifier cut to two levels: C.4.1 for
    C.4.1.2(a), 5.3 for 5.3.1, PWS 3.2 for PWS 3.2.1), or None for one outside the work (L, M, a table
    row, an unnumbered paragraph)."""
    if req.kind != "obligation" or req.derived or req.section not in ("C", "J"):
        return None
    base = paragraph_id(req.id)
    task = _TASK_RE.match(base)
    if task is None or (base[0].isdigit() and "." not in base):  # "1." is a list item, not a task
        return None
    return task.group(1)


@dataclass
class Match:
    """A statement-of-work requirement and the category that does it."""

    req: Requirement
    row: dict
    how: str
    review: bool = False


def matches(
    requirements: list[Requirement], rows: list[dict], embed: Callable[[list[str]], np.ndarray]
) -> list[Match]:
    """For each requirement of the work (`task_of` is not None): the categories whose title it names,
    and the row closest to it (see the module's docstring)."""
    rows = [r for r in rows if r["code"] and r["title"]]
    asked = [req for req in requirements if task_of(req)]
    if not asked or not rows:
        return []
    works = [row_work(r) for r in rows]
    words = _Words(works)
    by_id = {r.id: r for r in requirements}
    texts = [_with_lead_in(req, by_id) for req in asked]
    sims_all = embed(works) @ embed(texts).T  # rows x requirements
    patterns = titled(rows)
    found = []
    for i, req in enumerate(asked):
        named_here = [Match(req, row, f"named in {req.id}") for row, _ in titles_in(req.text, patterns)]
        found += named_here
        if named_here:
            continue  # a requirement that names who does it is not also matched by its duties
        sims = sims_all[:, i]
        score = sims + LEXICAL * words.scores(texts[i])
        order = np.argsort(-score)
        best = int(order[0])
        if sims[best] >= MATCH:
            margin = float(score[best] - score[order[1]]) if len(order) > 1 else 1.0
            found.append(Match(req, rows[best], f"duties of {req.id}", review=margin < MARGIN))
    return found


def plan(found: list[Match]) -> list[TaskStaffing]:
    """Each task of the statement of work with the categories its requirements' matches name, once each."""
    tasks: dict[str, dict[str, Role]] = {}
    headings: dict[str, str] = {}
    for m in found:
        task = task_of(m.req) or m.req.id
        headings.setdefault(task, m.req.heading)
        roles = tasks.setdefault(task, {})
        if m.row["code"] not in roles:
            roles[m.row["code"]] = role(
                _short(m.req.text) if m.how.startswith("duties") else m.row["title"],
                m.row,
                m.how,
                review=m.review,
            )
    return [
        TaskStaffing(task=t, heading=headings[t], roles=list(roles.values())) for t, roles in tasks.items()
    ]


def _with_lead_in(req: Requirement, by_id: dict[str, Requirement]) -> str:
    """A lettered item ("(a) hours and costs by CLIN ...") with the paragraph that introduces it."""
    parent = by_id.get(re.sub(r"\([^)]*\)$", "", req.id)) if req.id.endswith(")") else None
    return f"{parent.text} {req.text}" if parent is not None else req.text


def _short(text: str) -> str:
    words = text.split()
    return " ".join(words[:8]) + (" ..." if len(words) > 8 else "")
