"""Hybrid retrieval and cited answers.

`search` fuses BM25 (FTS5, over the query's rarest words) and nearest neighbours by meaning by
reciprocal rank fusion; a query holding an
exact identifier (a labor-category code such as 15-1252.00) returns the reference row defining it
first, then other chunks that contain it, whatever the vectors say. `answer` puts the hits into the
prompt as numbered sources, streams the model's reply and maps each `[n]` back to its document.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from appliance.documents.readers import CODE_RE
from appliance.engine.prompt import build_messages, cited_numbers, format_source, source_title
from appliance.protocols import Embedder, Generator, Sampling
from appliance.retrieval import evidence
from appliance.retrieval.store import ChunkRow, Store
from appliance.retrieval.titles import TitleIndex
from appliance.schemas import AnswerReport, Source

RRF_K = 60
POSTINGS_BUDGET = 5_000  # about 10 ms of BM25 on the development machine (bench/search.py)
_PARTIAL_CODE_RE = re.compile(r"\b\d{2}-\d{2,4}(?:\.\d{1,2})?\b")
_STOPWORDS = frozenset(
    "a an and are as at be by can do does for from has have how i in is it its me of on or our the "
    "this to was we what when where which who why will with you your".split()
)


@dataclass
class Hit(ChunkRow):
    """A chunk with its fused score; `exact` when it holds an identifier the query named."""

    score: float = 0.0
    exact: bool = False

    def to_json(self) -> dict:
        return {
            "chunk_id": self.chunk_id,
            "doc_id": self.doc_id,
            "source": self.source,
            "title": self.title,
            "owner": self.owner,
            "collection": self.collection,
            "position": self.position,
            "score": round(self.score, 6),
            "exact": self.exact,
            "text": self.text,
        }


_CODE_QUESTION_RE = re.compile(r"\b(codes?|soc|o\*net|lcat)\b", re.IGNORECASE)


def mentioned_titles(text: str, titles: dict[str, list[dict]]) -> list[tuple[int, int, str]]:
    """(start, end, title) of reference-table titles named in `text` (appliance.retrieval.titles)."""
    return (titles if isinstance(titles, TitleIndex) else TitleIndex(titles)).mentioned(text)


def conflicting_codes(answer: str, question: str, titles: dict[str, list[dict]]) -> list[dict]:
    """Codes in an answer that the reference table contradicts: the title written nearest the code (or
    the one title the question names) is in the table under another code, or the reference tables
    disagree on that title's code (`tables_disagree`: the answer's code is in one, not in another)."""
    if not titles:
        return []
    named = mentioned_titles(answer, titles)
    asked = mentioned_titles(question, titles)
    conflicts: dict[str, dict] = {}
    for m in CODE_RE.finditer(answer):
        code = m.group(0)
        if named:
            title = min(named, key=lambda t: abs((t[0] + t[1]) / 2 - m.start()))[2]
        elif len({t for _, _, t in asked}) == 1:
            title = asked[0][2]
        else:
            continue
        rows = [r for r in titles[title] if r["code"]]
        if not rows or code in conflicts:
            continue
        if code not in {r["code"] for r in rows}:
            conflicts[code] = {
                "code": code,
                "title": rows[0]["title"],
                "table_code": rows[0]["code"],
                "table_source": rows[0]["source"],
            }
        elif other := next(
            (
                r
                for r in rows
                if r["source"] not in {s["source"] for s in rows if s["code"] == code}
                and not (r["code"].startswith(code) or code.startswith(r["code"]))
            ),
            None,
        ):
            # another reference table gives this title another code: which one holds is not for the model to say
            conflicts[code] = {
                "code": code,
                "title": other["title"],
                "table_code": other["code"],
                "table_source": other["source"],
                "tables_disagree": True,
            }
    return list(conflicts.values())


def named_in(hits: list[Hit]) -> list[str]:
    """What the name check (evidence.unknown_terms) reads of each retrieved source: its file name, title,
    section and text."""
    return [f"{Path(h.source).name} {h.title} {h.heading} {h.text}" for h in hits]


def query_codes(query: str) -> list[str]:
    return list(dict.fromkeys(_PARTIAL_CODE_RE.findall(query)))


def query_words(query: str) -> list[str]:
    rest = _PARTIAL_CODE_RE.sub(" ", query)
    return list(
        dict.fromkeys(w for w in re.findall(r"\w+", rest.lower()) if w not in _STOPWORDS and len(w) > 1)
    )


def fts_query(query: str, words: list[str] | None = None) -> str | None:
    """An FTS5 MATCH expression: codes as exact phrases, other words OR-ed (BM25 ranks them)."""
    terms = [f'"{c}"' for c in query_codes(query)]
    terms += [f'"{w}"' for w in (query_words(query) if words is None else words)]
    return " OR ".join(terms) if terms else None


def selective_words(store: Store, words: list[str], budget: int = POSTINGS_BUDGET) -> list[str]:
    """The query's rarest words, as many as fit a budget of postings for BM25 to score.

    BM25 scores every chunk that holds any query word, so a common word costs the most and, with a
    low IDF, tells the least; the vector side still covers meaning. Below the budget (a corpus
    under a few thousand chunks) every word is kept. Codes are searched as phrases apart from this.
    """
    counts = store.term_document_counts(words)
    kept, spent = [], 0
    for word in sorted(words, key=lambda w: counts.get(w, 0)):
        spent += counts.get(word, 0)
        if spent > budget:
            break
        kept.append(word)
    return kept


def search(
    store: Store,
    embedder: Embedder,
    query: str,
    k: int = 5,
    collection: str | None = None,
    fetch: int | None = None,
    vector: np.ndarray | None = None,
) -> list[Hit]:
    """`vector`: the query's embedding when the caller has it already (a draft searches every
    collection for one requirement, and compares its responses with it)."""
    query = query.strip()
    if not query:
        return []
    coll_id = store.collection_id(collection) if collection else None
    fetch = fetch or max(4 * k, 20)
    scores: dict[int, float] = {}
    match = fts_query(query, selective_words(store, query_words(query)))
    ranked_lists = [store.keyword_search(match, fetch, coll_id)] if match else []
    if vector is None:
        vector = embedder.embed([query])[0]
    ranked_lists.append(store.vector_search(vector, fetch, coll_id))
    for ranked in ranked_lists:
        for rank, (chunk_id, _) in enumerate(ranked):
            scores[chunk_id] = scores.get(chunk_id, 0.0) + 1.0 / (RRF_K + rank + 1)
    # Exact identifiers outrank everything: first the reference rows defining them, then any chunk
    # containing them (found by phrase even when neither list above reached it).
    exact: list[int] = []
    for code in query_codes(query):
        exact += store.ref_chunks_for_code(code, coll_id)
        exact += [cid for cid, _ in store.keyword_search(f'"{code}"', fetch, coll_id)]
    # A question for a title's code: the reference table's row answers it, above any prose that claims one.
    if not exact and _CODE_QUESTION_RE.search(query):
        titles = store.ref_titles()
        for _, _, title in mentioned_titles(query, titles):
            exact += [
                r["chunk_id"] for r in titles[title] if coll_id is None or r["collection_id"] == coll_id
            ]
    exact = list(dict.fromkeys(exact))
    exact_set = set(exact)
    ordered = exact + sorted((c for c in scores if c not in exact_set), key=lambda c: -scores[c])
    rows = store.chunks(ordered[:k])
    return [
        Hit(**vars(rows[c]), score=scores.get(c, 0.0), exact=c in exact_set) for c in ordered[:k] if c in rows
    ]


@dataclass
class Answer:
    question: str
    answer: str
    sources: list[Hit]
    citations: list[dict]
    unknown_citations: list[int]
    unverified_codes: list[str]
    miscited_codes: list[dict]
    model: dict
    conflicting_codes: list[dict] = field(default_factory=list)  # codes the reference table contradicts
    timing: dict = field(default_factory=dict)
    audit_id: int | None = None
    stopped: bool = False  # the caller stopped generation early (a client went away)
    raw: str = ""  # the text exactly as generated (the answer is stripped); history sends this back, so
    # llama.cpp finds the tokens it generated at the front of the next prompt and keeps them cached
    prompt: str = ""  # the question as the model saw it: its new sources, then the question
    earlier: int = 0  # sources[:earlier] were shown in earlier turns of the conversation
    evidence: list[evidence.Sentence] = field(default_factory=list)  # the sentences that support it
    unsupported: list[str] = field(default_factory=list)  # figures and names no shown source holds
    not_given: list[str] = field(default_factory=list)  # kinds of answer asked for that it does not hold
    abstained: bool = False  # no retrieved source answered: the appliance said so, the model was not asked

    def report(self) -> AnswerReport:
        """The answer as its caller gets it (the contract's shape, without the record's internals)."""
        return AnswerReport(
            question=self.question,
            answer=self.answer,
            citations=self.citations,
            unknown_citations=self.unknown_citations,
            unverified_codes=self.unverified_codes,
            miscited_codes=self.miscited_codes,
            conflicting_codes=self.conflicting_codes,
            unsupported=self.unsupported,
            not_given=self.not_given,
            evidence=[e.to_json() for e in self.evidence],
            abstained=self.abstained,
            sources=[Source(n=i, **h.to_json()) for i, h in enumerate(self.sources, start=1)],
            model=self.model,
            timing=self.timing,
            audit_id=self.audit_id,
        )


def fit_sources(
    hits: list[Hit],
    question: str,
    generator: Generator,
    budget: int,
    first: int = 1,
    texts: list[str] | None = None,
) -> list[str]:
    """Numbered source blocks (from `first`), as many as fit the token budget; the last one may be cut
    short. `texts`: what to show of each hit (default: its whole text)."""
    sources: list[str] = []
    used = generator.count_tokens(question) + 64
    for i, hit in enumerate(hits, start=first):
        title = source_title(hit.title, hit.heading)
        text = hit.text if texts is None else texts[i - first]
        block = format_source(i, title, text)
        cost = generator.count_tokens(block)
        if used + cost > budget:
            room = budget - used - 32
            if room > 64:  # a useful fragment still fits
                fraction = room / cost
                sources.append(format_source(i, title, text[: int(len(text) * fraction)] + " ..."))
            break
        sources.append(block)
        used += cost
    return sources


@dataclass(frozen=True)
class Reading:
    """How the appliance reads the sources before the model does (Settings: shown_sentences,
    abstain_below, abstain_unknown_names): `embedder` ranks their sentences against the question;
    `shown_sentences` > 0 shows the model only that many best sentences (with their chunks' numbers;
    exact identifier hits whole); the appliance answers itself, without the model, that the documents do
    not cover the question when it names terms no document holds (`unknown`, evidence.unknown_terms)
    or when no sentence scores `abstain_below`. An exact identifier hit is always the model's to read."""

    embedder: Embedder
    shown_sentences: int = 0
    abstain_below: float = 0.0
    unknown: tuple[str, ...] = ()


