"""Exact lookups in reference tables (labor categories and the like); no model involved.

A query that looks like a code (`15-1252.00`, `15-1252`, `15-12`) matches that code exactly first,
then every code it begins; any other query matches title words: rows whose title holds all the
words first, then those holding most of them, shorter titles first.
"""

from __future__ import annotations

import re

from appliance.retrieval.store import Store

_CODE_PREFIX_RE = re.compile(r"^\d{2}(?:-\d{0,4}(?:\.\d{0,2})?)?$")


def lookup(store: Store, query: str, collection: str | None = None, limit: int = 20) -> list[dict]:
    query = query.strip()
    if not query:
        return []
    rows = store.ref_rows(store.collection_id(collection) if collection else None)
    if _CODE_PREFIX_RE.match(query):
        exact = [r for r in rows if r["code"] == query]
        prefix = sorted(
            (r for r in rows if r["code"] and r["code"] != query and r["code"].startswith(query)),
            key=lambda r: r["code"],
        )
        return (
            [dict(r, match="exact code") for r in exact] + [dict(r, match="code prefix") for r in prefix]
        )[:limit]
    words = [w for w in re.findall(r"\w+", query.lower())]
    scored = []
    for r in rows:
        title = (r["title"] or "").lower()
        title_words = set(re.findall(r"\w+", title))
        hits = sum(1 for w in words if w in title_words)
        if hits:
            scored.append((-(hits == len(words)), -hits, len(title), r["code"] or "", r))
    scored.sort(key=lambda s: s[:4])
    return [
        dict(r, match="all title words" if full else f"{-h} of {len(words)} title words")
        for full, h, _, _, r in scored
    ][:limit]
