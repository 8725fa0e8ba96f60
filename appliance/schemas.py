"""The one contract between the appliance and its clients (pydantic): the service's request bodies and
every result a caller gets. `Appliance` returns these models, the service declares them as its routes'
`response_model` (and sends an answer's dump as the final stream chunk), and `appliance.client` reads
the service's JSON back into the same classes, so the CLI and the UI hold one shape whichever backend
answered. A field added here reaches every side; nothing else lists a result's fields."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from appliance.bundles.manifest import BundleManifest, EvalSummary

MAX_PROMPT_CHARS = 32_000  # one message's content; the service's other bounds are in appliance.service.limits
MAX_LOGIT_BIAS = 1024  # tokens one request may bias
MAX_STOP, MAX_STOP_CHARS = 4, 200  # OpenAI's count; each engine checks every stop string at every token
TokenId = Annotated[int, Field(ge=0, lt=1 << 31)]  # below the model's vocabulary size: checked by the engine
Bias = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    @field_validator("content")
    @classmethod
    def _bounded(cls, content):
        size = len(content) if isinstance(content, str) else len(json.dumps(content or []))
        if size > MAX_PROMPT_CHARS:
            raise ValueError(f"{size} characters; at most {MAX_PROMPT_CHARS} allowed per message")
        texts = [content] if isinstance(content, str) else [p.get("text") for p in content or []]
        try:  # JSON may carry a lone surrogate ("\ud800"), which no tokenizer or hash can encode
            for text in texts:
                if isinstance(text, str):
                    text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"not valid Unicode (a lone surrogate at character {exc.start})") from exc
        return content


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields this server ignores
    model: str | None = None
    messages: list[Message] = Field(min_length=1, max_length=64)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    logit_bias: dict[TokenId, Bias] | None = Field(
        default=None,
        max_length=MAX_LOGIT_BIAS,
        description="Token id -> bias added to its logit (-100 bans it)",
    )
    seed: int | None = Field(
        default=None, ge=0, lt=1 << 31, description="The same seed gives the same answer"
    )
    stop: str | list[str] | None = Field(
        default=None, description=f"Up to {MAX_STOP} strings that end the answer"
    )
    n: int = Field(default=1, ge=1, le=1)
    collection: str | None = Field(default=None, description="Extension: retrieve only from this collection")
    rag: bool = Field(
        default=True,
        description="Extension: false answers without retrieval (`use_rag` in Python, "
        "`--no-rag` on the command line)",
    )
    conversation: int | None = Field(
        default=None,
        ge=1,
        le=(1 << 63) - 1,
        description="Extension: a stored conversation (POST "
        "/appliance/conversations); its turns are the history, the answer is added",
    )

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP or not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"at most {MAX_STOP} stop strings of 1 to {MAX_STOP_CHARS} characters each")
        return stops


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: str | list[str] = Field(min_length=1)


class IngestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    paths: list[str] = Field(min_length=1, max_length=1000)
    collection: str = Field(default="default", min_length=1, max_length=100)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    audit_id: int = Field(description="The audit id of the answer (in every chat completion's response)")
    kind: Literal["good", "bad", "correction", "irrelevant_source", "missing_source"]
    correction: str | None = Field(default=None, max_length=16_000)
    source: int | None = Field(default=None, ge=1, description="irrelevant_source: the answer's [n]")
    chunk_id: int | None = Field(
        default=None, ge=1, description="missing_source: the chunk that should have been found"
    )
    note: str | None = Field(default=None, max_length=16_000)
    question: str | None = Field(
        default=None,
        max_length=MAX_PROMPT_CHARS,
        description="For answers outside a stored conversation: checked against the audit row",
    )
    answer: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    since: str | None = Field(
        default=None, description="Everything since this date (YYYY-MM-DD), exported or not"
    )


class WrittenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out: str


class VerifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    export: list[str] = Field(max_length=1_000_000)


class BundleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    allow_downgrade: bool = False


# -- responses: plain rows --------------------------------------------------------------------------
@dataclass
class DocumentRow:
    """A document as `documents` lists it."""

    id: int
    collection: str
    source: str
    title: str
    kind: str
    sha256: str
    size: int
    ingested: str
    chunks: int
    owner: str | None = None  # the user who ingested it; None: ingested before owners were recorded


@dataclass
class IngestReport:
    """What an ingest did with each file: added, unchanged (same hash), failed (why), duplicates."""

    added: list[dict] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)  # {"source", "same_as", "removed"}
    skipped: list[dict] = field(default_factory=list)  # {"source", "reason"}: a folder's files not read

    def to_json(self) -> dict:
        return {
            "added": self.added,
            "unchanged": self.unchanged,
            "failed": self.failed,
            "duplicates": self.duplicates,
            "skipped": self.skipped,
        }

    def extend(self, other: dict) -> None:
        """Add a report's JSON (one upload's) to this one."""
        for name in ("added", "unchanged", "failed", "duplicates", "skipped"):
            getattr(self, name).extend(other.get(name, []))


# -- responses --------------------------------------------------------------------------------------
class Answered(BaseModel):
    """A response; fields this side does not know are kept (a newer service adds some)."""

    model_config = ConfigDict(extra="allow")


class Home(Answered):
    home: str


class Source(Answered):
    """A retrieved chunk: a search result, or an answer's source (with its `n`)."""

    chunk_id: int
    doc_id: int
    source: str
    title: str
    collection: str
    position: int
    score: float
    exact: bool
    text: str
    owner: str | None = None  # who added the document (an upload's source is only the name it was sent with)
    n: int | None = None

    def to_json(self) -> dict:
        return self.model_dump(exclude={"n"})