EVIDENCE = (
    2  # the best sentences named beside an answer (the fact is in them for 18 of 21 calibration questions)
)
WHOLE_CHARS = 400  # a chunk this short (a reference-table row) is shown whole: its lines name each other


def _narrowed(hits: list[Hit], ranked: list[evidence.Sentence], first: int, count: int):
    """The hits holding the `count` best sentences, best first, with the text to show of each: those
    sentences (an exact identifier hit keeps its place first; it and any short chunk are shown whole)."""
    chosen: dict[int, list[evidence.Sentence]] = {}  # by source number, best first
    for s in ranked[:count]:
        chosen.setdefault(s.n, []).append(s)
    exact = [i for i, h in enumerate(hits) if h.exact]
    order = exact + [n - first for n in chosen if not hits[n - first].exact]
    texts = [
        hits[i].text
        if hits[i].exact or len(hits[i].text) <= WHOLE_CHARS
        else evidence.narrow(hits[i].text, chosen[i + first])
        for i in order
    ]
    return [hits[i] for i in order], texts


GREEDY = Sampling(temperature=0.0)  # the same answer every time: evaluation, health checks, tests


@dataclass
class Prepared:
    """A question made ready for the model: the messages, what they show, and how to judge the reply."""

    question: str
    messages: list[dict]
    hits: list[Hit]  # every source numbered, earlier turns' first
    texts: list[str]  # what the model was shown of each
    earlier: int
    model_info: dict
    max_tokens: int
    sampling: Sampling
    retrieval_ms: float
    titles: dict[str, list[dict]] | None = None
    ranked: list[evidence.Sentence] = field(default_factory=list)  # the new sources' sentences, best first
    abstain: str = ""  # no source answers: the appliance's own reply (evidence.not_covered); no model
    reading_ms: float = 0.0  # ranking the sentences (evidence.rank): after retrieval, before the model


