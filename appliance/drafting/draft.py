"""Proposal drafting from an RFP: the compliance matrix, cited responses, and staffing from the reference table.

`parse_rfp` reads the RFP and shreds it (appliance.drafting.shred: requirement rows, limits, format).
`draft` staffs it (appliance.drafting.staffing: roles the RFP names, and each task of its statement
of work with the categories its requirements call for, from the tables of the collections named),
writes one cited response per obligation from past proposals (never from another RFP unless its
collection is named), judges each (`weakness`: "Needs writing" rather than "Drafted"), keeps the RFP's
word limits, and assembles a Markdown draft: cover, limits and format, compliance matrix, technical
approach, staffing, sources. Codes, titles and qualifications in the staffing table come from the
reference table, never from the model; a code in generated text that the reference tables do not hold
is flagged in the text and in the summary; a requirement left without a response is a gap.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from appliance.documents.readers import CODE_RE, Document, read_document
from appliance.documents.voice import BUYER_VOICE, READ_CHARS, SELLER_VOICE, voice
from appliance.drafting.shred import Shredded, obligation, shred
from appliance.drafting.staffing import STOP_WORDS, matches, named, plan
from appliance.engine.prompt import CITATION_RE
from appliance.errors import IngestError
from appliance.protocols import Embedder, Generator, Sampling
from appliance.retrieval import rag
from appliance.retrieval.store import Store
from appliance.schemas import DraftReport, Requirement, Role, TaskStaffing
from appliance.terminal import clean_text


@dataclass
class Draft:
    rfp: str
    title: str
    requirements: list[Requirement]
    responses: dict[str, str]
    staffing: list[Role]
    sources: list[dict]
    unknown_codes: list[str]
    gaps: list[str]
    needs_writing: dict[str, str] = field(default_factory=dict)  # requirement id -> why its response is weak
    page_limits: dict[str, int] = field(default_factory=dict)  # volume -> pages (section L)
    format: dict = field(default_factory=dict)  # font, size_pt, margins_in (section L)
    trimmed: dict[str, int] = field(default_factory=dict)  # requirement id -> words cut to keep its limit
    plan: list[TaskStaffing] = field(default_factory=list)  # the statement of work's tasks and who does them
    tables: list[str] = field(default_factory=list)  # the reference tables staffing chose from
    markdown: str = ""
    timing: dict = field(default_factory=dict)

    @property
    def to_answer(self) -> list[Requirement]:
        return [r for r in self.requirements if r.kind == "obligation"]

    def report(self) -> DraftReport:
        cited = sorted({int(n) for text in self.responses.values() for n in CITATION_RE.findall(text)})
        codes = sorted(
            {c for text in self.responses.values() for c in CODE_RE.findall(text)}
            | {r.code for r in self.staffing}
        )
        return DraftReport(
            rfp=self.rfp,
            markdown=self.markdown,
            requirements_found=len(self.requirements),
            to_answer=len(self.to_answer),
            answered=len(self.to_answer) - len(self.gaps) - len(self.needs_writing),
            gaps=self.gaps,
            needs_writing=self.needs_writing,
            page_limits=self.page_limits,
            pages_estimated=estimate_pages(self),
            format=self.format,
            trimmed=self.trimmed,
            codes_used=codes,
            unknown_codes=self.unknown_codes,
            citations=cited,
            sources=self.sources,
            requirements=self.requirements,
            staffing=self.staffing,
            plan=self.plan,
            timing=self.timing,
        )


def parse_rfp(path: Path, max_bytes: int, sandbox=None) -> tuple[Document, Shredded]:
    """The RFP and its requirement rows, limits and format (appliance.drafting.shred); IngestError for
    an empty, unreadable or image-only file, or one that states no requirement. `sandbox`
    (appliance.documents.sandbox.Sandbox): where an uploaded file is parsed."""
    doc = read_document(path, max_bytes, sandbox)
    shredded = shred(doc)
    if not any(r.kind == "obligation" for r in shredded.requirements):
        raise IngestError(
            f"{path}: no requirement statements found (no 'shall', 'must' or 'is required to' of the "
            "contractor or offeror)",
            "check that this is the RFP's statement of work, or draft from its sections by hand",
        )
    return doc, shredded


def staffing_rows(store: Store, collections: list[str] | None) -> list[dict]:
    """The reference rows staffing may choose from: those of the collections named, or of every
    reference collection when none is named (a category from a table the user did not choose never
    staffs their draft)."""
    rows = store.ref_rows()
    return rows if not collections else [r for r in rows if r["collection"] in collections]


def flag_unknown_codes(text: str, known: set[str]) -> tuple[str, list[str]]:
    unknown = [c for c in dict.fromkeys(CODE_RE.findall(text)) if c not in known]
    for code in unknown:
        text = re.sub(
            rf"\b{re.escape(code)}\b", f"{code} [UNVERIFIED CODE: not in the reference table]", text
        )
    return text, unknown


def draft(
    store: Store,
    embedder: Embedder,
    generator: Generator,
    rfp: Path,
    *,
    model_info: dict,
    collections: list[str] | None,
    max_bytes: int,
    n_ctx: int,
    max_tokens: int,
    sampling: Sampling,
    progress: Callable[[str, int, int], None] | None = None,
    source: str | None = None,
    sandbox=None,
) -> Draft:
    start = time.perf_counter()
    doc, shredded = parse_rfp(rfp, max_bytes, sandbox)
    title, text, requirements = doc.title, doc.text, shredded.requirements
    every_row = store.ref_rows()
    rows = staffing_rows(store, collections)
    by_chunk = {r["chunk_id"]: r for r in rows}

    def best_row(phrase: str) -> dict | None:  # retrieval, for roles the table does not name verbatim
        hits = rag.search(store, embedder, phrase, k=10)
        return next((by_chunk[h.chunk_id] for h in hits if h.chunk_id in by_chunk), None)

    @functools.cache
    def solicitation(
        doc_id: int,
    ) -> bool:  # another RFP is not evidence of our work (unless asked for by name)
        return voice(store.document_text(doc_id, READ_CHARS)).solicitation

    staffing = named(text, rows, best_row)
    tasks = plan(matches(requirements, rows, embedder.embed))
    have = {r.code for r in staffing}
    for task in tasks:
        for role in task.roles:
            if role.code not in have:
                have.add(role.code)
                staffing.append(role)
    known = {r["code"] for r in every_row if r["code"]}
    rfp_source = source or str(rfp.resolve())  # an upload: its path on the caller's side
    sources: dict[int, dict] = {}  # chunk id -> the draft's numbered source
    responses, unknown, gaps = {}, [], []
    weak: dict[str, str] = {}
    trimmed: dict[str, int] = {}
    to_answer = [r for r in requirements if r.kind == "obligation"]  # factors and limits get no response
    asked = dict(zip((r.id for r in to_answer), embedder.embed([r.text for r in to_answer]), strict=True))
    for i, req in enumerate(requirements):
        if req.kind != "obligation":
            continue
        if progress:
            progress(req.id, i, len(requirements))
        hits = [
            h
            for coll in (collections or [None])
            for h in rag.search(store, embedder, req.text, k=8, collection=coll, vector=asked[req.id])
            if h.source != rfp_source and (collections or not solicitation(h.doc_id))
        ]
        hits = sorted(hits, key=lambda h: -h.score)[:4]
        result = rag.answer(
            generator,
            f"Write our proposal's response to requirement {req.id}: {req.text}",
            hits,
            model_info,
            n_ctx=n_ctx,
            max_tokens=max_tokens,
            sampling=sampling,
        )

        def renumber(match, used=result.sources):
            n = int(match.group(1))
            if not 1 <= n <= len(used):
                return ""  # a source that was never given: the citation is dropped
            hit = used[n - 1]
            if hit.chunk_id not in sources:
                sources[hit.chunk_id] = {
                    "n": len(sources) + 1,
                    "chunk_id": hit.chunk_id,
                    "doc_id": hit.doc_id,
                    "source": hit.source,
                    "position": hit.position,
                    "doc_sha256": hit.doc_sha256,
                }
            return f"[{sources[hit.chunk_id]['n']}]"

        # model output is text: no control characters (they would break the DOCX too)
        response, flagged = flag_unknown_codes(
            clean_text(CITATION_RE.sub(renumber, result.answer)).strip(), known
        )
        unknown += [c for c in flagged if c not in unknown]
        if req.word_limit:
            response, cut = within(response, req.word_limit)
            if cut:
                trimmed[req.id] = cut
        responses[req.id] = response
        if not response:
            gaps.append(req.id)
        else:
            plain = CITATION_RE.sub(" ", response)
            why = weakness(
                response,
                req,
                responses,
                unsupported=result.unsupported,
                relevance=float(embedder.embed([plain])[0] @ asked[req.id]),
            )
            if why:
                weak[req.id] = why
    if progress:
        progress("", len(requirements), len(requirements))
    result = Draft(
        rfp=rfp_source,
        title=title,
        requirements=requirements,
        responses=responses,
        staffing=staffing,
        plan=tasks,
        tables=sorted({r["source"] for r in rows}),
        sources=list(sources.values()),
        unknown_codes=unknown,
        gaps=gaps,
        needs_writing=weak,
        page_limits=shredded.page_limits,
        format=shredded.format,
        trimmed=trimmed,
        timing={"seconds": round(time.perf_counter() - start, 1)},
    )
    result.markdown = assemble(result)
    return result


_WORD_RE = re.compile(r"[a-z0-9][a-z0-9'-]*")
# A response whose words are mostly its requirement's restates it. On the demo model's draft of
# bench/shred/tuned/rfp01 (66 responses), the ones that copied their requirement kept 0.7-1.0 of their
# content words from it; responses that brought a past proposal's evidence kept under 0.5.
RESTATES = 0.65
REPEATS = 0.8  # share of content words two responses have in common (Jaccard) for one to repeat the other
# Cosine (all-MiniLM-L6-v2) between a response and its requirement below which it answers something
# else: on that draft, "The Program Manager is the single point of contact ..." under a deliverable
# scored 0.17, a labor category's code under a transition task 0.19-0.38; no response that addressed its
# requirement scored under 0.45.
ON_TOPIC = 0.35
MIN_WORDS = 40  # a response is a paragraph (the issue asks 80-250 words); one sentence is a start, not one


def _content(text: str) -> set[str]:
    return {
        w for w in _WORD_RE.findall(CITATION_RE.sub(" ", text.lower())) if w not in STOP_WORDS and len(w) > 2
    }


def weakness(
    response: str,
    req: Requirement,
    earlier: dict[str, str],
    *,
    unsupported: list[str] | None = None,
    relevance: float | None = None,
) -> str | None:
    """Why a drafted response is not yet a response (None when none of these is wrong with it): it
    cites no source, restates its requirement, repeats another response, speaks in the RFP's voice
    ("the Contractor shall") or for the Government, holds figures or names no source it was shown
    holds (`unsupported`), answers something else (`relevance`, cosine to the requirement), or is too
    short to be a paragraph."""
    words = _content(response)
    if not CITATION_RE.search(response):
        return "cites no source"
    if not words or len(words & _content(req.text)) / len(words) >= RESTATES:
        return "restates the requirement"
    for other, text in earlier.items():
        theirs = _content(text)
        if other != req.id and theirs and len(words & theirs) / len(words | theirs) >= REPEATS:
            return f"repeats the response to {other}"
    if obligation(response) == "theirs" and not SELLER_VOICE.search(response):
        return "speaks for the Government, not for us"
    if BUYER_VOICE.search(response):
        return "in the RFP's voice, not ours"
    if unsupported:
        return f"holds what no source shows: {', '.join(unsupported[:3])}"
    if relevance is not None and relevance < ON_TOPIC:
        return "answers something else"
    count = len(CITATION_RE.sub(" ", response).split())
    if count < min(MIN_WORDS, req.word_limit or MIN_WORDS):
        return f"too short for a response ({count} words)"
    return None


def _status(d: Draft, r: Requirement) -> str:
    if r.kind == "evaluation":
        return "Evaluation factor"
    if r.kind == "format":
        return "Format: comply"
    if r.id in d.gaps:
        return "GAP"
    if r.id in d.needs_writing:
        return f"Needs writing ({d.needs_writing[r.id]})"
    return "Drafted"


def _volumes(d: Draft) -> dict[str, str]:
    """Volume names from the RFP's page limits, by subject: technical, past performance, price ..."""
    found: dict[str, str] = {}
    for name in d.page_limits:
        for subject in ("past performance", "price", "cost", "management", "technical"):
            if subject in name.lower():
                found.setdefault(subject, name)
    return found