class AnswerReport(Answered):
    """An answer as its caller gets it: the text, the numbered sources, and the checks made on it.
    Over the API the fields past `answer` ride beside OpenAI's message (`completion_fields`)."""

    question: str = ""
    answer: str
    sources: list[Source] = Field(default_factory=list)
    citations: list[dict] = Field(
        default_factory=list, description="{n, chunk_id, ...} of each [n] the answer cites"
    )
    unknown_citations: list[int] = Field(default_factory=list, description="[n]s that name no source")
    unverified_codes: list[str] = Field(
        default_factory=list, description="codes no reference table or source holds"
    )
    miscited_codes: list[dict] = Field(
        default_factory=list, description="codes whose cited source does not hold them"
    )
    conflicting_codes: list[dict] = Field(
        default_factory=list, description="codes the reference table contradicts"
    )
    unsupported: list[str] = Field(
        default_factory=list,
        description="figures and proper names in the answer that no source it was given holds",
    )
    not_given: list[str] = Field(
        default_factory=list,
        description="the kinds of answer the question asks for (amount, count, name, date, duration, share) "
        "that the answer does not hold: it likely restates the question",
    )
    evidence: list[dict] = Field(
        default_factory=list,
        description="{n, chunk_id, start, end, text, score}: the two sentences of the sources the appliance "
        "ranks closest to the question, whatever the model wrote (start/end within source n's text)",
    )
    abstained: bool = Field(
        default=False, description="no retrieved source answers the question; the model was not asked"
    )
    model: dict = Field(default_factory=dict, description="the model that answered")
    timing: dict = Field(default_factory=dict)
    audit_id: int | None = None

    def completion_fields(self) -> dict:
        """What a chat completion (and a stream's final chunk) carries beside OpenAI's own fields."""
        data = self.model_dump(mode="json", exclude={"question", "answer", "model", "timing"})
        data["appliance"] = {
            "generation": self.model.get("generation"),
            "model": self.model,
            "timing": self.timing,
        }
        return data

    @classmethod
    def from_completion(cls, data: dict, answer: str, question: str = "") -> AnswerReport:
        """The report in a chat completion or a final stream chunk (`completion_fields`), with its text."""
        appliance = data.get("appliance") or {}
        fields = {k: v for k, v in data.items() if k in cls.model_fields}
        return cls.model_validate(
            {
                **fields,
                "question": question,
                "answer": answer,
                "model": appliance.get("model") or {},
                "timing": appliance.get("timing") or {},
            }
        )