def prepare(
    generator: Generator,
    question: str,
    hits: list[Hit],
    model_info: dict,
    *,
    n_ctx: int,
    max_tokens: int,
    sampling: Sampling,
    use_rag: bool = True,
    retrieval_ms: float = 0.0,
    history: list[dict] | None = None,
    earlier: list[Hit] | None = None,
    new_sources: int | None = None,
    titles: dict[str, list[dict]] | None = None,
    reading: Reading | None = None,
) -> Prepared:
    """The prompt: as many sources as fit the context (see `answer` for the arguments)."""
    earlier = earlier or []
    budget = n_ctx - max_tokens - generator.count_tokens(build_messages("", [], use_rag)[0]["content"]) - 32
    budget -= sum(generator.count_tokens(m["content"]) + 8 for m in history or [])
    shown = {h.chunk_id for h in earlier}
    hits = [h for h in hits if h.chunk_id not in shown][:new_sources]
    first = len(earlier) + 1
    ranked: list[evidence.Sentence] = []
    texts: list[str] | None = None
    started = time.perf_counter()
    if use_rag and hits and reading is not None:
        ranked = evidence.rank(
            reading.embedder, question, [(n, h.chunk_id, h.text) for n, h in enumerate(hits, start=first)]
        )
        if reading.shown_sentences > 0 and ranked:
            hits, texts = _narrowed(hits, ranked, first, reading.shown_sentences)
            number = {h.chunk_id: n for n, h in enumerate(hits, start=first)}
            ranked = [replace(s, n=number[s.chunk_id]) for s in ranked if s.chunk_id in number]
    reading_ms = (time.perf_counter() - started) * 1000
    sources = fit_sources(hits, question, generator, budget, first, texts) if use_rag else []
    hits = earlier + hits[: len(sources)]
    ranked = [s for s in ranked if s.n < first + len(sources)]
    abstain = ""
    if reading is not None and use_rag and not any(h.exact for h in hits):
        if reading.unknown or (
            reading.abstain_below > 0 and ranked and ranked[0].score < reading.abstain_below
        ):
            abstain = evidence.not_covered(list(reading.unknown))
    messages = build_messages(question, sources, use_rag, history, more=bool(earlier))
    shown_texts = [h.text for h in earlier] + sources  # what the model was shown, earlier turns included
    return Prepared(
        question,
        messages,
        hits,
        shown_texts,
        len(earlier),
        model_info,
        max_tokens,
        sampling,
        retrieval_ms,
        titles,
        ranked,
        abstain,
        reading_ms,
    )


