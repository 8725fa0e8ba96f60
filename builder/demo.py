"""`builder demo`: the whole chain on the demo corpus shipped in `builder/demo_data/`, on CPU, from a
real base model (SmolLM2-135M-Instruct; the chain is `models/smollm2-135m-instruct/demo-cpu.yaml`).

prepare: the corpus -> training data in `<out>.work/data/`, shaped like what the appliance sends
(`appliance.engine.prompt`'s system prompt and source format, TOP_K sources as retrieval returns them):
  - sft-qa: questions about labor categories answered from numbered sources with a citation: codes,
    titles, education, years, duties. Most rows are invented (random titles and codes), so the only way
    to get them right is to copy from the sources, never to remember; the others are the real rows no
    held-out question asks about. The distractors are near misses (rows sharing title words or a code
    group, as search ranks them); the right row is first at the rate retrieval puts it first, anywhere
    otherwise; one question in twenty has no answer in its sources. Plus questions about proposal and
    RFP sections;
  - sft-write: requirement -> proposal paragraph from past proposals, cited (what `appliance draft` asks);
  - preference pairs: chosen = grounded and cited; rejected = a code copied from the wrong source, an
    invented code, no citation, or (for some) whatever the model itself says.
  -> `<out>.work/pipeline.yaml`: the pipeline file with these paths filled in.
run: `builder run` on that file, so a second `builder demo` resumes where the first stopped.
`--quick` runs the same chain on a tiny random model trained from scratch, three steps a stage.

The held-out questions (`demo_data/eval/*.jsonl`) never enter training: rows and documents they ask
about are left out of every generated example (a test checks it).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import sys
from pathlib import Path

import yaml

from appliance.documents.chunking import chunk_document
from appliance.documents.columns import ROLES
from appliance.documents.readers import CODE_RE, expand_paths, read_document, table_row_text
from appliance.engine.prompt import build_messages, format_source
from builder.errors import BuilderError

DEMO_DATA = Path(__file__).parent / "demo_data"
# The demo's chain and its base model (models/smollm2-135m-instruct/).
PIPELINE = Path(__file__).resolve().parent.parent / "models" / "smollm2-135m-instruct" / "demo-cpu.yaml"
EVAL_FILES = ("qa.jsonl", "lcat_codes.jsonl")


def load_corpus(corpus: Path) -> list:
    files, missing = expand_paths([corpus])
    if missing or not files:
        raise BuilderError(f"{corpus}: no documents found", "point --corpus at a directory of documents")
    return [read_document(p, max_bytes=50_000_000) for p in files]


def held_out(eval_file: Path) -> list[dict]:
    return [json.loads(line) for line in eval_file.read_text().splitlines() if line.strip()]


def all_held_out() -> list[dict]:
    return [q for name in EVAL_FILES for q in held_out(DEMO_DATA / "eval" / name)]


# Sources the appliance's retrieval gives an answer (Settings.top_k) and a draft section (draft.py):
# training chats show as many, so the model learns to pick the right one among that many.
TOP_K = 5
DRAFT_K = 4

# Invented labor categories: seniority x field x role, with random codes in the table's pattern.
_SENIORITY = [
    "Junior",
    "Senior",
    "Lead",
    "Principal",
    "Staff",
    "Associate",
    "Chief",
    "Deputy",
    "Tier 2",
    "Tier 3",
    "",
    "",
    "",
]
_FIELD = [
    "Cloud",
    "Network",
    "Data",
    "Security",
    "Database",
    "Software",
    "Systems",
    "Help Desk",
    "Records",
    "Training",
    "Quality",
    "Test",
    "DevOps",
    "Identity",
    "Privacy",
    "Acquisition",
    "Financial",
    "Geospatial",
    "Web",
    "Mobile",
    "Cybersecurity",
    "Incident",
    "Program",
    "Configuration",
    "Release",
    "Facilities",
    "Logistics",
    "Contracts",
    "Grants",
    "Claims",
    "Telecom",
    "Imagery",
    "Payroll",
]
_ROLE = [
    "Engineer",
    "Analyst",
    "Architect",
    "Administrator",
    "Specialist",
    "Manager",
    "Developer",
    "Technician",
    "Scientist",
    "Coordinator",
    "Lead",
    "Officer",
    "Consultant",
    "Planner",
    "Writer",
]
# Question kinds a labor-category table answers, each with the reply that copies the fact and cites it.
_QUESTIONS = {
    "code": (
        [
            "What is the code for the {t} labor category?",
            "Which labor category code do we use for {a}?",
            "What code does the {t} labor category have?",
            "Give the labor category code for {t}.",
            "What labor category code should we propose for {a}?",
            "{t}: which code?",
            "Which code do we bid for the {t} role?",
            "What is the labor category code of {a}?",
        ],
        "The {t} labor category has code {c} [{n}].",
    ),
    "title": (
        [
            "Which labor category has code {c}?",
            "Which labor category has the code {c}?",
            "What labor category is {c}?",
            "Code {c} is which labor category?",
            "Which labor category does {c} stand for?",
            "What is labor category {c} called?",
            "What role is code {c}?",
        ],
        "Code {c} is the {t} labor category [{n}].",
    ),
    "education": (
        [
            "What education does {a} need?",
            "What degree or certification does the {t} labor category require?",
            "What are the minimum qualifications of {a}?",
        ],
        "The {t} labor category requires {e} [{n}].",
    ),
    "years": (
        [
            "How many years of experience does {a} need?",
            "What experience does the {t} labor category require?",
        ],
        "The {t} labor category requires {y} years of experience [{n}].",
    ),
    "duties": (
        ["What does {a} do?", "What are the duties of the {t} labor category?", "Which labor category {d}?"],
        "The {t} {d} [{n}].",
    ),
}
_UNKNOWN = "The sources do not say, so I do not know."


def _code(rng: random.Random, like: str | None = None) -> str:
    """A code in the table's pattern; `like`: a sibling sharing its group (15-1252.00 and 15-1252.03)."""
    if like and rng.random() < 0.5:
        return f"{like[:7]}.{rng.randint(0, 9)}{rng.randint(0, 9)}"
    return f"{rng.randint(11, 29)}-{rng.randint(1000, 9999)}.{rng.randint(0, 9)}{rng.randint(0, 9)}"