class SearchResults(Answered):
    results: list[Source]


class Documents(Answered):
    documents: list[DocumentRow]


class Removed(Answered):
    removed: DocumentRow


class Conversation(Answered):
    id: int


class LookupRows(Answered):
    query: str
    rows: list[dict]


class AuditRows(Answered):
    rows: list[dict]


class AuditVerdict(Answered):
    """`audit verify`: the chain, the signed checkpoints, and (`against`) an earlier export compared."""

    rows: int
    intact: bool
    first_bad_row: int | None = None
    checkpoints: int = 0
    anchored_rows: int = 0
    head: str | None = None
    problems: list[str] = Field(default_factory=list)
    against: dict | None = None


class FeedbackItems(Answered):
    items: list[dict]


class FeedbackRecorded(Answered):
    id: int
    kind: str
    answer_audit_id: int
    audit_id: int = Field(description="the audit row recording the feedback")


class ExportWritten(Answered):
    export_id: str
    out: str
    counts: dict
    items: int


class BundleInfo(BundleManifest):
    """bundle.json as a result carries it: a field a newer builder adds is kept, not refused (the bundle
    itself was checked against BundleManifest when it was read)."""

    model_config = ConfigDict(extra="allow")


class BundleCheck(Answered):
    """A bundle whose signatures and hashes were verified (nothing installed)."""

    version: int
    files: int
    targets: list[str]
    bytes: int
    notes: list[str] = Field(default_factory=list)
    bundle: BundleInfo


class Installed(Answered):
    """The result of a bundle install (the last event of its stream)."""

    version: int
    generation: int | None  # None: that version was installed already
    message: str
    downgrade: bool = False
    health: dict = Field(default_factory=dict)
    bundle: BundleInfo | None = None
    recovered: str | None = Field(
        default=None, description="an interrupted install found and finished or undone first"
    )


class RolledBack(Answered):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    left: int = Field(alias="from")
    to: int


class Generations(Answered):
    generations: list[dict]
    trusted_version: int


class Status(Answered):
    """What is serving: the generation, its model and embedder, the index, the collections."""

    home: str
    generation: int
    version: int | None = None
    generations: list[int] = Field(default_factory=list)
    model: dict
    embedder: dict
    collections: list[dict] = Field(default_factory=list)
    lineage: dict = Field(default_factory=dict)
    resident_mb: float | None = None
    appliance_key: dict | None = None

    @property
    def evaluation(self) -> EvalSummary | None:
        """The release evaluation the builder recorded in the lineage (None: not evaluated)."""
        data = self.lineage.get("evaluation")
        return EvalSummary.model_validate(data) if data else None


class Requirement(BaseModel):
    """A statement the RFP makes (shall, must, will provide): a row of the compliance matrix."""

    id: str = Field(description="as the RFP numbers it (C.4.2, C.4.2(a), PRS-2, M.2.1); derived ones: C.u1")
    text: str
    section: str = Field(description="the Uniform Contract Format section letter (B ... M), or ''")
    heading: str = ""
    page: int | None = Field(default=None, description="the page its text begins on, where the RFP has pages")
    kind: str = Field(
        default="obligation", description="obligation (to answer), evaluation (an M factor), format (a limit)"
    )
    derived: bool = Field(default=False, description="the RFP gives it no identifier; `id` is made up")
    evaluated_under: list[str] = Field(default_factory=list, description="the M factors that name it")
    word_limit: int | None = Field(default=None, description="the most words its response may have")