def complete(prep: Prepared, pieces: list[str], timing: dict, stopped: bool = False) -> Answer:
    """The answer from the model's pieces: citations mapped to documents, codes, figures and names
    checked, the supporting sentences named."""
    text = "".join(pieces).strip()
    hits, texts = prep.hits, prep.texts
    citations, unknown = [], []
    for n in cited_numbers(text):
        if 1 <= n <= len(hits):
            h = hits[n - 1]
            citations.append(
                {
                    "n": n,
                    "chunk_id": h.chunk_id,
                    "doc_id": h.doc_id,
                    "source": h.source,
                    "owner": h.owner,
                    "title": h.title,
                    "doc_sha256": h.doc_sha256,
                }
            )
        else:
            unknown.append(n)
    # A code the model wrote that none of its sources contains is flagged, never passed off as fact;
    # one that is in the sources but not in any source the answer cites is pointed at where it is.
    codes = list(dict.fromkeys(CODE_RE.findall(text)))
    unverified = [c for c in codes if not any(c in block for block in texts)]
    cited = {c["n"] for c in citations}
    miscited = [
        {"code": c, "cited": sorted(cited), "found_in": [i for i, b in enumerate(texts, 1) if c in b]}
        for c in codes
        if c not in unverified and cited and not any(c in texts[n - 1] for n in cited)
    ]
    return Answer(
        question=prep.question,
        answer=text,
        sources=hits,
        citations=citations,
        unknown_citations=unknown,
        unverified_codes=unverified,
        miscited_codes=miscited,
        conflicting_codes=conflicting_codes(text, prep.question, prep.titles or {}),
        unsupported=[] if prep.abstain else evidence.unsupported(text, texts),
        not_given=[] if prep.abstain or not hits else evidence.not_given(prep.question, text),
        evidence=[] if prep.abstain else prep.ranked[:EVIDENCE],
        abstained=bool(prep.abstain),
        model=prep.model_info,
        timing=timing,
        stopped=stopped,
        raw="".join(pieces),
        prompt=prep.messages[-1]["content"],
        earlier=prep.earlier,
    )