def _fake_row(rng: random.Random, rows: list[dict], like: dict | None = None) -> dict:
    """An invented category (never a real title); `like`: a sibling sharing its field or role, the kind
    of near miss retrieval puts next to the right row."""
    real = {r["title"] for r in rows if r["title"]}
    title = ""
    while not title or any(t in title for t in real):
        words = like["title"].split() if like else []
        field_, role = rng.choice(_FIELD), rng.choice(_ROLE)
        if len(words) >= 2 and rng.random() < 0.7:
            field_, role = (
                (words[-2], rng.choice(_ROLE)) if rng.random() < 0.5 else (rng.choice(_FIELD), words[-1])
            )
        title = " ".join(w for w in (rng.choice(_SENIORITY), field_, role) if w)
    return {
        "code": _code(rng, like["code"] if like else None),
        "title": title,
        "duties": rng.choice(rows)["duties"],
        "education": rng.choice(rows)["education"],
        "years": str(rng.randint(1, 15)),
    }


# How often the right source is the first: retrieval puts an exact code's reference row first, and a
# title's row first for most questions (measured on the held-out questions: first for 27 of 28).
FIRST_SHARE = 0.8


def _chat(
    rng: random.Random,
    question: str,
    answer_fmt: str,
    right: tuple[str, str] | None,
    others: list[tuple[str, str]],
) -> list[dict]:
    """The right source among distractors, first at FIRST_SHARE and anywhere else otherwise; the answer
    cites its number."""
    sources = list(others)
    rng.shuffle(sources)
    if right:
        sources.insert(0 if rng.random() < FIRST_SHARE else rng.randint(1, len(sources)), right)
    n = sources.index(right) + 1 if right else 0
    blocks = [format_source(i, title, text) for i, (title, text) in enumerate(sources, start=1)]
    return build_messages(question, blocks) + [{"role": "assistant", "content": answer_fmt.format(n=n)}]