def within(text: str, limit: int) -> tuple[str, int]:
    """`text` cut to at most `limit` words (citations do not count), at the end of the last sentence
    that fits (mid-sentence only when not even the first fits), its line breaks kept; and how many
    words were cut."""
    words = [m for m in re.finditer(r"\S+", text) if not CITATION_RE.fullmatch(m.group(0))]
    if len(words) <= limit:
        return text, 0
    end = 0
    for sentence in re.finditer(r".+?(?:[.!?](?:\s*\[\d{1,3}\])*(?=\s|$)|$)", text, re.DOTALL):
        if sum(1 for w in words if w.end() <= sentence.end()) > limit:
            break
        end = sentence.end()
    if not end:
        end = words[limit - 1].end()
    kept = text[:end].rstrip()
    return kept, len(words) - sum(1 for w in words if w.end() <= end)


WORDS_PER_PAGE_12PT = 500  # single-spaced 12-point text on a letter page with one-inch margins


def estimate_pages(d: Draft) -> dict[str, float]:
    """Pages each volume's drafted responses fill, at the RFP's font size and margins."""
    size = float(d.format.get("size_pt") or 12)
    margins = float(d.format.get("margins_in") or 1.0)
    area = (8.5 - 2 * margins) * (11 - 2 * margins) / (6.5 * 9)
    per_page = WORDS_PER_PAGE_12PT * (12 / size) ** 2 * area
    volumes, pages = _volumes(d), {}
    for r in d.to_answer:
        where = _location(d, r, volumes)
        volume = where.rsplit(", ", 1)[0] if where != "-" else None
        if volume:
            pages[volume] = pages.get(volume, 0.0) + len(d.responses.get(r.id, "").split()) / per_page
    return {v: round(p, 1) for v, p in pages.items()}