def timing_of(
    prep: Prepared, start: float, first: float | None, end: float, n_tokens: int, prompt_tokens: int
) -> dict:
    decode_s = end - (first or end)
    return {
        "retrieval_ms": round(prep.retrieval_ms, 2),
        "reading_ms": round(prep.reading_ms, 2),
        "prompt_tokens": prompt_tokens,
        "max_tokens": prep.max_tokens,
        "ttft_ms": round(((first or end) - start) * 1000, 2),
        "tokens": n_tokens,
        "tokens_per_s": round((n_tokens - 1) / decode_s, 2) if n_tokens > 1 and decode_s > 0 else None,
    }


def answer(
    generator: Generator,
    question: str,
    hits: list[Hit],
    model_info: dict,
    *,
    n_ctx: int,
    max_tokens: int,
    sampling: Sampling,
    use_rag: bool = True,
    retrieval_ms: float = 0.0,
    on_text: Callable[[str], None] | None = None,
    history: list[dict] | None = None,
    should_stop: Callable[[], bool] | None = None,
    earlier: list[Hit] | None = None,
    new_sources: int | None = None,
    titles: dict[str, list[dict]] | None = None,
    reading: Reading | None = None,
) -> Answer:
    """`earlier`: the sources numbered in the history's questions (see TurnMemory); they keep their
    numbers, only hits not among them are added to the prompt (at most `new_sources`), numbered after
    them, and [n] maps over all. `titles`: the reference table's rows by title (Store.ref_titles), to
    flag codes it contradicts. `reading`: the appliance's own reading of the sources (`Reading`). In one
    call: `prepare`, the model's stream, `complete` (the service runs
    the three apart, so the stream does not hold the database's worker)."""
    prep = prepare(
        generator,
        question,
        hits,
        model_info,
        n_ctx=n_ctx,
        max_tokens=max_tokens,
        sampling=sampling,
        use_rag=use_rag,
        retrieval_ms=retrieval_ms,
        history=history,
        earlier=earlier,
        new_sources=new_sources,
        titles=titles,
        reading=reading,
    )
    return complete(prep, *decode(generator, prep, on_text, should_stop))