class Corpus:
    """The demo corpus cut the way the appliance will retrieve it, minus what held-out questions ask."""

    def __init__(
        self,
        docs: list,
        eval_items: list[dict],
        kinds: dict[Path, str] | None = None,
        company: str | None = "Meridian Ridge Systems",
        headless: bool = False,
    ):
        """`kinds`: each document's kind ("proposal", "rfp") as `builder prepare` decided it; without
        it, the demo's folders say (proposals/, rfps/). `company`: who writes the proposals (None: "we").
        `headless`: passages before any heading (a plain-text PDF, a DOCX without heading styles) are
        used too, under their document's title; the demo's own corpus leaves them out."""
        self.doc_kinds = kinds or {}
        self.company = company
        held_text = " ".join(f"{q['question']} {' '.join(q['must_contain'])}" for q in eval_items)
        tables = [d for d in docs if d.table is not None]
        self.table = tables[0] if tables else None  # a corpus without a table trains on its prose only
        self.roles = self.table.table.roles if self.table else None
        if self.table and self.roles:
            self.roles.require_key(str(self.table.path))  # refused with the mapping it found

        self.rows = [self._row(r) for r in self.table.table.rows] if self.table else []
        self.train_rows = [r for r in self.rows if r["code"] not in held_text and r["title"] not in held_text]
        self.prose = [
            (d, c if c.heading else dataclasses.replace(c, heading=d.title))
            for d in docs
            if d.table is None
            for c in chunk_document(d, 1200)
            if c.heading or (headless and d.title)
        ]
        self.held_text = held_text
        self.eval_items = eval_items
        held_rows = [r for r in self.rows if r not in self.train_rows]
        # what the held-out questions must find: a held-out row's code or title, or an answer such as
        # "38,000" or "12 minutes" (a bare number like "30" is everywhere and teaches nothing alone)
        self.held_strings = (
            [r["code"] for r in held_rows]
            + [r["title"] for r in held_rows]
            + [m for q in eval_items for m in q["must_contain"] if len(m) >= 4]
        )

    def doc_kind(self, doc) -> str:
        """ "proposal" or "rfp": as decided (`kinds`), else by the demo's folder names."""
        if doc.path in self.doc_kinds:
            return self.doc_kinds[doc.path]
        return "rfp" if "rfps" in doc.path.parts or doc.path.stem.startswith("RFP") else "proposal"

    def leaks(self, reply: str) -> bool:
        """Would this reply teach something a held-out question asks?"""
        return reply in self.held_text or any(s in reply for s in self.held_strings)

    def answers_held_out(self, sentence: str) -> bool:
        """Does this sentence answer a held-out question: all its expected strings in it as words (short
        ones like "77" too) and two of the question's longer words beside them?"""
        words = set(re.findall(r"\w+", sentence.lower()))
        for q in self.eval_items:
            if (
                all(re.search(rf"(?<![\w.]){re.escape(m)}(?![\w])", sentence) for m in q["must_contain"])
                and len(words & {w for w in re.findall(r"\w+", q["question"].lower()) if len(w) >= 5}) >= 2
            ):
                return True
        return False

    def _row(self, raw: dict[str, str]) -> dict:
        """A table row by role (code, title, duties, education, years), whatever its columns are called,
        with the row as it was (`_raw`) to show it as the appliance does."""
        assert self.roles is not None
        return {role: self.roles.get(raw, role) for role in ROLES} | {"_raw": raw}

    def kinds(self) -> dict[str, float]:
        """The question kinds this table can answer (code and title always; the rest where a column
        holds them), with how often each is asked."""
        have = {"code", "title"} | {r for r in ROLES if self.roles and getattr(self.roles, r)}
        return {k: w for k, w in _KIND_WEIGHTS.items() if k in have}

    def row_source(self, row: dict) -> tuple[str, str]:
        """A row (real, or invented in the table's shape) as the appliance shows it: its table's title and
        its "column: value" lines under the table's own column names."""
        assert self.table is not None and self.roles is not None
        raw = row.get("_raw") or {
            column: row[role] for role in ROLES if (column := getattr(self.roles, role)) and row.get(role)
        }
        return self.table.title, table_row_text(self.table.table, raw)

    def prose_source(self, item) -> tuple[str, str]:
        doc, chunk = item
        return f"{doc.title} - {chunk.heading}", chunk.text

    def other_passages(self, rng: random.Random, item, n: int, draw: int) -> list[tuple[str, str]]:
        """`n` prose sources other than `item`, out of `draw` drawn at random."""
        return [
            self.prose_source(p) for p in rng.sample(self.prose, min(draw, len(self.prose))) if p is not item
        ][:n]


def near_rows(rng: random.Random, target: dict, pool: list[dict], n: int) -> list[dict]:
    """`n` rows of `pool` that look most like `target` (title words, code group), as keyword and
    vector search rank them, with some chance mixed in."""
    words = set(target["title"].split())
    candidates = list(
        {r["code"]: r for r in pool if r["title"] != target["title"] and r["code"] != target["code"]}.values()
    )  # one row per code, as in a real table
    return sorted(
        candidates,
        key=lambda r: (
            -(
                len(words & set(r["title"].split()))
                + (r["code"][:7] == target["code"][:7])
                + 1.5 * rng.random()
            )
        ),
    )[:n]


def lcat_chat(
    rng: random.Random,
    corpus: Corpus,
    target: dict,
    pool: list[dict],
    kind: str,
    answerable: bool = True,
    sources: int = TOP_K,
) -> list[dict]:
    """A question about one table row, answered from `sources` sources: near-miss rows, some prose, and
    the row itself at any position (left out when not `answerable`: then the reply says so)."""
    n_prose = min(rng.choice([0, 0, 0, 1, 1, 2]), sources - 1, len(corpus.prose))  # a table alone: rows only
    others = [corpus.row_source(r) for r in near_rows(rng, target, pool, sources - 1 - n_prose)]
    others += [corpus.prose_source(p) for p in rng.sample(corpus.prose, n_prose)]
    if not answerable and corpus.prose:
        others.append(corpus.prose_source(rng.choice(corpus.prose)))
    questions, reply = _QUESTIONS[kind]
    fields = _fields(target)
    question = rng.choice(questions).format(**fields)
    answer = reply.format(**fields, n="{n}") if answerable else _UNKNOWN
    return _chat(rng, question, answer, corpus.row_source(target) if answerable else None, others)