class Role(BaseModel):
    """A labor category the draft staffs, with its code and qualifications from the reference table."""

    name: str = Field(description="as the RFP words it")
    code: str
    title: str
    education: str
    years: str
    certification: str = ""
    table: str = Field(default="", description="the reference table (its source) the row comes from")
    how: str = Field(
        description='"exact title", "retrieval", "named in C.4.1.2" or "duties of C.2.3" (matched by what it asks)'
    )
    review: bool = Field(default=False, description="a close call between two categories: check it")
    key: bool = Field(default=False, description="the RFP names it among the key personnel")


class TaskStaffing(BaseModel):
    """A task of the statement of work (C.4.1, 5.3 ...) and the labor categories that do it."""

    task: str
    heading: str = ""
    roles: list[Role] = Field(default_factory=list)


class DraftReport(Answered):
    """A proposal draft: the markdown and what it holds (the result event of a draft's stream)."""

    rfp: str
    markdown: str
    requirements_found: int = Field(
        description="compliance-matrix rows: obligations, evaluation factors, limits"
    )
    to_answer: int = Field(default=0, description="rows that need a response (obligations)")
    answered: int = Field(description="responses drafted that are not gaps and need no writing")
    gaps: list[str] = Field(default_factory=list, description="requirement ids with no response")
    needs_writing: dict[str, str] = Field(
        default_factory=dict, description="requirement id -> why its response needs writing"
    )
    page_limits: dict[str, int] = Field(default_factory=dict, description="volume -> pages, from section L")
    pages_estimated: dict[str, float] = Field(
        default_factory=dict, description="volume -> pages its drafted responses fill"
    )
    format: dict = Field(default_factory=dict, description="font, size_pt, margins_in, from section L")
    trimmed: dict[str, int] = Field(
        default_factory=dict, description="requirement id -> words cut to keep its word limit"
    )
    codes_used: list[str] = Field(default_factory=list)
    unknown_codes: list[str] = Field(default_factory=list, description="codes no reference table holds")
    citations: list[int] = Field(default_factory=list)
    sources: list[dict] = Field(default_factory=list)
    requirements: list[Requirement] = Field(default_factory=list)
    staffing: list[Role] = Field(default_factory=list)
    plan: list[TaskStaffing] = Field(default_factory=list, description="the staffing plan, task by task")
    timing: dict = Field(default_factory=dict)

    def summary(self) -> str:
        """One line of counts, as the CLI and the UI report a draft."""

        def n(count: int, one: str, many: str) -> str:
            return f"{count} {one if count == 1 else many}"

        return (
            f"{n(self.requirements_found, 'matrix row', 'matrix rows')}, {self.to_answer} to answer: "
            f"{self.answered} drafted, {n(len(self.needs_writing), 'needs', 'need')} writing, "
            f"{n(len(self.gaps), 'gap', 'gaps')}; {n(len(self.staffing), 'role', 'roles')} staffed, "
            f"{n(len(self.sources), 'source', 'sources')} cited"
        )

    def warnings(self) -> list[str]:
        """What to review first: codes no table holds, gaps, responses that need writing, volumes over
        their page limit."""
        out = []
        if self.unknown_codes:
            out.append(
                "codes not in the reference tables (flagged in the draft): " + ", ".join(self.unknown_codes)
            )
        if self.gaps:
            out.append("requirements without a response: " + ", ".join(self.gaps))
        if self.needs_writing:
            out.append("responses that need writing: " + ", ".join(self.needs_writing))
        out += [
            f"{volume}: about {self.pages_estimated[volume]:g} pages drafted, its limit is {limit}"
            for volume, limit in self.page_limits.items()
            if self.pages_estimated.get(volume, 0) > limit
        ]
        return out


class FeedbackExport(Answered):
    export_id: str
    counts: dict
    files: dict[str, str]
    manifest: str
    signature: str
