"""Shredding an RFP: every statement the offeror must answer or comply with, as compliance-matrix rows.

`shred(document)` reads the RFP's text as a reviewer does. It keeps track of the Uniform Contract
Format section a statement sits in (B ... M, or a Performance Work Statement attached in J), the
heading over it and the page it begins on. It keeps each requirement whole, with its identifier in the
RFP's own style: C.4.2, 5.3.1, PWS 3.2, Task 4, L.5.2, M.2.1.1, Factor 1, PRS-2 and A003 from table
rows. Lettered items and bullets are their parent's identifier plus (a), (b) ... by position. A
requirement the RFP does not number gets a derived identifier, its section and ordinal ("C.u2"),
marked `derived`.

What counts:
- an obligation of the contractor or offeror ("shall", "must", "is required to", "is responsible
  for", and "will" where the contractor or offeror is its subject), never the Government's ("The COR
  shall review ...", "The Government will provide ...");
- the evaluation factors and subfactors of section M (kind "evaluation"), linked to the requirements
  whose sections or tasks they name (`evaluated_under`);
- the rows of a page-limit table (kind "format").

Every parse here is linear in the text: one pass over its lines, regular expressions without nested
repetition, and a bound on the rows kept (MAX_REQUIREMENTS).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from appliance.documents.readers import Document
from appliance.schemas import Requirement

MAX_REQUIREMENTS = 5_000  # a long RFP has a few hundred
UCF_LETTERS = "ABCDEFGHIJKLM"

# A page footer in text that lost its page breaks: "Page 3 of 12", "Page 3", "- 3 -".
_FOOTER_RE = re.compile(r"^\s*(?:page\s+(\d{1,4})(?:\s+of\s+\d{1,4})?|-\s*(\d{1,4})\s*-)\s*$", re.IGNORECASE)
_SECTION_RE = re.compile(
    r"^(?:#{1,6} ?)?(?:part\s+[ivx]{1,5}(?:\s*[-:\u2013\u2014])? ?)?section\s+([A-M])\b[\s.:\u2013\u2014-]{0,8}(.*)$",
    re.IGNORECASE,
)
_ATTACHMENT_RE = re.compile(r"^(?:#{1,6}\s*)?(?:attachment|exhibit)\s+(?:J[-.\s]?)?\w+\b", re.IGNORECASE)
_HEADING_RE = re.compile(r"^#{1,6}\s+(.*)$")
# An identifier at the start of a paragraph: C.4.2, L.5, 5.3.1, 3., PWS 3.2, Task 4, Factor 1 ...
_ID_RE = re.compile(
    r"^(?P<id>"
    r"[A-M][.-]\d{1,3}(?:\.\d{1,3}){0,5}"
    r"|(?:PWS|SOW|SOO|Task|Subtask|Factor|Sub-?factor|Article|Element)\s+(?:\d{1,3}(?:\.\d{1,3}){0,5}|[A-Z]\b)"
    r"|\d{1,3}(?:\.\d{1,3}){1,5}"
    r"|\d{1,3}(?=\.\s)"
    r")(?:[.:),]|\s+[-\u2013\u2014])?\s+(?P<rest>[A-Z(\d\"\u201c].*)$",  # a capital: not a wrapped line of prose
    re.DOTALL,
)
_ITEM_RE = re.compile(
    r"^(?:\((?P<a>[a-z]{1,2}|[ivx]{1,5}|\d{1,2})\)|(?P<b>[a-z])[.)])\s+(?P<rest>\S.*)$", re.DOTALL
)
_BULLET_RE = re.compile(r"^[-*\u2022\u25aa\u25e6\u2023\u2043\u00b7o]\s+(?P<rest>\S.*)$", re.DOTALL)
# The identifier in a table row's first cell: PRS-2, PR-01, A003, CDRL A003, KP-1.
_ROW_ID_RE = re.compile(
    r"^(?:CDRL\s+)?(?P<id>[A-Z]{1,5}-?\d{1,4}(?:\.\d{1,3})?)(?![\d.])(?P<rest>(?:\s*(?:\|\s*)?[A-Z0-9(\"\u201c].*)?)$",
    re.DOTALL,
)
# A paragraph's inline title: a few capitalised words and a period before its first sentence.
_INLINE_TITLE_RE = re.compile(
    r"^((?:[A-Z][\w/&'-]*|and|of|for|the|to|in|or)(?:\s+(?:[A-Z][\w/&'-]*|and|of|for|the|to|in|or)){0,7})[.:]\s+\S"
)
_CELL_ID_RE = re.compile(
    r"^(?P<id>[A-M][.-]\d{1,3}(?:\.\d{1,3}){0,5}|\d{1,3}(?:\.\d{1,3}){1,5})(?P<rest>\.?)$"
)
_TABLE_SEPARATOR_RE = re.compile(r"^\|?\s*:?-{3,}:?\s*(?:\|\s*:?-{3,}:?\s*)*\|?\s*$")

_MODAL_RE = re.compile(
    r"\b(?:shall|must|will|is required to|are required to|is responsible for|are responsible for|agrees? to)\b",
    re.IGNORECASE,
)
_STRONG_RE = re.compile(r"\b(?:shall|must|required to|responsible for|agrees? to)\b", re.IGNORECASE)
_CONTRACTOR_RE = re.compile(
    r"\b(?:contractors?|offerors?|vendors?|quoters?|bidders?|contractor's|offeror's)\b", re.IGNORECASE
)
_ACRONYM_DEFINED_RE = re.compile(r"\(([A-Z]{2,8})\)")
_ORG_WORD_RE = re.compile(
    r"\b(?:Administration|Agency|Department|Office|Service|Bureau|Commission|Command|Center|Institute|"
    r"Program|Division|Directorate|Authority|Board|Council|Corps|Force|Army|Navy|Guard)\b"
)
_OURS_RE = re.compile(
    r"\b(?:contractors?|offerors?|vendors?|quoters?|bidders?|proposals?|quotes?|quotations?|responses?|"
    r"key personnel|personnel|staff|employees|you|your|prime|subcontractors?|team)\b|\bcontractor's|\bofferor's",
    re.IGNORECASE,
)
_THEIRS_RE = re.compile(
    r"\b(?:government|cor|co|contracting officer|contracting officer's representative|ko|agency|department|"
    r"administration|program office|security office|technical monitor|tpoc|source selection|evaluators?|"
    r"evaluation board|panel|ssa|ssp|ssec|tep)\b",
    re.IGNORECASE,
)
_ACRONYM_SUBJECT_RE = re.compile(r"^(?:the\s+)?[A-Z]{2,8}$")
_CLAUSE_BREAK_RE = re.compile(
    r"[,;:(]|\b(?:that|which|who|if|when|unless|and|or|but|where|after|before)\b", re.IGNORECASE
)
_SENTENCE_RE = re.compile(r"(?<=[.;!?])\s+(?=[A-Z(])")
_EVALUATE_RE = re.compile(r"\b(?:evaluat\w*|assess\w*|rated?|consider\w*)\b", re.IGNORECASE)
_AWARD_PROSE_RE = re.compile(
    r"\b(?:basis (?:for|of) award|best value|trade-?off|relative importance|more important than|"
    r"equal(?:ly)? important|lowest price|responsib(?:le|ility) determination)\b",
    re.IGNORECASE,
)
_FACTOR_LEAD_IN_RE = re.compile(
    r"\b(?:following|below|listed)\s+(?:evaluation\s+)?(?:sub)?factors\b|\b(?:sub)?factors\s+(?:below|listed|that follow)\b",
    re.IGNORECASE,
)
_FACTOR_ID_RE = re.compile(r"^(?:sub-?)?factor\b", re.IGNORECASE)
# A passive whose agent is the Government: "shall be provided by the Government", "will be issued by the COR".
_BY_THEM_RE = re.compile(
    r"^\s+(?:not\s+)?be\s+(?:\w+\s+){0,3}?by\s+(?:the\s+)?(?:government|cor|contracting officer|agency)\b",
    re.IGNORECASE,
)
_VOLUME_RE = re.compile(r"^Volume\s+(?:[IVX]{1,4}|\d{1,2})\b")
_KEY_PERSONNEL_RE = re.compile(r"^key personnel\s*[:\-\u2013]", re.IGNORECASE)
_PAGE_LIMIT_HEADER_RE = re.compile(r"\bpages?\b", re.IGNORECASE)
# A reference to part of the RFP inside a factor's text: "Section C.4", "PWS 5.3", "Task 2", "L.5.2".
_REFERENCE_RE = re.compile(
    r"\b(?:section\s+(?P<section>[A-M])(?:\.(?P<sub>\d{1,3}(?:\.\d{1,3})*))?\b"
    r"|(?P<dotted>[A-M][.-]\d{1,3}(?:\.\d{1,3})*)"
    r"|(?P<named>(?:PWS|SOW|Task|Subtask|paragraph)\s+\d{1,3}(?:\.\d{1,3})*))",
    re.IGNORECASE,
)


@dataclass
class _Unit:
    """A paragraph, list item, heading or table row of the RFP, with where its text begins."""

    text: str
    offset: int
    table: bool = False
    heading: bool = False  # a section line or a Markdown heading: one line, nothing continues it
    lines: int = 1
    marked: bool = False  # it starts with an identifier, a list marker, a row's ID ...: not a bare heading
    words: int = 0
    more: list[str] = field(default_factory=list)  # its further lines, joined once at the end (not per line)


@dataclass
class _Parent:
    id: str
    ours: bool  # its text is an obligation of ours (or a section L instruction): its items are too
    items: int = 0


@dataclass
class Shredded:
    requirements: list[Requirement]
    page_limits: dict[str, int] = field(default_factory=dict)  # volume -> pages, as section L states them
    format: dict = field(default_factory=dict)  # font, size_pt, margins_in: what section L asks for


_WORD_LIMIT_RE = re.compile(
    r"(?:not\s+(?:to\s+)?exceed|no\s+more\s+than|(?:limited|limit)\s+to|maximum\s+of|at\s+most|up\s+to)"
    r"\s+(?:\w+\s+)?\(?(\d{1,2},?\d{3}|\d{1,4})\)?\s+words"
    r"|(\d{1,2},?\d{3}|\d{1,4})[- ]word\s+(?:limit|maximum)",
    re.IGNORECASE,
)
_PROSE_PAGE_LIMIT_RE = re.compile(
    r"(Volume\s+(?:[IVX]{1,4}|\d{1,2})\b)[^.]{0,120}?"
    r"(?:not\s+(?:to\s+)?exceed|no\s+more\s+than|(?:limited|limit)\s+to|maximum\s+of)\s+(\d{1,3})\s+pages",
    re.IGNORECASE,
)
_FONTS = (
    "Times New Roman|Arial|Calibri|Helvetica|Garamond|Cambria|Courier New|Verdana|Georgia|Book Antiqua|"
    "Century Schoolbook|Tahoma"
)
_SIZE = r"(\d{1,2}(?:\.5)?)[- ]?(?:point|pt)\b"
_FONT_RE = re.compile(rf"\b({_FONTS})\b[^.;]{{0,40}}?\b{_SIZE}", re.IGNORECASE)  # "Arial, 11-point"
_SIZE_FIRST_RE = re.compile(rf"\b{_SIZE}\s+({_FONTS})\b", re.IGNORECASE)  # "11-point Arial"
_MARGIN_RE = re.compile(
    r"margins?\s+(?:shall\s+be\s+|must\s+be\s+|of\s+)?(?:at\s+least\s+|no\s+less\s+than\s+|a\s+minimum\s+of\s+)?"
    r"(one|1(?:\.0|\.25|\.5)?|0?\.75|three-quarters?\s+of\s+an?)[- ]inch"
    r"|(one|1(?:\.0|\.25|\.5)?|0?\.75)[- ]inch\s+margins?",
    re.IGNORECASE,
)


def _number(text: str) -> float:
    return 1.0 if text.lower() == "one" else 0.75 if text.lower().startswith("three") else float(text)


def limits(requirements: list[Requirement], text: str) -> tuple[dict[str, int], dict]:
    """Page limits per volume (a page-limit table's rows, or prose such as "Volume II shall not exceed
    8 pages") and the format section L asks for; each requirement's own word limit is set on it."""
    for req in requirements:
        m = _WORD_LIMIT_RE.search(req.text)
        if m:
            req.word_limit = int((m.group(1) or m.group(2)).replace(",", ""))
    pages: dict[str, int] = {}
    for req in requirements:
        if req.kind == "format":
            cells = [c.strip() for c in req.text.split(" | ")]
            number = re.search(r"(\d{1,3})\s*(?:pages?)?\s*$", cells[-1])
            if number:
                name = re.sub(r"\s*\d{1,3}\s*(?:pages?)?\s*$", "", cells[0]) if len(cells) == 1 else cells[0]
                name = " ".join(name.split(",")[0].split())  # "Volume 1 - Technical, including ..."
                pages.setdefault(name.strip(" -|"), int(number.group(1)))
        elif req.section == "L":
            for m in _PROSE_PAGE_LIMIT_RE.finditer(req.text):
                pages.setdefault(" ".join(m.group(1).split()), int(m.group(2)))
    instructions = " ".join(r.text for r in requirements if r.section == "L") or text[:200_000]
    fmt: dict = {}
    font = _FONT_RE.search(instructions)
    size_first = _SIZE_FIRST_RE.search(instructions)
    if font:
        fmt.update(font=font.group(1), size_pt=float(font.group(2)))
    elif size_first:
        fmt.update(font=size_first.group(2), size_pt=float(size_first.group(1)))
    margin = _MARGIN_RE.search(instructions)
    if margin:
        fmt["margins_in"] = _number(margin.group(1) or margin.group(2))
    return pages, fmt


def _units(text: str) -> list[_Unit]:
    """Paragraphs as a reviewer sees them: a blank line ends one, and so does a line that starts
    with an identifier, a list marker, a heading or a table row (PDF text has line breaks, not
    blank lines, between paragraphs). Page footers are kept as units of their own."""
    units: list[_Unit] = []
    current: _Unit | None = None
    offset = 0
    lines = text.split("\n")
    lengths = sorted(len(x.strip()) for x in lines if len(x.strip()) >= 20)
    width = lengths[int(len(lengths) * 0.9)] if lengths else 0  # a full line of wrapped text
    previous = ""
    for line in lines:
        start, stripped = offset, line.strip()
        offset += len(line) + 1
        # "... within ten\n(10) business days": a number restated in figures, not an item "(10)"
        restated = bool(_FIGURES_RE.match(stripped) and _NUMBER_WORD_RE.search(previous[-20:]))
        ended, previous = _ends_paragraph(previous, stripped, width, current), stripped
        if not stripped:
            current = None
            continue
        first = start + len(line) - len(line.lstrip())
        table = stripped.startswith("|") or (" | " in stripped and not stripped.startswith("#"))
        head = stripped[:400]  # what starts a paragraph is at its start: no pattern reads a whole line
        starts = (
            table
            or _FOOTER_RE.match(head)
            or _HEADING_RE.match(head)
            or _SECTION_RE.match(head)
            or _ATTACHMENT_RE.match(head)
            or _ID_RE.match(head)
            or (_ITEM_RE.match(head) and not restated)
            or _BULLET_RE.match(head)
            or _ROW_ID_RE.match(head)
            or _KEY_PERSONNEL_RE.match(head)
            or _VOLUME_RE.match(head)
        )
        if current is None or starts or ended or current.table or current.heading:
            heading = bool(_SECTION_RE.match(head) or _HEADING_RE.match(head))
            current = _Unit(
                stripped,
                first,
                table=bool(table),
                heading=heading,
                marked=bool(starts),
                words=len(stripped.split()),
            )
            units.append(current)
        else:
            current.more.append(stripped)
            current.lines += 1
            current.words += len(stripped.split())
    for unit in units:
        if unit.more:
            unit.text = " ".join([unit.text, *unit.more])
            unit.more = []
    return units


_FIGURES_RE = re.compile(r"^\(\d{1,3}\)")
_NUMBER_WORD_RE = re.compile(
    r"\b(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty|forty|"
    r"sixty|ninety|hundred)$",
    re.IGNORECASE,
)
_FUNCTION_WORD_RE = re.compile(
    r"\b(?:of|the|and|or|to|for|in|with|a|an|on|by|including|at|from|as)$", re.IGNORECASE
)


def _ends_paragraph(previous: str, line: str, width: int, current: _Unit | None) -> bool:
    """Whether `line` starts a paragraph though nothing marks it, as in PDF text, where paragraphs
    are line breaks apart like the lines inside them: the line before ended a sentence short of the
    full width, or was a lone short line (a heading) that ends on no function word."""
    if not previous or not line or current is None or not (line[0].isupper() or line[0].isdigit()):
        return False
    if current.words < 2:
        return False  # "PRS-1" on a line of its own: a table row's identifier, its cells follow
    short = len(previous) < 0.75 * width
    if short and previous[-1] in ".:;?!":
        return True
    return (
        short
        and current.lines == 1
        and not current.marked
        and len(previous.split()) <= 12
        and not _FUNCTION_WORD_RE.search(previous)
        and previous[-1] not in ",-"
    )


def _cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def _subject(sentence: str, modal: re.Match) -> str:
    """The words a modal verb binds: from the last clause break before it."""
    before = sentence[max(0, modal.start() - 200) : modal.start()]  # a subject is a few words: a window
    breaks = list(_CLAUSE_BREAK_RE.finditer(before))
    if not breaks:
        return " ".join(before.split()[-8:])
    subject = before[breaks[-1].end() :].split()
    if not subject and breaks[-1].group(0).lower() in ("that", "which", "who"):
        subject = before[: breaks[-1].start()].split()  # "the VA employee who is responsible for ..."
    return " ".join(subject[-8:])


def agencies(text: str) -> frozenset[str]:
    """The acronyms the RFP defines for Government bodies: "Federal Motor Carrier Safety
    Administration (FMCSA)" -> FMCSA; with them, "FMCSA will review ..." is the Government's."""
    text = text[:2_000_000]
    return frozenset(  # the name is the few words before the parenthesis: looked at there, nowhere else
        m.group(1)
        for m in _ACRONYM_DEFINED_RE.finditer(text)
        if _ORG_WORD_RE.search(text[max(0, m.start() - 80) : m.start()])
    )


def obligation(text: str, bodies: frozenset[str] = frozenset()) -> str | None:
    """ "ours" when the text states an obligation of the contractor or offeror, "theirs" when its only
    obligations are the Government's (or those of `bodies`, its agencies' acronyms), None when it
    states none."""
    found = None
    for sentence in _SENTENCE_RE.split(text):
        for modal in _MODAL_RE.finditer(sentence):
            subject = _subject(sentence, modal)
            after = sentence[modal.end() : modal.end() + 120].lower()
            word = modal.group(0).lower()
            by_them = bool(_BY_THEM_RE.match(after))  # "... will be issued by the Government"
            if word == "will" and re.match(r"\s+be\s+(?!responsible for|required to)", after):
                found = "theirs" if by_them else found  # "will be measured": nobody's duty
                continue
            strong = word != "will"
            if _CONTRACTOR_RE.search(subject):
                return "ours"
            if (
                _THEIRS_RE.search(subject)
                or _ACRONYM_SUBJECT_RE.match(subject.strip())
                or any(w in bodies for w in re.findall(r"[A-Z]{2,8}", subject))
                or by_them
            ):
                found = "theirs"
            elif _OURS_RE.search(subject) or strong:  # "All staff must ...", "Reports shall be delivered ..."
                return "ours"
    return found


def _section_of(identifier: str) -> str | None:
    return identifier[0] if re.match(r"^[A-M][.-]\d", identifier) else None


def shred(doc: Document) -> Shredded:
    """The RFP's requirement rows, in order (see the module's docstring for what counts)."""
    requirements: list[Requirement] = []
    section, heading = "", ""
    page_from_footer: int | None = None  # text without page breaks: the page after the last footer
    parent: _Parent | None = None
    item_parent: _Parent | None = None  # a lettered item: the parent of its own sub-items
    table_header: list[str] | None = None
    derived: dict[str, int] = {}
    used: set[str] = set()

    def page(offset: int) -> int | None:
        return doc.page_at(offset) if doc.pages else page_from_footer

    def add(unit: _Unit, rid: str | None, text: str, kind: str = "obligation") -> Requirement | None:
        if len(requirements) >= MAX_REQUIREMENTS:
            return None
        is_derived = rid is None
        if rid is None:
            letter = section or "X"
            derived[letter] = derived.get(letter, 0) + 1
            rid = f"{letter}.u{derived[letter]}"
        if rid in used:  # "1." in section C and again in L: each row keeps an ID of its own
            n = 2
            while f"{rid} ({n})" in used:
                n += 1
            rid = f"{rid} ({n})"
        used.add(rid)
        req = Requirement(
            id=rid,
            text=text,
            section=section,
            heading=heading,
            page=page(unit.offset),
            kind=kind,
            derived=is_derived,
        )
        requirements.append(req)
        return req

    bodies = agencies(doc.text)

    def ours(text: str) -> bool:
        return obligation(text, bodies) == "ours"

    leads: dict[str, bool] = {}  # numbered lead-ins of ours ("... the Contractor shall:"), by ID
    units = _units(doc.text)
    if not doc.pages and any(_FOOTER_RE.match(u.text) for u in units):
        page_from_footer = 1
    for unit in units:
        text = unit.text
        footer = _FOOTER_RE.match(text)
        if footer:
            if not doc.pages:
                page_from_footer = int(footer.group(1) or footer.group(2)) + 1
            continue
        if unit.table:
            cells = _cells(text)
            if _TABLE_SEPARATOR_RE.match(text):
                continue
            if table_header is None:
                table_header = cells
                continue
            _table_row(cells, table_header, unit, section, add, ours)
            continue
        table_header = None
        sect = _SECTION_RE.match(text)
        if sect:
            section = sect.group(1).upper()
            heading, parent, item_parent = text.lstrip("# ").strip(), None, None
            continue
        if _ATTACHMENT_RE.match(text) and len(text) < 120 and not _MODAL_RE.search(text):  # a heading
            section, heading, parent, item_parent = "J", text.lstrip("# ").strip(), None, None
            continue
        head = _HEADING_RE.match(text)
        if head:
            heading = head.group(1).strip()
            inner = _ID_RE.match(heading)
            if inner:
                section = _section_of(inner.group("id")) or section
                if ours(inner.group("rest")) and section != "M":
                    parent = _Parent(_clean_id(inner.group("id")), True)
                    add(unit, parent.id, inner.group("rest"))
                    continue
                parent = _Parent(_clean_id(inner.group("id")), False)
            item_parent = None
            continue
        numbered = _ID_RE.match(text)
        letter = _section_of(_clean_id(numbered.group("id"))) if numbered else None
        if numbered and letter and section and letter < section and section not in ("B", "M"):
            # "D-01 Quality Review Plan ..." in section J: a table row's ID (PDF text has no cell
            # borders), not a paragraph of an earlier section: the Uniform Contract Format runs B to M
            rid, rest = _clean_id(numbered.group("id")), numbered.group("rest")
            if _is_row(rest):
                add(unit, rid, rest)
            continue
        if numbered:
            rid, rest = _clean_id(numbered.group("id")), numbered.group("rest")
            section = _section_of(rid) or section
            lead = leads.get(rid.rsplit(".", 1)[0]) if "." in rid else None
            duty = (
                ours(rest)
                or bool(_KEY_PERSONNEL_RE.match(rest))
                # "C.5.2.1 Deliver a Transition-Out Plan ..." under "C.5.2 ... the Contractor shall:"
                or (lead is True and section != "B" and obligation(rest, bodies) != "theirs")
            )
            if duty and rest.rstrip().endswith(":"):
                leads[rid] = True
            if section == "M":
                kind = _evaluation_kind(rid, rest)
                parent, item_parent = _Parent(rid, kind is not None), None
                if kind:
                    add(unit, rid, rest, kind)
                elif len(rest) < 90 and not rest.rstrip().endswith("."):
                    heading = f"{rid} {rest}"
                continue
            parent, item_parent = _Parent(rid, duty), None
            title = _INLINE_TITLE_RE.match(rest)
            if title:
                heading = f"{rid} {title.group(1)}"  # "C.4.2 Database Support. The Contractor shall ..."
            elif len(rest) < 90 and not rest.endswith(".") and not _MODAL_RE.search(rest):
                heading = f"{rid} {rest}"  # "C.4 TASK AREAS"
            if duty:
                add(unit, rid, rest)
            continue
        item = _ITEM_RE.match(text)
        bullet = _BULLET_RE.match(text) if not item else None
        if item or bullet:
            rest = (item or bullet).group("rest")
            mark = item.group("a") or item.group("b") if item else None
            sub = mark is not None and (mark.isdigit() or (re.fullmatch(r"[ivx]+", mark) and mark != "i"))
            owner = item_parent if sub and item_parent else parent
            if owner is None:
                if ours(rest):
                    add(unit, None, rest)
                continue
            owner.items += 1
            rid = f"{owner.id}({mark if mark else _letter(owner.items)})"
            theirs = obligation(rest, bodies) == "theirs"
            if section == "M":
                if _evaluation_kind(rid, rest):
                    add(unit, rid, rest, "evaluation")
                continue
            if (owner.ours and not theirs) or ours(rest):
                add(unit, rid, rest)
            if not sub:
                item_parent = _Parent(rid, owner.ours and not theirs)
            continue
        row = _ROW_ID_RE.match(text)
        if row and section not in ("B", "M") and _is_row(row.group("rest")):
            add(unit, row.group("id"), row.group("rest").strip(" |:-\u2013"))
            continue
        if _KEY_PERSONNEL_RE.match(text):
            add(unit, None, text)
            continue
        if (
            _VOLUME_RE.match(text)
            and section == "L"
            and not ours(text)
            and re.search(r"\d\s*(?:pages?)?$", text)
        ):
            add(unit, None, text, "format")  # a page-limit table's row in PDF text: "Volume II - Price 15"
            continue
        if section == "M":
            if _evaluation_kind("", text):
                add(unit, None, text, "evaluation")
            continue
        if ours(text):
            parent, item_parent = None, None
            req = add(unit, None, text)
            if req is not None:
                parent = _Parent(req.id, True)
        elif len(text) < 90 and not text.endswith("."):
            heading = text  # an unmarked heading line of PDF text
    _link_factors(requirements)
    page_limits, fmt = limits(requirements, doc.text)
    return Shredded(requirements, page_limits, fmt)


def _clean_id(identifier: str) -> str:
    return " ".join(identifier.split()).rstrip(".")


def _letter(n: int) -> str:
    return chr(ord("a") + n - 1) if n <= 26 else f"a{n}"


def _is_row(rest: str) -> bool:
    """A table row's text, not a sentence that happens to start with a token like A001."""
    return bool(rest.strip()) and (rest.lstrip().startswith("|") or len(rest.split()) >= 2)


def _evaluation_kind(identifier: str, text: str) -> str | None:
    """ "evaluation" for a factor or subfactor of section M, None for the basis-of-award prose around
    them and for headings."""
    if _FACTOR_ID_RE.match(identifier) or _FACTOR_ID_RE.match(text):
        return "evaluation"
    if _AWARD_PROSE_RE.search(text):
        return None
    if _FACTOR_LEAD_IN_RE.search(text) or (
        re.search(r"\b(?:sub)?factors\b", text, re.IGNORECASE) and not _INLINE_TITLE_RE.match(text)
    ):
        return None  # "The Government will evaluate proposals using the factors below."
    return "evaluation" if _EVALUATE_RE.search(text) and len(text.split()) >= 8 else None


def _table_row(cells: list[str], header: list[str], unit: _Unit, section: str, add, ours) -> None:
    """A table's data row: a requirement when its first cell is an identifier (PRS-2, A003) outside
    sections B and M; a page limit when the table is one."""
    if section in ("B", "M") or not any(cells):
        return
    first = _ROW_ID_RE.match(cells[0]) or _CELL_ID_RE.match(cells[0])
    rest = " | ".join(c for c in cells[1:] if c)
    if first and not first.group("rest").strip(". ") and rest:
        # a standard (PRS-2) or a deliverable (A003, D-01) is a requirement as it stands; a row numbered
        # like a paragraph of its own section (C.3.1 in C, J-1 in J) is one when it states an
        # obligation: not an attachment list
        letter = _section_of(first.group("id"))
        if letter is None or (section and letter < section) or ours(rest):  # D-01 in J: a row ID
            add(unit, first.group("id"), rest)
    elif any(_PAGE_LIMIT_HEADER_RE.search(h) for h in header) and section == "L":
        add(unit, None, " | ".join(c for c in cells if c), "format")


def _references(text: str) -> list[tuple[str, ...]]:
    """The parts of the RFP a factor names, as identifier paths: ("C",), ("C", "4"), ("PWS", "5", "3")."""
    refs = []
    for m in _REFERENCE_RE.finditer(text):
        if m.group("section"):
            refs.append(
                (m.group("section").upper(), *(m.group("sub") or "").split("."))
                if m.group("sub")
                else (m.group("section").upper(),)
            )
        elif m.group("dotted"):
            refs.append((m.group("dotted")[0].upper(), *m.group("dotted")[2:].split(".")))
        else:
            word, number = m.group("named").split(None, 1)
            refs.append((word.upper(), *number.split(".")))
    return refs


def paragraph_id(rid: str) -> str:
    """The paragraph a row's ID names, without its item letters or repeat mark: C.4.2 for C.4.2(a)(1),
    1 for "1 (2)"."""
    return re.sub(r"\s*\(.*$", "", rid)


def _path(req: Requirement) -> tuple[str, ...]:
    base = paragraph_id(req.id)
    if re.match(r"^[A-M][.-]\d", base):
        return (base[0], *base[2:].split("."))
    named = re.match(r"^(PWS|SOW|Task|Subtask)\s+(\S+)", base, re.IGNORECASE)
    if named:
        return (named.group(1).upper(), *named.group(2).split("."))
    if re.match(r"^\d", base):  # PWS numbering: 5.3.1 answers "PWS 5.3" and "paragraph 5.3" too
        return ("#", *base.split("."))
    return (req.section,)


def _matches(ref: tuple[str, ...], path: tuple[str, ...], section: str) -> int:
    """How specific a match a reference is for a requirement's path (0: none)."""
    if ref[0] in ("PWS", "SOW", "TASK", "SUBTASK", "PARAGRAPH") and path[0] in ("#", "PWS", "SOW", "TASK"):
        ref, path = ref[1:], path[1:]
        return len(ref) + 1 if path[: len(ref)] == ref else 0
    if len(ref) == 1 and ref[0] == section:
        return 1
    return len(ref) + 1 if path[: len(ref)] == ref else 0


def _link_factors(requirements: list[Requirement]) -> None:
    """Each requirement's `evaluated_under`: the most specific M factors or subfactors that name its
    section, paragraph or task, or that it names itself ("... evaluated under Factor 2")."""
    factors = [(r.id, _references(r.text)) for r in requirements if r.kind == "evaluation"]
    factor_ids = {r.id.lower(): r.id for r in requirements if r.kind == "evaluation"}
    for req in requirements:
        if req.kind == "evaluation":
            continue
        named = [
            factor_ids[m.group(0).lower()]
            for m in re.finditer(
                r"\b(?:(?:sub-?)?factor\s+\d+(?:\.\d+)*|M\.\d+(?:\.\d+)*)", req.text, re.IGNORECASE
            )
            if m.group(0).lower() in factor_ids
        ]
        if named:
            req.evaluated_under = list(dict.fromkeys(named))
            continue
        path, best, under = _path(req), 0, []
        for fid, refs in factors:
            score = max((_matches(ref, path, req.section) for ref in refs), default=0)
            if score > best:
                best, under = score, [fid]
            elif score and score == best:
                under.append(fid)
        req.evaluated_under = under