# How often each question kind is asked; codes and titles are what the proposal team asks most.
_KIND_WEIGHTS = {"code": 0.36, "title": 0.36, "education": 0.1, "years": 0.1, "duties": 0.08}


def qa_chats(
    corpus: Corpus,
    rng: random.Random,
    n_lcat: int,
    real_share: float = 0.1,
    prose_share: float = 0.15,
    sources: int = TOP_K,
) -> list[list[dict]]:
    """`n_lcat` table questions (most about invented categories, so the only way to answer is to copy
    from the sources, never to remember; the rest about real rows no held-out question asks), one in
    twenty unanswerable; plus questions about proposal and RFP sections: what a section says (its first
    sentence) and the figure one sentence states (`prose_facts`), with table rows among their sources."""
    chats = []
    kinds, weights = list(corpus.kinds()), list(corpus.kinds().values())
    prose_n = int(n_lcat * prose_share) if corpus.rows else n_lcat // 2  # no table: prose questions only
    for i in range(n_lcat if corpus.rows else 0):
        kind = rng.choices(kinds, weights)[0]
        if rng.random() < real_share and corpus.train_rows:
            target = rng.choice(corpus.train_rows)
            pool = corpus.train_rows + [_fake_row(rng, corpus.rows, like=target) for _ in range(3)]
        else:
            seed_row = _fake_row(rng, corpus.rows)
            target = _fake_row(rng, corpus.rows, like=seed_row)
            pool = [seed_row] + [_fake_row(rng, corpus.rows, like=target) for _ in range(6)]
        chats.append(lcat_chat(rng, corpus, target, pool, kind, answerable=i % 20 != 19, sources=sources))
    prose = [p for p in corpus.prose if not corpus.leaks(_first_sentence(p[1].text))]
    for item in rng.sample(prose, min(len(prose), prose_n)):
        others = corpus.other_passages(rng, item, sources - 1, draw=sources)
        chats.append(
            _chat(
                rng,
                f"What does the {item[0].path.stem} document say about {item[1].heading.lower()}?",
                f"{_first_sentence(item[1].text)} [{{n}}]",
                corpus.prose_source(item),
                others,
            )
        )
    facts = prose_facts(corpus)
    for item, question, sentence in rng.sample(facts, min(len(facts), prose_n)):
        n_rows = min(
            rng.choice([0, 0, 1, 1, 2]), sources - 1, len(corpus.train_rows)
        )  # table rows come up for prose questions too
        others = [corpus.row_source(r) for r in rng.sample(corpus.train_rows, n_rows)]
        others += corpus.other_passages(rng, item, sources - 1 - n_rows, draw=sources)
        chats.append(
            _chat(rng, question, f"{sentence.rstrip('.')} [{{n}}].", corpus.prose_source(item), others)
        )
    rng.shuffle(chats)
    return chats


# A figure in a proposal's prose: "45,000", "$1.9 million", "77 percent", "15 days", "2022" is not one.
_FIGURE = re.compile(
    r"(?<![\w.-])(\$)?(\d(?:[\d,.]*\d)?)(?:\s?(percent|million|billion|minutes|hours|days|"
    r"months|years|%))?(?![\w-])"
)
_ASK = {
    "percent": "what percentage",
    "%": "what percentage",
    "million": "how many million",
    "billion": "how many billion",
    "minutes": "how many minutes",
    "hours": "how many hours",
    "days": "how many days",
    "months": "how many months",
    "years": "how many years",
}


_COMMON_STARTS = {
    "The",
    "Our",
    "We",
    "Each",
    "Every",
    "All",
    "This",
    "These",
    "Its",
    "Their",
    "A",
    "An",
    "Paper",
    "First",
    "Mean",
    "Offerors",
}


def prose_facts(corpus: Corpus) -> list[tuple]:
    """(chunk, question, sentence) for each sentence that states a figure (`figure_facts`)."""
    return [fact[:3] for fact in figure_facts(corpus)]


