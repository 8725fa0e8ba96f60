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
import unicodedata
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


# What kind of answer a question asks for, and what a sentence holding one looks like. A sentence of the
# kind asked gains ANSWER_KIND_WEIGHT, one without loses it: "How many trainers?" prefers the sentence
# with a count over one that only shares its words. English; chosen on bench/reading/calibration.
ANSWER_KIND_WEIGHT = 0.1
_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_NUMBER_WORDS = (
    "one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen|"
    "sixteen|seventeen|eighteen|nineteen|twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety|dozen|"
    "hundred|thousand"
)
_ANSWER_KINDS = (  # (name, what the question says, what a sentence holding that kind of answer has)
    (
        "amount",
        r"\bhow much\b|\bvalue\b|\bcost|\bworth\b|\bprice|\bbudget|\bdollar|\bceiling\b|\bfund|\brate\b",
        r"\$\s?\d|\b\d[\d,.]*\s*(million|billion|thousand)\b|%|\bpercent\b",
    ),
    ("count", r"\bhow many\b|\bnumber of\b|\bcount\b", rf"\b\d[\d,]*\b|\b({_NUMBER_WORDS})\b"),
    (
        "name",
        r"\bwho\b|\bwhom\b|\bname of\b|\bwhich (person|individual)",
        r"\b[A-Z][a-z]+(?:[-'][A-Z]?[a-z]+)? (?:[A-Z]\. )?[A-Z][a-z]+(?:-[A-Z][a-z]+)?\b",
    ),
    (
        "date",
        r"\bwhen\b|\bwhat (year|month|date)|\bwhich (year|month)|\bdate\b",
        rf"\b(19|20)\d\d\b|\b({_MONTHS})\b",
    ),
    (
        "duration",
        r"\bhow long\b|\bhow quickly\b|\bhow fast\b|\bduration\b|\bperiod of performance\b",
        rf"\b(\d+|{_NUMBER_WORDS}|eighteen|thirty)[- ](business day|day|week|month|year|hour|minute)s?\b",
    ),
    ("share", r"\bpercent|\bpercentage\b|\brate\b|\bshare\b", r"%|\bpercent\b"),
)
_KINDS = [
    (name, re.compile(q, re.IGNORECASE), re.compile(a, 0 if "[A-Z]" in a else re.IGNORECASE))
    for name, q, a in _ANSWER_KINDS
]


def answer_kind(question: str, sentence: str) -> float:
    """+1 when the sentence holds a kind of answer the question asks for, -1 when it holds none of
    them, 0 when the question asks for none of these kinds."""
    asked = [bool(a.search(sentence)) for _, q, a in _KINDS if q.search(question)]
    return (1.0 if any(asked) else -1.0) if asked else 0.0


REFUSAL_RE = re.compile(
    r"do(es)? not (cover|know|say|mention)|not covered|no information|(cannot|can't) (find|answer)",
    re.IGNORECASE,
)


def not_given(question: str, answer: str) -> list[str]:
    """The kinds of answer the question asks for ("amount", "count", "name", "date", "duration",
    "share") when the answer holds none of them: "How many sites?" answered "The sites were moved [1]."
    restates the question. (On the held-out reading sets this flags 16 of 31 wrong answers of the demo
    model and 2 of 18 right ones.)"""
    if REFUSAL_RE.search(answer):
        return []  # a refusal gives no answer of any kind, rightly
    asked = [(name, a) for name, q, a in _KINDS if q.search(question)]
    said = re.sub(r"\[\d{1,3}\]", " ", answer)  # a citation is not a count
    return [] if any(a.search(said) for _, a in asked) else [name for name, _ in asked]


def rank(embedder: Embedder, question: str, sources: list[tuple[int, int, str]]) -> list[Sentence]:
    """Every sentence of `sources` ((n, chunk_id, text) each), best first by cosine to the question and
    whether it holds the kind of answer asked for (`answer_kind`)."""
    every = ((n, chunk_id, s, e, text[s:e]) for n, chunk_id, text in sources for s, e in split(text))
    found = list(itertools.islice(every, MAX_SENTENCES))
    if not found or not question.strip():
        return []
    asked = embedder.embed([question])[0]  # as its search embedded it (the embedder keeps queries)
    scores = embedder.embed([f[4] for f in found]) @ asked + ANSWER_KIND_WEIGHT * np.array(
        [answer_kind(question, f[4]) for f in found]
    )
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


