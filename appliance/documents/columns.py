"""The only module that decides which column of a reference table is what: the code, the title, the
duties, the education, the years of experience and the certification of a labor category (or of any
coded list), whatever the table calls them.

A column is found by its header (synonyms, then words it contains: "LCAT Code", "Minimum Education",
"Years of Experience") or, for the code and title, by its content (a column of `NN-NNNN.NN` codes is the
code). An explicit mapping ({"code": "Column A", ...}) wins over both. Ingest, staffing, lookup and the
builder's data preparation all read tables through `detect`, so a table is understood the same way
everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from appliance.errors import IngestError

ROLES = ("code", "title", "duties", "education", "years", "certification")

# Header synonyms, compared after lower-casing and dropping punctuation; then words a header may contain.
_SYNONYMS = {
    "code": (
        "code",
        "soc code",
        "onet code",
        "o net code",
        "onet soc code",
        "lcat code",
        "lcat id",
        "lcat",
        "labor category code",
        "category code",
        "labor code",
        "job code",
        "position code",
    ),
    "title": (
        "title",
        "labor category",
        "labor category title",
        "labor category name",
        "lcat title",
        "lcat name",
        "category",
        "position",
        "position title",
        "job title",
        "role",
        "name",
    ),
    "duties": (
        "duties",
        "description",
        "functional description",
        "job description",
        "responsibilities",
        "summary",
        "scope",
    ),
    "education": ("education", "minimum education", "degree", "education requirement", "min education"),
    "years": (
        "years",
        "years of experience",
        "experience",
        "minimum experience",
        "min years",
        "minimum years",
        "yrs",
    ),
    "certification": ("certification", "certifications", "certs", "required certifications"),
}
_CONTAINS = {  # checked in this order, so "Labor Category Code" is the code, not the title
    "code": ("code", "soc", "onet", "o net"),
    "education": ("educat", "degree"),
    "years": ("years", "experience", "yrs"),
    "certification": ("certif",),
    "duties": ("descr", "duties", "responsib", "function"),
    "title": ("title", "category", "position", "role", "name"),
}
SOC_CODE_RE = re.compile(r"^\d{2}-\d{4}(?:\.\d{2})?$")
# "LC-101", "ENG3": letters and digits; a bare number, amount or date ("1200", "125.00", "2024-01-05") is
# not a code (a SOC code, "15-1252.00", is matched by SOC_CODE_RE)
_CODE_LIKE_RE = re.compile(r"^(?=.*\d)(?=.*[A-Za-z])[A-Za-z0-9][A-Za-z0-9./-]{1,15}$")
_CONTENT_SHARE = 0.6  # of a column's filled cells that must look like codes (or titles)


def _plain(header: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", header.lower()).split())


@dataclass
class Columns:
    """Which column holds each role (None: none does), and how it was found: "mapping", "header" or
    "content"."""

    code: str | None = None
    title: str | None = None
    duties: str | None = None
    education: str | None = None
    years: str | None = None
    certification: str | None = None
    how: dict[str, str] = field(default_factory=dict)

    def get(self, row: dict[str, str], role: str) -> str:
        """The row's value for a role ("" when no column holds it)."""
        column = getattr(self, role)
        return (row.get(column) or "").strip() if column else ""

    def describe(self) -> str:
        """One line a person can check: `code = "LCAT Code" (header), ...`."""
        parts = [
            f'{role} = "{getattr(self, role)}" ({self.how[role]})' for role in ROLES if getattr(self, role)
        ]
        missing = [role for role in ROLES if not getattr(self, role)]
        return ", ".join(parts) + (f"; not found: {', '.join(missing)}" if missing else "")

    def require_key(self, where: str) -> None:
        """Refuse a reference table without a code or a title column, saying how to name them."""
        missing = [role for role in ("code", "title") if not getattr(self, role)]
        if missing:
            raise IngestError(
                f"{where}: no {' or '.join(missing)} column found ({self.describe() or 'no column recognised'})",
                "name the columns (for example 'Code' and 'Labor Category'), or give the mapping "
                "explicitly: code=COLUMN,title=COLUMN",
            )


def _cells(rows: list[dict[str, str]], column: str) -> list[str]:
    return [v.strip() for r in rows if (v := r.get(column) or "").strip()]


def _looks_like_codes(values: list[str]) -> bool:
    if not values:
        return False
    soc = sum(bool(SOC_CODE_RE.match(v)) for v in values)
    like = sum(bool(_CODE_LIKE_RE.match(v)) for v in values)
    return soc >= _CONTENT_SHARE * len(values) or (
        like >= _CONTENT_SHARE * len(values) and len(set(values)) >= 0.9 * len(values)
    )


def _looks_like_titles(values: list[str]) -> bool:
    if not values:
        return False
    short = sum(1 <= len(v.split()) <= 8 and not re.search(r"\d", v) and not v.endswith(".") for v in values)
    return short >= _CONTENT_SHARE * len(values)


def detect(
    columns: list[str], rows: list[dict[str, str]] | None = None, mapping: dict[str, str] | None = None
) -> Columns:
    """The role of each column of a table: `mapping` first ({role: column}, checked against the
    columns), then headers, then (for code and title) the content of `rows`."""
    found = Columns()
    taken: set[str] = set()

    def claim(role: str, column: str, how: str) -> None:
        setattr(found, role, column)
        found.how[role] = how
        taken.add(column)

    for role, column in (mapping or {}).items():
        if role not in ROLES:
            raise IngestError(f"unknown column role {role!r}", f"roles are: {', '.join(ROLES)}")
        if column not in columns:
            raise IngestError(
                f"the mapping names column {column!r}, which the table does not have",
                f"its columns are: {', '.join(columns)}",
            )
        claim(role, column, "mapping")
    plain = {c: _plain(c) for c in columns}
    for role in ROLES:  # an exact synonym first, the earlier synonym preferred ("Title" over "Name")
        if getattr(found, role) is None:
            column = next(
                (c for synonym in _SYNONYMS[role] for c in columns if c not in taken and plain[c] == synonym),
                None,
            )
            if column:
                claim(role, column, "header")
    for role, words in _CONTAINS.items():  # then a header holding a telling word, whole or its start
        if getattr(found, role) is None:
            column = next(
                (
                    c
                    for c in columns
                    if c not in taken and any(re.search(rf"\b{re.escape(w)}", plain[c]) for w in words)
                ),
                None,
            )
            if column:
                claim(role, column, "header")
    rows = rows or []
    if found.code is None:
        column = next((c for c in columns if c not in taken and _looks_like_codes(_cells(rows, c))), None)
        if column:
            claim("code", column, "content")
    if found.title is None:
        column = next((c for c in columns if c not in taken and _looks_like_titles(_cells(rows, c))), None)
        if column:
            claim("title", column, "content")
    if found.duties is None and rows:  # the longest text is what the category does
        lengths = {c: sum(map(len, _cells(rows, c))) / max(1, len(rows)) for c in columns if c not in taken}
        column = max(lengths, key=lambda c: lengths[c], default=None)
        if column and lengths[column] >= 40:
            claim("duties", column, "content")
    return found


def parse_mapping(text: str) -> dict[str, str]:
    """`code=LCAT Code,title=Labor Category` as {role: column}."""
    mapping = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        role, sep, column = part.partition("=")
        if not sep or not column.strip():
            raise IngestError(f"not a column mapping: {part!r}", "write ROLE=COLUMN, e.g. code=LCAT Code")
        mapping[role.strip().lower()] = column.strip()
    return mapping