def figure_facts(corpus: Corpus) -> list[tuple]:
    """(chunk, question, sentence, figure) for each sentence of the proposals and RFPs that states a figure:
    the question is the sentence with its figure asked for ("... scaled to how many concurrent users
    ...?") and names the document, as a proposal team asks; the reply is the sentence, cited. The
    answer is only found by matching the question to one sentence among five sources, as the held-out
    document questions need. Sentences holding what a held-out question asks are left out."""
    facts = []
    for doc, chunk in corpus.prose:
        where = _doc_label(doc, corpus.doc_kind(doc))
        for sentence in re.split(r"(?<=[.!?])\s+", " ".join(chunk.text.split())):
            sentence = re.sub(r"^[A-Z]\.\d+(?:\.\d+)*\s+", "", sentence.lstrip("-* "))  # "C.2.1 The ..."
            words = sentence.split()
            if (
                not 6 <= len(words) <= 40
                or corpus.leaks(sentence)
                or corpus.answers_held_out(sentence)
                or "|" in sentence
            ):
                continue
            for figure in _FIGURE.finditer(sentence):
                dollars, number, unit = figure.groups()
                if re.fullmatch(r"(19|20)\d\d", number) or not (dollars or unit or len(number) >= 2):
                    continue  # a year, or a label such as "Wave 2"
                ask = "how much" if dollars else _ASK.get(unit or "", "how many")
                clause = (sentence[: figure.start()] + ask + sentence[figure.end() :]).rstrip(" .;:")
                if clause.split()[0] in _COMMON_STARTS:
                    clause = clause[0].lower() + clause[1:]
                facts.append(((doc, chunk), f"In the {where}, {clause}?", sentence, figure.group(0).strip()))
    return facts


def _doc_label(doc, kind: str) -> str:
    """ "2020-SBA-loan-portal.md", a proposal -> "SBA loan portal proposal"."""
    stem = re.sub(r"^(RFP-)?\d{4}-", "", doc.path.stem).replace("-", " ").replace("_", " ")
    return f"{stem} {'RFP' if kind == 'rfp' else 'proposal'}"


def _fields(row: dict) -> dict:
    """What the question and reply templates name: title, "a/an title", code, education, years, duties."""
    duties = row["duties"].split(";")[0].rstrip(".")
    return {
        "t": row["title"],
        "a": article(row["title"]),
        "c": row["code"],
        "e": row["education"].rstrip("."),
        "y": row["years"],
        "d": duties[:1].lower() + duties[1:],
    }


def article(title: str) -> str:
    return ("an " if title[:1].lower() in "aeiou" else "a ") + title


def _first_sentence(text: str) -> str:
    return text.split(". ")[0].rstrip(".") + "."


def lookup_drills(
    rng: random.Random, corpus: Corpus, n: int, sources: int = TOP_K, asks: int = 8
) -> list[str]:
    """Continual pre-training text that teaches reading the table from sources: `sources` numbered
    sources as the appliance shows them (near-miss invented rows, sometimes prose), then `asks`
    questions about those rows, each answered as an answer cites it. Every answer can only be predicted
    by finding its row among the sources, so a block of this text carries eight lookups where a chat
    carries one, and pre-training's loss covers all of them (SFT's covers one reply)."""
    texts: list[str] = []
    kinds = [k for k in ("code", "code", "title", "title", "education", "years") if k in corpus.kinds()]
    for _ in range(n if corpus.rows else 0):
        seed_row = _fake_row(rng, corpus.rows)
        rows = list(
            {
                r["code"]: r
                for r in [seed_row] + [_fake_row(rng, corpus.rows, like=seed_row) for _ in range(sources + 2)]
            }.values()
        )[:sources]
        blocks = [corpus.row_source(r) for r in rows]
        if rng.random() < 0.3:
            blocks[rng.randrange(len(blocks))] = corpus.prose_source(rng.choice(corpus.prose))
        numbered = [(i, title, text) for i, (title, text) in enumerate(blocks, start=1)]
        lines = [format_source(i, title, text) for i, title, text in numbered]
        table = [
            (i, r) for (i, _, text), r in zip(numbered, rows, strict=True) if text == corpus.row_source(r)[1]
        ]
        order = [table[i % len(table)] for i in range(asks)]  # every row asked about, in random order
        rng.shuffle(order)
        for n_src, row in order:
            kind = rng.choice(kinds)
            questions, reply = _QUESTIONS[kind]
            fields = _fields(row)
            lines.append(
                f"Question: {rng.choice(questions).format(**fields)}\n"
                f"Answer: {reply.format(**fields, n=n_src)}"
            )
        texts.append("\n\n".join(lines))
    return texts