def _location(d: Draft, r: Requirement, volumes: dict[str, str]) -> str:
    if r.kind != "obligation" or r.id in d.gaps:
        return "-"
    lower = r.text.lower()
    subject = next(
        (s for s in ("past performance", "price", "cost", "management") if s in lower and s in volumes),
        "technical",
    )
    return f"{volumes.get(subject, 'Technical volume')}, {r.id}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def assemble(d: Draft) -> str:
    out = [
        f"# Proposal draft: {d.title}",
        "",
        f"Response to `{Path(d.rfp).name}`. Drafted {time.strftime('%Y-%m-%d')} by the appliance from past "
        "proposals and the reference tables; every statement must be reviewed before submission.",
        "",
    ]
    review = (
        ([f"codes not in the reference table: {', '.join(d.unknown_codes)}"] if d.unknown_codes else [])
        + ([f"requirements without a response: {', '.join(d.gaps)}"] if d.gaps else [])
        + ([f"responses that need writing: {', '.join(d.needs_writing)}"] if d.needs_writing else [])
    )
    estimated = estimate_pages(d)
    over = [v for v, limit in d.page_limits.items() if estimated.get(v, 0) > limit]
    review += [f"over its page limit: {v}" for v in over]
    if review:
        out += ["> **Review first:** " + "; ".join(review), ""]
    if d.page_limits or d.format or d.trimmed:
        out += ["## Limits and format", ""]
        if d.format:
            out += [
                "Section L asks for: "
                + ", ".join(
                    part
                    for part in (
                        d.format.get("font"),
                        f"{d.format['size_pt']:g} point" if d.format.get("size_pt") else "",
                        f"{d.format['margins_in']:g}-inch margins" if d.format.get("margins_in") else "",
                    )
                    if part
                )
                + " (the DOCX is written so).",
                "",
            ]
        if d.page_limits:
            out += ["| Volume | Page limit | Drafted so far (estimated pages) |", "| --- | --- | --- |"]
            out += [f"| {_cell(v)} | {n} | {estimated.get(v, 0):g} |" for v, n in d.page_limits.items()]
            out += [""]
        if d.trimmed:
            out += [
                "Cut to the RFP's word limits: "
                + "; ".join(f"{rid} ({words} words cut)" for rid, words in d.trimmed.items())
                + ".",
                "",
            ]
    volumes = _volumes(d)
    out += [
        "## Compliance matrix",
        "",
        "| ID | Section | Page | Requirement | Evaluated under | Response location | Status |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in d.requirements:
        rid = f"{r.id}\u2020" if r.derived else r.id
        out.append(
            f"| {rid} | {r.section or '-'} | {r.page or '-'} | {_cell(r.text)} | "
            f"{', '.join(r.evaluated_under) or '-'} | {_location(d, r, volumes)} | {_status(d, r)} |"
        )
    if any(r.derived for r in d.requirements):
        out += [
            "",
            "\u2020 The RFP does not number this requirement: its ID is its section and its order there.",
        ]
    out += ["", "## Technical approach", ""]
    for r in d.to_answer:
        response = d.responses.get(r.id) or "**GAP: no response drafted.**"
        if r.id in d.needs_writing:
            response = f"**NEEDS WRITING ({d.needs_writing[r.id]}).** {response}"
        out += [f"### {r.id}", "", f"*Requirement:* {r.text}", "", response, ""]
    out += [
        "## Staffing",
        "",
    ]
    if d.tables:
        out += ["From " + ", ".join(f"`{Path(t).name}`" for t in d.tables) + ".", ""]
    else:
        out += [
            "No reference table among the collections the draft drew on: nobody is staffed. Name the "
            "labor-category table's collection (for example `-c reference`).",
            "",
        ]
    out += [
        "| Role in the RFP | Labor category | Code | Minimum education | Years | Certifications | Key | Matched by |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    out += [
        f"| {_cell(s.name)} | {_cell(s.title)} | {_cell(s.code)} | {_cell(s.education)} | {_cell(s.years)} | "
        f"{_cell(s.certification)} | "
        f"{'key' if s.key else ''} | {s.how + ' (review)' if s.review else s.how} |"
        for s in d.staffing
    ]
    if d.plan:
        out += [
            "",
            "### Staffing plan by task",
            "",
            "| Task | Labor categories | Matched by |",
            "| --- | --- | --- |",
        ]
        out += [
            f"| {_cell(t.heading if t.heading.startswith(t.task) else f'{t.task} {t.heading}'.strip())} | "
            + "; ".join(_cell(f"{r.title} ({r.code})") for r in t.roles)
            + " | "
            + "; ".join(r.how + (" (review)" if r.review else "") for r in t.roles)
            + " |"
            for t in d.plan
        ]
    out += ["", "## Sources", ""]
    out += [
        f"[{s['n']}] {Path(s['source']).name}, chunk {s['position']} (sha256 {s['doc_sha256'][:12]})"
        for s in d.sources
    ]
    return "\n".join(out) + "\n"


def write_docx(markdown: str, path: Path, fmt: dict | None = None) -> None:
    """The Markdown draft as a Word document: headings, paragraphs and tables, in the font, size and
    margins section L asks for (`fmt`), the compliance matrix a section of its own."""
    import docx
    from docx.enum.section import WD_SECTION
    from docx.shared import Inches, Pt

    fmt = fmt or {}
    document = docx.Document()
    normal = document.styles["Normal"]
    if fmt.get("font"):
        normal.font.name = fmt["font"]
    if fmt.get("size_pt"):
        normal.font.size = Pt(float(fmt["size_pt"]))
    if fmt.get("margins_in"):
        for section in document.sections:
            section.left_margin = section.right_margin = Inches(float(fmt["margins_in"]))
            section.top_margin = section.bottom_margin = Inches(float(fmt["margins_in"]))
    lines = markdown.splitlines()
    matrix_open = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [
                    c.strip().replace("\\|", "|")
                    for c in re.split(r"(?<!\\) \| ", lines[i].strip().strip("|"))
                ]
                if not all(set(c) <= {"-", " "} for c in cells):
                    rows.append(cells)
                i += 1
            table = document.add_table(rows=len(rows), cols=len(rows[0]))
            table.style = "Table Grid"
            for r, cells in enumerate(rows):
                for c, value in enumerate(cells[: len(rows[0])]):
                    table.cell(r, c).text = value
            continue
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            if line == "## Compliance matrix" or (level == 2 and matrix_open):
                document.add_section(WD_SECTION.NEW_PAGE)  # the matrix on pages of its own (same margins)
                matrix_open = line == "## Compliance matrix"
            document.add_heading(line.lstrip("#").strip(), level=min(level, 3))
        elif line.strip():
            document.add_paragraph(line.replace("**", "").replace("*", "").lstrip("> "))
        i += 1
    document.save(path)