def decode(
    generator: Generator,
    prep: Prepared,
    on_text: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[str], dict, bool]:
    """The model's reply to a prepared prompt, in this thread: (pieces, timing, stopped early); when no
    source answers (`prep.abstain`), the appliance's own reply, without the model."""
    start = time.perf_counter()
    if prep.abstain:
        if on_text:
            on_text(prep.abstain)
        return [prep.abstain], timing_of(prep, start, start, start, 0, 0), False
    first = None
    pieces: list[str] = []
    stopped = False
    stream = generator.stream(prep.messages, max_tokens=prep.max_tokens, sampling=prep.sampling)
    for piece in stream:
        if first is None:
            first = time.perf_counter()
        pieces.append(piece)
        if on_text and piece:
            on_text(piece)
        if should_stop and should_stop():
            stopped = True
            if hasattr(stream, "close"):
                stream.close()  # llama.cpp stops decoding here
            break
    timing = timing_of(
        prep, start, first, time.perf_counter(), len(pieces), getattr(generator, "prompt_tokens", 0)
    )
    return pieces, timing, stopped


@dataclass
class Turn:
    """One answered question as the model saw it."""

    prompt: str  # the user message: the sources new in this turn, then the question
    answer: str  # the answer exactly as generated
    sources: list[Hit]  # every source numbered so far in the conversation, this turn's last
    earlier: int  # how many of them earlier turns had numbered


class TurnMemory:
    """The questions this process answered recently, so a follow-up can be sent as the model saw the
    conversation.

    A client sends history as it was typed: earlier questions without the sources they were answered
    from. Sent like that, the prompt differs from the one before right after the system prompt, so
    llama.cpp re-reads the whole conversation, and the sources the earlier answers cited are gone.
    When every turn of a history is one this process answered (matched on question and answer text),
    the history is rebuilt with the sources in it: the earlier prompt is then a prefix of the new one
    and stays in the KV cache, and only the follow-up's new sources and question are read. Kept in
    memory only, like the KV cache it serves; an unknown history is sent as it came.
    """

    def __init__(self, size: int = 256):
        self.size = size
        self._turns: OrderedDict[str, Turn] = OrderedDict()

    @staticmethod
    def _key(question: str, answer: str) -> str:
        return hashlib.sha256(f"{question.strip()}\0{answer.strip()}".encode()).hexdigest()

    def remember(self, question: str, answer: Answer) -> None:
        key = self._key(question, answer.raw or answer.answer)
        self._turns[key] = Turn(
            answer.prompt, answer.raw or answer.answer, list(answer.sources), answer.earlier
        )
        self._turns.move_to_end(key)
        while len(self._turns) > self.size:
            self._turns.popitem(last=False)

    def recall(self, history: list[dict]) -> tuple[list[dict], list[Hit]] | None:
        """(the history as the model saw it, the sources numbered in it), or None when any turn is unknown
        or the history does not start where its first turn's numbering did."""
        if not history or len(history) % 2:
            return None
        rebuilt: list[dict] = []
        sources: list[Hit] = []
        for asked, answered in zip(history[::2], history[1::2], strict=True):
            if asked.get("role") != "user" or answered.get("role") != "assistant":
                return None
            turn = self._turns.get(self._key(asked["content"], answered["content"]))
            if (
                turn is None
                or turn.earlier != len(sources)
                or [h.chunk_id for h in turn.sources[: turn.earlier]] != [h.chunk_id for h in sources]
            ):
                return None
            rebuilt += [
                {"role": "user", "content": turn.prompt},
                {"role": "assistant", "content": turn.answer},
            ]
            sources = turn.sources
        return rebuilt, sources