def write_chats(
    corpus: Corpus, rng: random.Random, variants: int, sources: int = DRAFT_K
) -> list[list[dict]]:
    """Requirement -> a cited paragraph from a past proposal, among DRAFT_K sources (what `appliance
    draft` asks for each requirement): the requirement's topic is a proposal section's; the reply says
    how we meet it and backs that with the section's own sentences, cited."""
    chats = []
    for item in _proposal_sections(corpus):
        doc, chunk = item
        sentences = [
            s.strip() for s in re.split(r"(?<=[.!?])\s+", chunk.text.replace("\n", " ")) if s.strip()
        ]
        evidence = " ".join(sentences[:2])
        if corpus.leaks(evidence) or len(evidence) < 60:
            continue
        topic = _topic(chunk.heading)
        project = _project(doc)
        for _ in range(variants):
            others = corpus.other_passages(rng, item, sources - 1, draw=sources)
            requirement = rng.choice(
                [
                    "The contractor shall describe its approach to {t}.",
                    "The contractor shall provide {t} for the program.",
                    "Offerors shall explain their {t}.",
                    "The contractor must deliver {t} that meets the Government's needs.",
                ]
            ).format(t=topic)
            opening = rng.choice(
                [
                    f"We will meet this requirement as we did on the {project} contract.",
                    f"Our approach to {topic} is proven on the {project} contract.",
                    f"{corpus.company} will deliver {topic} as it did for {project}."
                    if corpus.company
                    else f"We will deliver {topic} as we did for {project}.",
                ]
            )
            chats.append(
                _chat(
                    rng,
                    f"Write our proposal's response to requirement C.{rng.randint(1, 9)}."
                    f"{rng.randint(1, 9)}: {requirement}",
                    f"{opening} {evidence} [{{n}}]",
                    corpus.prose_source(item),
                    others,
                )
            )
    rng.shuffle(chats)
    return chats


def _proposal_sections(corpus: Corpus) -> list:
    """Sections of past proposals that describe work: not the title block, a table or a bare heading."""
    return [
        (d, c)
        for d, c in corpus.prose
        if corpus.doc_kind(d) == "proposal"
        and c.heading != d.title
        and not c.text.lstrip().startswith("|")
        and c.text.strip() != c.heading
        and not re.search(r"summary|understanding", c.heading, re.IGNORECASE)
    ]


def _topic(heading: str) -> str:
    """'4. TRANSITION-IN PLAN' -> 'transition-in plan'; 'Zero Trust Roadmap for DOE' keeps 'DOE'."""
    words = re.sub(r"^[\d.]+\s*", "", heading).split()
    shouting = heading.isupper()
    return " ".join(w if w.isupper() and not shouting else w.lower() for w in words)


def _project(doc) -> str:
    """The contract a past proposal was for: its title after 'Technical Proposal:', else its file name
    ('2022-DHS-service-desk' -> 'DHS service desk')."""
    if ": " in doc.title:
        return doc.title.split(": ", 1)[-1]
    words = doc.path.stem.split("-")[1:] if doc.path.stem[:4].isdigit() else doc.path.stem.split("-")
    return " ".join(w if w.isupper() else w.lower() for w in words)


def preference_pairs(rng: random.Random, chats: list[list[dict]], n: int) -> list[dict]:
    """Chosen: the grounded, cited reply. Rejected: a code copied from the wrong source (the mistake
    a model that has not learned to pick makes), an invented code, or the reply without its citation;
    every fourth left without one, for the model's own answer to fill. Only replies whose code is the
    answer: where the question names the code ("which category is 11-3021.01?"), a reply with another
    code is not the mistake to unlearn, and DPO on such pairs can teach the model to stop right after
    the code it was given ("Code 11-3021.01 [1]", the title never written: measured once at 50% of the
    release gate's code questions, from 100%)."""
    pairs = []
    answered = (
        c
        for c in chats
        if (found := CODE_RE.search(c[-1]["content"]))
        and found.group(0) not in c[-2]["content"].rsplit("Question: ", 1)[-1]
    )
    for i, chat in enumerate(answered):
        if len(pairs) >= n:
            break
        chosen = chat[-1]["content"]
        code = CODE_RE.search(chosen).group(0)
        wrong = [c for c in CODE_RE.findall(chat[-2]["content"]) if c != code]
        if i % 4 == 3:
            rejected = None
        elif i % 4 == 0 and wrong:
            rejected = chosen.replace(code, rng.choice(wrong))
        elif i % 4 == 1:
            rejected = chosen.replace(code, _code(rng, code))
        else:
            rejected = chosen.rsplit(" [", 1)[0].rstrip(".") + "."
        pairs.append({"prompt": chat[:-1], "chosen": chosen, "rejected": rejected})
    return pairs


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# How much data each run writes: the full demo (what its pipeline's steps consume, with variety to
# spare) and the quick smoke test of the chain.
SIZES = {
    "full": {"lcat": 1200, "write_variants": 4, "pairs": 32, "drills": 0},
    "quick": {"lcat": 40, "write_variants": 1, "pairs": 16, "drills": 40},
}