# -- what a question names that no document does -------------------------------------------------------
_QUESTION_TOKEN_RE = re.compile(r"[^\W_][\w&'.-]*[^\W_]|[^\W_]")
_SENTENCE_START_RE = re.compile(r"(?:^|[.!?:;]\s+|\n)\W*$")
_QUESTION_COMMON = frozenset(
    "what which who whom whose when where why how was were is are did does do the a an our we us in on of "
    "for to and or with by from at under please list give tell show could would can should may thanks "
    "thank hi hello".split()
)
MAX_NAMED_TERMS = 20  # bounds the lookups one question costs (a hostile one may name thousands)


def named_terms(question: str) -> list[str]:
    """What a question names, as written: capitalized words that do not start a sentence, and acronyms
    ("NASA", "Goddard"); a possessive's "'s" dropped. A question typed mostly in capitals names nothing
    (every word would look like a name); numbers are limits as often as names ("over 250 hours"), so
    they are not taken. At most MAX_NAMED_TERMS."""
    letters = [c for c in question if c.isalpha()]
    if letters and sum(c.isupper() for c in letters) > 0.6 * len(letters):
        return []
    out: list[str] = []
    for m in _QUESTION_TOKEN_RE.finditer(question):
        token = re.sub(r"['\u2019]s$", "", m.group(0)).strip(".")
        if len(token) < 2 or token.lower() in _QUESTION_COMMON or any(c.isdigit() for c in token):
            continue
        starts = bool(_SENTENCE_START_RE.search(question[: m.start()]))
        if token.isupper() or (token[0].isupper() and not starts):
            out.append(token)
        if len(dict.fromkeys(out)) >= MAX_NAMED_TERMS:
            break
    return list(dict.fromkeys(out))


def index_words(term: str) -> list[str]:
    """A term's words as the full-text index holds them (unicode61, diacritics removed): "José Müller"
    is "jose", "muller"; "foo_bar" is "foo", "bar"."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", term.lower()) if not unicodedata.combining(c))
    return [w for w in re.findall(r"[^\W_]+", plain) if len(w) > 1]


def unknown_terms(question: str, counts, texts: list[str]) -> list[str]:
    """The question's named terms (`named_terms`) that no document holds: `counts` gives how many
    chunks hold each lower-case word (Store.term_document_counts, over the whole store); a plural is
    held when its singular is ("RFPs"); an acronym of three or more letters spelled out in the retrieved
    `texts` is held ("BPA": "blanket purchase agreement"), and so is a term the retrieved sources' names
    or titles hold (`texts` carries them: "RFP-2025-USDA-modernization.md" holds "RFP" though its text
    says "Request for Proposals"). A question about something no document mentions ("our NASA
    contract") is answered by saying so, not by citing an unrelated passage."""
    terms = named_terms(question)
    words = {t: index_words(t) for t in terms}
    every = list(dict.fromkeys(w for ws in words.values() for w in ws))
    every += [w[:-1] for w in every if w.endswith("s") and len(w) > 3]
    held = counts(every)
    initials = None
    unknown = []
    for term in terms:
        missing = [w for w in words[term] if not held.get(w) and not (w.endswith("s") and held.get(w[:-1]))]
        if not missing:
            continue
        if any(re.search(rf"(?<![^\W_]){re.escape(term)}(?![^\W_])", text, re.IGNORECASE) for text in texts):
            continue
        if term.isupper() and term.isalpha() and 3 <= len(term) <= 6:
            if initials is None:  # built once a question, however many acronyms it names
                initials = ["".join(w[0] for w in re.findall(r"[A-Za-z]\w*", text)).lower() for text in texts]
            if any(term.lower() in i for i in initials):
                continue
        unknown.append(term)
    return unknown


def not_covered(unknown: list[str]) -> str:
    """The appliance's reply when no source answers."""
    if not unknown:
        return NOT_COVERED
    return f"{NOT_COVERED} No document mentions {', '.join(unknown[:5])}."


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
        if (
            len(tokens) == 1
            and not tokens[0].isupper()
            and _SENTENCE_START_RE.search(body[: m.start()])
            and tokens[0] == m.group(0).strip()
        ):
            continue  # "Unfortunately, ..." starts a sentence: capitalized, not a name
        if any(t.lower() not in words for t in tokens if t.lower() not in _COMMON):
            found.append((m.start(), " ".join(tokens)))
    return list(dict.fromkeys(text for _, text in sorted(found)))
