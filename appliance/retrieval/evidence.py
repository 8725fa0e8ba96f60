"""The sentences that answer a question, chosen by the appliance rather than the model, and the checks
that hold an answer to them.

- `rank`: every sentence of the retrieved chunks, scored by the embedder's cosine to the question. The
  best is shown to the operator beside the answer (`evidence`), the model may be shown only the best
  few (`narrow`), and a best score under the abstention floor means no retrieved source answers: the
  appliance says so instead of letting the model cite something unrelated.
- `unsupported`: the figures (numbers, amounts, years) and proper names of an answer that none of the
  sources the model was shown contains; flagged, never passed off as fact.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

from appliance.documents.readers import CODE_RE
from appliance.protocols import Embedder

NOT_COVERED = "The documents do not cover this question."
MAX_SENTENCES = 400  # bounds the embedding cost of one question (5 sources of a few kB hold ~60)
MIN_SENTENCE_CHARS = 12  # "Results." is a heading, not evidence

# A sentence ends at . ! ? before a capital, digit, quote or bracket, or at a line break; not after an
# abbreviation or an initial ("U.S. Army", "Dr. Lee", "J. Smith").
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st no vs inc corp co ltd jr sr dept gov approx fig sec e.g i.e u.s u.k etc jan feb "
    "mar apr jun jul aug sep sept oct nov dec".split()
)
_END_RE = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9$])|\n+")


@dataclass(frozen=True)
class Sentence:
    """One sentence of a source: `n` its number in the prompt, `start`/`end` its place in the chunk."""

    n: int
    chunk_id: int
    start: int
    end: int
    text: str
    score: float

    def to_json(self) -> dict:
        return {
            "n": self.n,
            "chunk_id": self.chunk_id,
            "start": self.start,
            "end": self.end,
            "text": self.text,
            "score": round(self.score, 4),
        }


def split(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence of `text`, stripped; table rows and list items are one each."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in _END_RE.finditer(text):
        before = text[start : m.start()].rstrip()
        last = before.rsplit(None, 1)[-1].lower().rstrip(".!?\"')]") if before.strip() else ""
        if "\n" not in m.group(0) and (last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha())):
            continue
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    out = []
    for s, e in spans:
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e - s >= MIN_SENTENCE_CHARS:
            out.append((s, e))
    return out


def rank(embedder: Embedder, question: str, sources: list[tuple[int, int, str]]) -> list[Sentence]:
    """Every sentence of `sources` ((n, chunk_id, text) each), best first by cosine to the question."""
    every = ((n, chunk_id, s, e, text[s:e]) for n, chunk_id, text in sources for s, e in split(text))
    found = list(itertools.islice(every, MAX_SENTENCES))
    if not found or not question.strip():
        return []
    vectors = embedder.embed([question] + [f[4] for f in found])
    scores = vectors[1:] @ vectors[0]
    order = np.argsort(-scores, kind="stable")
    return [Sentence(*found[i][:4], found[i][4], float(scores[i])) for i in order]


def narrow(text: str, chosen: list[Sentence]) -> str:
    """The chosen sentences of one chunk, in the chunk's order, joined by " ... " where text was left out."""
    spans = sorted((s.start, s.end) for s in chosen)
    parts, last = [], 0
    for s, e in spans:
        parts.append(("... " if s > last and parts else "") + text[s:e])
        last = e
    return " ".join(parts)


# -- what an answer says that its sources do not --------------------------------------------------------
_FIGURE_RE = re.compile(r"(?<![\w.])\$?\d[\d,]*(?:\.\d+)?(?![\w])")
_NAME_RE = re.compile(r"\b[A-Z][\w&'-]*(?:\s+(?:of|for|the|de|&)?\s*[A-Z][\w&'-]*)*")
_COMMON = frozenset(
    "a an and as at by for from in is it its of on or our the this that these those to we was were with "
    "i you he she they their there here yes no not none also however according based sources source "
    "question answer documents document unknown".split()
)


def _figure(token: str) -> str:
    return token.lstrip("$").replace(",", "").rstrip(".")


def _words(text: str) -> set[str]:
    return {w.lower() for w in re.findall(r"[\w&'-]+", text)}


def terms(text: str) -> set[str]:
    """The figures and content words of `text` (what an answer and its evidence share)."""
    figures = {_figure(t) for t in _FIGURE_RE.findall(text)}
    return figures | {w for w in _words(text) if w not in _COMMON and len(w) > 2 and not w.isdigit()}


def unsupported(answer: str, shown: list[str]) -> list[str]:
    """Figures and proper names in `answer` that no shown source contains, in order of appearance
    (citation markers and labor-category codes are checked elsewhere). The question does not count: an
    answer that repeats a premise ("our NASA contract") no source mentions is not supported by one."""
    body = re.sub(r"\[\d{1,3}\]", " ", CODE_RE.sub(" ", answer))
    context = " ".join(shown)
    figures = {_figure(t) for t in _FIGURE_RE.findall(CODE_RE.sub(" ", context))}
    words = _words(context)
    found: list[tuple[int, str]] = []
    for m in _FIGURE_RE.finditer(body):
        if _figure(m.group(0)) not in figures:
            found.append((m.start(), m.group(0)))
    for m in _NAME_RE.finditer(body):
        tokens = re.findall(r"[\w&'-]+", m.group(0))
        while tokens and tokens[0].lower() in _COMMON:  # "The NASA" is NASA
            tokens.pop(0)
        if any(t.lower() not in words for t in tokens if t.lower() not in _COMMON):
            found.append((m.start(), " ".join(tokens)))
    return list(dict.fromkeys(text for _, text in sorted(found)))