def write_data(data: Path, corpus_dir: Path, *, seed: int, quick: bool) -> dict:
    """The demo's training data in `data/`; returns how many of each were written."""
    from builder.training import render_chat

    size = SIZES["quick" if quick else "full"]
    rng = random.Random(seed)
    corpus = Corpus(load_corpus(corpus_dir), all_held_out())
    if corpus.table and corpus.roles:
        print(f"demo data: {corpus.table.path.name}: {corpus.roles.describe()}", file=sys.stderr)
    qa = qa_chats(corpus, rng, size["lcat"])
    # the quick chain's model reads 1,024 positions of a 512-piece vocabulary: two sources fit there
    write = write_chats(corpus, rng, variants=size["write_variants"], sources=2 if quick else DRAFT_K)
    pairs = preference_pairs(rng, qa, size["pairs"])
    write_jsonl(data / "sft-qa.jsonl", [{"messages": c} for c in qa])
    write_jsonl(data / "sft-write.jsonl", [{"messages": c} for c in write])
    write_jsonl(data / "pairs.jsonl", pairs)
    write_jsonl(data / "eval.jsonl", all_held_out())
    drills = lookup_drills(rng, corpus, size["drills"])
    if drills:  # a model trained from scratch (the quick chain) reads these too
        write_jsonl(
            data / "pretrain-texts.jsonl",
            [{"text": render_chat(c)} for c in qa[: len(qa) // 2]] + [{"text": t} for t in drills],
        )
    counts = {
        "qa_chats": len(qa),
        "writing_chats": len(write),
        "preference_pairs": len(pairs),
        "copy_drills": len(drills),
        "table_rows_used": len(corpus.train_rows),
        "table_rows": len(corpus.rows),
    }
    print(
        f"demo data: {len(qa)} QA chats, {len(write)} writing chats, {len(pairs)} preference pairs"
        + (f", {len(drills)} copy drills" if drills else "")
        + f" ({len(corpus.train_rows)} of {len(corpus.rows)} table rows usable, the rest held out)",
        file=sys.stderr,
    )
    return counts


def prepare(
    work: Path,
    out: Path,
    *,
    corpus_dir: Path,
    embedder_dir: Path | None = None,
    seed: int = 0,
    quick: bool = False,
    feedback: Path | None = None,
    pipeline_file: Path = PIPELINE,
) -> Path:
    """Write the demo's training data under `work/data` and, from `pipeline_file`, the pipeline that
    trains on it (`work/pipeline.yaml`; the generation goes to `out`); returns the pipeline's path.
    `quick`: the same chain on a tiny random model, a few steps per stage (the tests' fixture).
    `feedback`: a dataset from `builder feedback import`; the chain then goes on with DPO on the
    operators' corrections and ships that model (see feedback_stages)."""
    data = work / "data"
    write_data(data, corpus_dir, seed=seed, quick=quick)
    spec = yaml.safe_load(pipeline_file.read_text())
    spec["vars"] = {
        **(spec.get("vars") or {}),
        "work": str(work / "stages"),
        "data": str(data),
        "corpus": str(corpus_dir),
        "out": str(out),
    }
    if spec.get("base"):
        spec["base"] = str((pipeline_file.parent / spec["base"]).resolve())
    for stage in spec["stages"]:
        if stage["stage"] in ("pretrain", "sft", "align"):
            stage["config"]["seed"] = seed
    if embedder_dir is not None:  # reuse an exported embedder instead of the stage
        spec["stages"] = [s for s in spec["stages"] if s["stage"] != "embedder"]
        spec = _replace(spec, "@embedder", str(embedder_dir.resolve()))
    if quick:
        spec = quick_variant(spec, data)
    if feedback is not None:
        spec = with_feedback(spec, feedback.resolve(), quick, seed)
    path = work / "pipeline.yaml"
    path.write_text(
        f"# Written by `builder demo` from {pipeline_file}; rerun with `builder run` (unchanged stages "
        "are skipped).\n" + yaml.safe_dump(spec, sort_keys=False, width=110)
    )
    return path


def _replace(value, old: str, new: str):
    """`value` with every string `old` (or `old/...`) replaced by `new`."""
    if isinstance(value, str):
        return new + value[len(old) :] if value == old or value.startswith(old + "/") else value
    if isinstance(value, list):
        return [_replace(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: _replace(v, old, new) for k, v in value.items()}
    return value


def quick_variant(spec: dict, data: Path) -> dict:
    """The chain on a tiny random model trained from scratch (no base to fetch), three steps per
    training stage, short answers and no accuracy gate: a smoke test of every stage's wiring."""
    spec = _replace({k: v for k, v in spec.items() if k != "base"}, "@base", "@pretrain")
    spec["base_model"] = "random init, shape tiny (the demo chain, a few steps per stage)"
    spec["name"] = f"{spec['name']}-quick"
    for stage in spec["stages"]:
        config = stage["config"]
        if stage["stage"] in ("pretrain", "sft", "align"):
            config.update(steps=3, lora={"r": 8, "alpha": 16, "train_embeddings": True}, precision="auto")
            config.pop("max_minutes", None)
        if stage["stage"] == "pretrain":
            config.pop("base", None)
            config.update(
                init_shape="tiny",
                tokenizer_vocab_size=512,
                method="full",
                seq_len=128,
                texts=[str(data / "pretrain-texts.jsonl")],
                learning_rate=2e-3,
                eval_fraction=0.05,
            )
        elif stage["stage"] == "align":
            config.update(sample_max_tokens=8)
        elif stage["stage"] == "eval":
            config.update(max_tokens=8, ppl_ctx=128, task_quants=["Q8_0"], gate={"max_ppl_increase": 0.5})
    spec["stages"] = [s for s in spec["stages"] if s["name"] != "export-base"]
    for stage in spec["stages"]:
        if stage["stage"] == "eval":
            stage["config"].pop("baseline", None)
    return spec


def with_feedback(spec: dict, dataset: Path, quick: bool, seed: int) -> dict:
    """The release eval moves after the feedback round, so it checks what ships."""
    stages = spec["stages"]
    release = next(s for s in stages if s["name"] == "eval")
    stages.remove(release)
    config = release["config"]
    release["config"] = dict(config, export="@export-feedback")
    stages += [*feedback_stages(dataset, quick, config["corpus"], config["embedder"], seed), release]
    spec["generation"]["model"] = "@export-feedback/model-Q8_0.gguf"
    return spec


def feedback_stages(
    dataset: Path, quick: bool, corpus: list[str], embedder: str, seed: int = 0
) -> list[dict]:
    """After the demo chain, the operators' corrections: SFT on the corrected answers (in the prompts
    the model saw, sources included), then DPO with the correction chosen over what the model said;
    exported, and the corrected questions answered by the model before and after."""
    questions = dataset / "questions.jsonl"
    lora = {"r": 8, "alpha": 16} if quick else {"r": 16, "alpha": 32}
    ask = {
        "questions": str(questions),
        "corpus": corpus,
        "embedder": embedder,
        "max_tokens": 16 if quick else 64,
        "task_quants": ["Q8_0"],
        "gate": {"max_ppl_increase": None},
    }
    return [
        {
            "name": "sft-feedback",
            "stage": "sft",
            "config": {
                "model": "@merge",
                "datasets": [str(dataset / "sft.jsonl")],
                "lora": lora,
                "max_length": 1024,
                "batch_size": 4,
                "steps": 4 if quick else 30,
                "learning_rate": 1e-3,
                "warmup_steps": 0,
                "seed": seed,
            },
        },
        {
            "name": "align-feedback",
            "stage": "align",
            "config": {
                "model": "@sft-feedback",
                "datasets": [str(dataset / "dpo.jsonl")],
                "generate_rejected": "never",
                "lora": lora,
                "beta": 0.1,
                "max_length": 1024,
                "batch_size": 2,
                "steps": 3 if quick else 10,
                "learning_rate": 5e-5,
                "warmup_steps": 0,
                "seed": seed,
            },
        },
        {
            "name": "export-feedback",
            "stage": "export",
            "config": {"model": "@align-feedback", "quants": ["Q8_0"]},
        },
        {"name": "eval-feedback-before", "stage": "eval", "config": {"export": "@export", **ask}},
        {"name": "eval-feedback-after", "stage": "eval", "config": {"export": "@export-feedback", **ask}},
    ]


def feedback_report(work: Path) -> dict:
    """The corrected questions answered before and after the feedback round, from the two evals."""
    report = {}
    for when in ("before", "after"):
        tasks = json.loads((work / "stages" / f"eval-feedback-{when}" / "eval.json").read_text())["tasks"][
            "Q8_0"
        ]
        report[when] = {
            "exact_with_retrieval": tasks["overall"]["with_retrieval"],
            "questions": tasks["overall"]["questions"],
            "answers": {a["id"]: a["with_retrieval"]["answer"] for a in tasks["answers"]},
        }
    return report


def build(
    out: Path,
    *,
    embedder_dir: Path | None = None,
    corpus: Path | None = None,
    seed: int = 0,
    quick: bool = False,
    feedback: Path | None = None,
    work: Path | None = None,
    pipeline_file: Path = PIPELINE,
    prepare_only: bool = False,
) -> dict:
    """Prepare the demo pipeline next to `out` (or in `work`) and run it; `out` becomes the generation
    directory. Stages whose config and inputs did not change are skipped, so `--feedback` after a
    first run trains only the feedback round."""
    from builder import pipeline

    out = out.resolve()
    work = (work or out.parent / f".{out.name}.work").resolve()
    path = prepare(
        work,
        out,
        corpus_dir=(corpus or DEMO_DATA / "corpus").resolve(),
        embedder_dir=embedder_dir,
        seed=seed,
        quick=quick,
        feedback=feedback,
        pipeline_file=pipeline_file.resolve(),
    )
    if prepare_only:
        return {"pipeline": str(path)}
    result = pipeline.run(path)
    if feedback is not None:
        result["feedback"] = feedback_report(work)
    return result
