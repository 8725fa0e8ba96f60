"""The operator UI: chat with cited sources, documents, lookup and drafting, model and bundles, audit log.

`make_app(backend)` builds it over a client of the running service (`appliance.client.ServiceClient`:
the model stays loaded once, in the service, which records this user from the socket) or, with no
service running, an in-process `Appliance`; both have the same methods. The UI does no work: every
call runs in a thread worker, one at a time, and comes back as a message; the screen never freezes
while the model generates.
Model output and document text are shown as plain `Text`: terminal escape sequences and control
characters are stripped first and Rich markup is never interpreted.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import (
    Button,
    DataTable,
    Footer,
    Input,
    Label,
    ProgressBar,
    Static,
    TabbedContent,
    TabPane,
    TextArea,
)

from appliance.audit import os_user
from appliance.documents import clean_text
from appliance.errors import ApplianceError


def inert(text: str) -> Text:
    """Text for the terminal: no escape sequences, no control characters, no markup."""
    return Text(clean_text(text))


HELP = """F1 help  F2 chat  F3 documents  F4 lookup/draft  F5 model
F6 audit  F7 feedback   Ctrl+Q quit   Tab next field
Escape closes a dialog

Chat       Enter asks. Ctrl+N starts a new conversation,
           Ctrl+Y copies the last answer. In the sources
           table, Enter opens a source in full.
           On the last answer: Ctrl+G good, Ctrl+B bad,
           Ctrl+R write the correct answer, Ctrl+O add the
           source that should have been found; X on a row
           of the sources table marks it irrelevant.
Feedback   what was judged, and Export: the signed files
           for the builder (a USB stick path).
Documents  Enter on a path ingests it; Enter on a row
           removes that document (asks first).
Lookup     a code (15-1252.00), a prefix (15-12) or title
           words: rows of the reference tables, no model.
Draft      an RFP file: compliance matrix, cited responses
           and staffing, written as Markdown.
Model      verify or install a bundle from a path (a mounted
           USB stick); rollback asks first.
Audit      filter by user or action; Verify recomputes
           the hash chain.

Answers cite sources as [n]; a star in the sources table
marks the ones cited. Codes no source contains are flagged
as unverified: look them up before relying on them."""


class TextScreen(ModalScreen):
    """A scrollable text (a full source, the help), closed with Escape."""

    BINDINGS = [Binding("escape", "dismiss", "Close")]

    def __init__(self, title: str, body: str):
        super().__init__()
        self.title_text, self.body = title, body

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(inert(self.title_text), id="dialog-title")
            with VerticalScroll():
                yield Static(inert(self.body), id="dialog-body")
            yield Label("Escape to close", classes="hint")


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("escape", "no", "Cancel"), Binding("y", "yes", "Yes"), Binding("n", "no", "No")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(inert(self.question), id="dialog-title")
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", id="yes", variant="warning")
                yield Button("No (n)", id="no")

    def action_yes(self) -> None:
        self.dismiss(True)

    def action_no(self) -> None:
        self.dismiss(False)

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class CorrectionScreen(ModalScreen[str | None]):
    """The corrected answer, written over the model's."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save", priority=True)]

    def __init__(self, answer: str):
        super().__init__()
        self.answer = answer

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("The answer as it should have been (Ctrl+S saves, Escape cancels)", id="dialog-title")
            yield TextArea(clean_text(self.answer), id="correction", soft_wrap=True)

    def action_save(self) -> None:
        self.dismiss(self.query_one("#correction", TextArea).text.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class SourcePickScreen(ModalScreen[int | None]):
    """Search for the source that should have been found; Enter on a result picks it."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, search):
        super().__init__()
        self.search = search  # query -> hits, called in a worker

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Search for the source that should have been found; Enter on a result picks it",
                        id="dialog-title")
            yield Input(placeholder="words or a code", id="pick-query")
            yield DataTable(id="pick-table", cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#pick-table", DataTable).add_columns("chunk", "document", "text")
        self.query_one("#pick-query", Input).focus()

    @on(Input.Submitted, "#pick-query")
    def find(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self._find(event.value.strip())

    @work(thread=True)
    def _find(self, query: str) -> None:
        hits = self.search(query)
        self.app.call_from_thread(self._show, hits or [])

    def _show(self, hits) -> None:
        table = self.query_one("#pick-table", DataTable)
        table.clear()
        for h in hits:
            table.add_row(str(h.chunk_id), inert(Path(h.source).name), inert(" ".join(h.text.split())[:120]),
                          key=str(h.chunk_id))
        table.focus()

    @on(DataTable.RowSelected, "#pick-table")
    def pick(self, event: DataTable.RowSelected) -> None:
        self.dismiss(int(event.row_key.value))

    def action_cancel(self) -> None:
        self.dismiss(None)


class SourcesTable(DataTable):
    BINDINGS = [Binding("x", "app.irrelevant", "Irrelevant source")]


# -- messages posted by workers ---------------------------------------------------------------------

class Piece(Message):
    def __init__(self, text: str):
        super().__init__()
        self.text = text


class Answered(Message):
    def __init__(self, answer):
        super().__init__()
        self.answer = answer


class Failed(Message):
    def __init__(self, where: str, error: str):
        super().__init__()
        self.where, self.error = where, error


class Progress(Message):
    def __init__(self, bar: str, done: float, total: float, label: str = ""):
        super().__init__()
        self.bar, self.done, self.total, self.label = bar, done, total, label


class Loaded(Message):
    """Fresh data for a pane: `what` names it."""

    def __init__(self, what: str, data):
        super().__init__()
        self.what, self.data = what, data


class OperatorApp(App):
    TITLE = "appliance"
    CSS = """
    TabbedContent { height: 1fr; }
    TabPane { padding: 0; }
    #transcript { height: 3fr; border: round $primary; padding: 0 1; }
    .user { color: $accent; margin-top: 1; }
    .assistant { margin-bottom: 0; }
    .warning { color: $warning; }
    #sources { height: 2fr; min-height: 5; border: round $secondary; }
    #question { dock: bottom; }
    #dialog { width: 90%; height: 80%; border: thick $primary; background: $surface; padding: 1; align: center middle; }
    #dialog-title { text-style: bold; }
    ConfirmScreen #dialog { height: auto; width: 60; }
    TextScreen, ConfirmScreen { align: center middle; }
    .hint { color: $text-muted; }
    .row { height: auto; }
    .row Input { width: 1fr; }
    .row Button { width: auto; min-width: 10; }
    #model-info { height: auto; max-height: 14; border: round $secondary; padding: 0 1; }
    DataTable { height: 1fr; }
    ProgressBar { width: 100%; }
    #status-line { height: 1; color: $text-muted; }
    #correction { height: 1fr; }
    CorrectionScreen, SourcePickScreen { align: center middle; }
    """
    BINDINGS = [
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit"),
        Binding("ctrl+g", "judge('good')", "Good"),
        Binding("ctrl+b", "judge('bad')", "Bad"),
        Binding("ctrl+r", "correct", "Correct"),
        Binding("ctrl+o", "missing", "Add source", show=False),
        Binding("ctrl+n", "new_conversation", "New chat", show=False),
        Binding("ctrl+y", "copy_answer", "Copy answer", show=False),
        Binding("f2", "tab('chat')", "Chat", show=False, priority=True),
        Binding("f3", "tab('documents')", "Documents", show=False, priority=True),
        Binding("f4", "tab('lookup')", "Lookup", show=False, priority=True),
        Binding("f5", "tab('model')", "Model", show=False, priority=True),
        Binding("f6", "tab('audit')", "Audit", show=False, priority=True),
        Binding("f7", "tab('feedback')", "Feedback", show=False, priority=True),
    ]

    def __init__(self, backend):
        """`backend`: a ServiceClient or an Appliance (see the module docstring)."""
        super().__init__()
        self.backend = backend
        self.lock = threading.Lock()  # one call into the backend at a time
        self.user = os_user()
        self.conversation: int | None = None
        self.last_answer = None
        self.busy = False
        self._current_text: list[str] = []

    # -- layout ----------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        with TabbedContent(initial="chat"):
            with TabPane("Chat", id="chat"):
                yield VerticalScroll(id="transcript")
                yield SourcesTable(id="sources", cursor_type="row")
                yield Input(placeholder="Ask about your documents; Enter to send", id="question")
            with TabPane("Documents", id="documents"):
                with Horizontal(classes="row"):
                    yield Input(placeholder="file or folder to ingest", id="ingest-path")
                    yield Input(value="default", placeholder="collection", id="ingest-collection")
                    yield Button("Ingest", id="ingest")
                yield ProgressBar(total=1, id="ingest-progress", show_eta=False)  # idle: 0%, not an animation
                yield DataTable(id="documents-table", cursor_type="row")
            with TabPane("Lookup/Draft", id="lookup"):
                with Horizontal(classes="row"):
                    yield Input(placeholder="code, code prefix or title words", id="lookup-query")
                    yield Button("Look up", id="lookup-go")
                yield DataTable(id="lookup-table", cursor_type="row")
                with Horizontal(classes="row"):
                    yield Input(placeholder="RFP file to draft a proposal for", id="draft-rfp")
                    yield Input(placeholder="collections (comma-separated)", id="draft-collections")
                    yield Button("Draft", id="draft-go", variant="primary")
                yield ProgressBar(total=1, id="draft-progress", show_eta=False)
                yield Static(id="draft-status")
            with TabPane("Model", id="model"):
                yield Static(id="model-info")
                with Horizontal(classes="row"):
                    yield Input(placeholder="bundle directory (a mounted USB stick)", id="bundle-path")
                    yield Button("Verify", id="bundle-verify")
                    yield Button("Install", id="bundle-install", variant="primary")
                    yield Button("Rollback", id="bundle-rollback", variant="warning")
                yield ProgressBar(total=1, id="bundle-progress", show_eta=False)
                yield DataTable(id="generations-table", cursor_type="row")
            with TabPane("Audit", id="audit"):
                with Horizontal(classes="row"):
                    yield Input(placeholder="user", id="audit-user")
                    yield Input(placeholder="action (ask, ingest, install...)", id="audit-action")
                    yield Button("Verify chain", id="audit-verify")
                yield Static(id="audit-status")
                yield DataTable(id="audit-table", cursor_type="row")
            with TabPane("Feedback", id="feedback"):
                with Horizontal(classes="row"):
                    yield Input(placeholder="directory to export to (a USB stick)", id="export-path")
                    yield Button("Export", id="export-go", variant="primary")
                yield Static(id="feedback-status")
                yield DataTable(id="feedback-table", cursor_type="row")
        yield Static(id="status-line")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#sources", DataTable).add_columns("n", "cited", "document", "chunk", "text")
        self.query_one("#documents-table", DataTable).add_columns("id", "collection", "chunks", "sha256", "document")
        self.query_one("#generations-table", DataTable).add_columns("gen", "state", "version", "name", "quant",
                                                                     "installed")
        self.query_one("#audit-table", DataTable).add_columns("id", "time", "user", "action", "gen", "detail")
        self.query_one("#lookup-table", DataTable).add_columns("code", "title", "match", "source")
        self.query_one("#feedback-table", DataTable).add_columns("id", "time", "user", "kind", "answer", "state",
                                                                 "question")
        self.query_one("#question", Input).focus()
        self.refresh_all()

    # -- the one way into the backend --------------------------------------------------------------
    def _call(self, where: str, fn):
        with self.lock:
            try:
                return fn()
            except ApplianceError as exc:
                self.post_message(Failed(where, str(exc)))
            except OSError as exc:
                self.post_message(Failed(where, f"{exc.strerror or exc}"))
        return None

    def _load(self, what: str, fn, where: str | None = None):
        """`_call`, then the result (if any) to the screen as Loaded(`what`); returns it."""
        result = self._call(where or what, fn)
        if result is not None:
            self.post_message(Loaded(what, result))
        return result

    def _path(self, field: str, asking: str) -> Path | None:
        """The path typed in `field`, or None after asking for one."""
        typed = self.query_one(field, Input).value.strip()
        if not typed:
            self.notify(f"give {asking}", severity="warning")
            return None
        return Path(typed).expanduser()

    @work(thread=True, group="load")
    def refresh_all(self) -> None:
        self._load("status", self.backend.status)
        self._load("generations", lambda: self.backend.generations()["generations"])
        self._load("documents", self.backend.documents)
        self._load_audit()
        self._load_feedback()

    def _load_feedback(self) -> None:
        self._load("feedback", lambda: self.backend.feedback_items(limit=500))

    def _load_audit(self, user: str | None = None, action: str | None = None) -> None:
        self._load("audit", lambda: self.backend.audit_rows(action or None, user or None, 200))

    # -- chat ----------------------------------------------------------------------------------------
    @on(Input.Submitted, "#question")
    def ask(self, event: Input.Submitted) -> None:
        question = event.value.strip()
        if not question or self.busy:
            if self.busy:
                self.notify("still answering the last question", severity="warning")
            return
        event.input.value = ""
        self.busy = True
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.mount(Static(inert(f"you: {question}"), classes="user"))
        self._current_text = []
        self._answer_widget = Static(Text(""), classes="assistant")
        transcript.mount(self._answer_widget)
        transcript.scroll_end(animate=False)
        self.query_one("#status-line", Static).update("answering...")
        self._ask(question)

    @work(thread=True, group="ask")
    def _ask(self, question: str) -> None:
        def run():
            if self.conversation is None:
                self.conversation = self.backend.new_conversation(self.user)
            return self.backend.ask(question, conversation=self.conversation,
                                    on_text=lambda piece: self.post_message(Piece(piece)))
        answer = self._call("ask", run)
        self.post_message(Answered(answer))

    def on_piece(self, message: Piece) -> None:
        self._current_text.append(message.text)
        self._answer_widget.update(inert("".join(self._current_text)))
        self.query_one("#transcript", VerticalScroll).scroll_end(animate=False)

    def on_answered(self, message: Answered) -> None:
        self.busy = False
        answer = message.answer
        if answer is None:
            self._answer_widget.update(inert("(no answer)"))
            self.query_one("#status-line", Static).update("")
            return
        self.last_answer = answer
        self._answer_widget.update(inert(answer.answer))
        table = self.query_one("#sources", DataTable)
        table.clear()
        cited = {c["n"] for c in answer.citations}
        for i, hit in enumerate(answer.sources, start=1):
            table.add_row(str(i), "*" if i in cited else "", inert(Path(hit.source).name), str(hit.position),
                          inert(" ".join(hit.text.split())[:200]), key=str(i))
        if answer.unverified_codes:
            self.query_one("#transcript", VerticalScroll).mount(
                Static(inert("unverified codes (no source contains them): " + ", ".join(answer.unverified_codes)),
                       classes="warning"))
        t = answer.timing
        self.query_one("#status-line", Static).update(
            f"{len(answer.sources)} sources, {len(answer.citations)} cited; retrieval {t['retrieval_ms']:.0f} ms, "
            f"first token {t['ttft_ms']:.0f} ms, {t['tokens_per_s'] or 0:.1f} tokens/s")
        self._load_audit_async()

    @on(DataTable.RowSelected, "#sources")
    def open_source(self, event: DataTable.RowSelected) -> None:
        if self.last_answer is None:
            return
        hit = self.last_answer.sources[int(event.row_key.value) - 1]
        self.push_screen(TextScreen(f"[{event.row_key.value}] {Path(hit.source).name}, chunk {hit.position}",
                                    hit.text))

    def action_new_conversation(self) -> None:
        self.conversation = None
        self.last_answer = None
        self.query_one("#transcript", VerticalScroll).remove_children()
        self.query_one("#sources", DataTable).clear()
        self.notify("new conversation")

    def action_copy_answer(self) -> None:
        if self.last_answer is not None:
            self.copy_to_clipboard(clean_text(self.last_answer.answer))
            self.notify("answer copied")

    # -- feedback on the last answer ------------------------------------------------------------------
    def _judged(self) -> bool:
        if self.last_answer is None or self.last_answer.audit_id is None:
            self.notify("no answer to judge yet", severity="warning")
            return False
        return True

    def action_judge(self, kind: str) -> None:
        if self._judged():
            self._feedback(kind)

    def action_correct(self) -> None:
        if self._judged():
            def written(text: str | None) -> None:
                if text:
                    self._feedback("correction", correction=text)
            self.push_screen(CorrectionScreen(self.last_answer.answer), written)

    def action_irrelevant(self) -> None:
        table = self.query_one("#sources", DataTable)
        if self._judged() and table.row_count:
            n = int(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
            self._feedback("irrelevant_source", source=n)

    def action_missing(self) -> None:
        if self._judged():
            def picked(chunk_id: int | None) -> None:
                if chunk_id:
                    self._feedback("missing_source", chunk_id=chunk_id)
            self.push_screen(SourcePickScreen(lambda q: self._call("search", lambda: self.backend.search(q, 8, None))),
                             picked)

    @work(thread=True, group="load")
    def _feedback(self, kind: str, **fields) -> None:
        if self._load("judged", lambda: self.backend.feedback(self.last_answer.audit_id, kind, **fields),
                      "feedback") is not None:
            self._load_feedback()

    @on(Input.Submitted, "#export-path")
    @on(Button.Pressed, "#export-go")
    def export_feedback(self) -> None:
        if out := self._path("#export-path", "a directory to export to"):
            self._export(out)

    @work(thread=True, group="load")
    def _export(self, out: Path) -> None:
        if self._load("exported", lambda: self.backend.feedback_export(out), "export") is not None:
            self._load_feedback()
            self._load_audit()

    # -- documents ----------------------------------------------------------------------------------
    @on(Input.Submitted, "#ingest-path")
    @on(Button.Pressed, "#ingest")
    def ingest(self) -> None:
        if path := self._path("#ingest-path", "a file or folder to ingest"):
            self._ingest(path, self.query_one("#ingest-collection", Input).value.strip() or "default")

    @work(thread=True, group="ingest")
    def _ingest(self, path: Path, collection: str) -> None:
        report = self._call("ingest", lambda: self.backend.ingest(
            [path], collection, progress=lambda item, done, total: self.post_message(
                Progress("#ingest-progress", done, total, Path(item).name if item else ""))))
        if report is not None:
            self.post_message(Progress("#ingest-progress", 1, 1))
            self.post_message(Loaded("ingested", report))
        self.refresh_all()

    @on(DataTable.RowSelected, "#documents-table")
    def remove_document(self, event: DataTable.RowSelected) -> None:
        doc_id = int(event.row_key.value)

        def answered(yes: bool | None) -> None:
            if yes:
                self._remove(doc_id)
        self.push_screen(ConfirmScreen(f"Remove document {doc_id}, its chunks and vectors?"), answered)

    @work(thread=True, group="ingest")
    def _remove(self, doc_id: int) -> None:
        self._load("removed", lambda: self.backend.remove_document(doc_id), "remove")
        self.refresh_all()

    # -- model and bundles --------------------------------------------------------------------------
    @on(Button.Pressed, "#bundle-verify")
    def verify_bundle(self) -> None:
        if path := self._path("#bundle-path", "the bundle's directory (a mounted USB stick)"):
            self._bundle("verify", path)

    @on(Button.Pressed, "#bundle-install")
    def install_bundle(self) -> None:
        if path := self._path("#bundle-path", "the bundle's directory (a mounted USB stick)"):
            self._bundle("install", path)

    @work(thread=True, group="bundle")
    def _bundle(self, what: str, path: Path) -> None:
        def progress(name, done, total):
            self.post_message(Progress("#bundle-progress", done, total, name))
        if what == "verify":
            self._load("verified", lambda: self.backend.verify_bundle(path, progress), "verify")
        else:
            self._load("installed", lambda: self.backend.install_bundle(path, progress=progress), "install")
        self.refresh_all()

    @on(Button.Pressed, "#bundle-rollback")
    def rollback(self) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self._rollback()
        self.push_screen(ConfirmScreen("Return to the previous generation? The current one stays installed."),
                         answered)

    @work(thread=True, group="bundle")
    def _rollback(self) -> None:
        self._load("rolled back", self.backend.rollback, "rollback")
        self.refresh_all()

    # -- audit ----------------------------------------------------------------------------------------
    @on(Input.Submitted, "#audit-user")
    @on(Input.Submitted, "#audit-action")
    def filter_audit(self) -> None:
        self._load_audit_async()

    @work(thread=True, group="load")
    def _load_audit_async(self) -> None:
        self._load_audit(self.query_one("#audit-user", Input).value.strip(),
                         self.query_one("#audit-action", Input).value.strip())

    @on(Button.Pressed, "#audit-verify")
    def verify_audit(self) -> None:
        self._verify_audit()

    @work(thread=True, group="load")
    def _verify_audit(self) -> None:
        self._load("audit-verified", self.backend.audit_verify, "audit")

    # -- lookup and draft ------------------------------------------------------------------------------
    @on(Input.Submitted, "#lookup-query")
    @on(Button.Pressed, "#lookup-go")
    def lookup(self) -> None:
        query = self.query_one("#lookup-query", Input).value.strip()
        if query:
            self._lookup(query)

    @work(thread=True, group="load")
    def _lookup(self, query: str) -> None:
        self._load("lookup", lambda: self.backend.lookup(query, None, 200))

    @on(Input.Submitted, "#draft-rfp")
    @on(Button.Pressed, "#draft-go")
    def draft(self) -> None:
        if rfp := self._path("#draft-rfp", "the RFP file to draft from"):
            collections = [c.strip() for c in self.query_one("#draft-collections", Input).value.split(",") if c.strip()]
            self._draft(rfp, collections or None)

    @work(thread=True, group="ask")
    def _draft(self, rfp: Path, collections: list[str] | None) -> None:
        def progress(item, done, total):
            self.post_message(Progress("#draft-progress", done, total, f"requirement {item}" if item else ""))
        result = self._call("draft", lambda: self.backend.draft(rfp, collections, progress=progress))
        if result is None:
            return
        out = Path.cwd() / f"{rfp.stem}-draft.md"
        try:
            out.write_text(result.markdown)
        except OSError as exc:
            self.post_message(Failed("draft", f"{out}: cannot write ({exc.strerror})"))
            return
        self.post_message(Loaded("drafted", (out, result)))

    # -- results from workers ------------------------------------------------------------------------
    def on_failed(self, message: Failed) -> None:
        self.notify(clean_text(message.error), title=f"{message.where} failed", severity="error", timeout=10,
                    markup=False)

    def on_progress(self, message: Progress) -> None:
        bar = self.query_one(message.bar, ProgressBar)
        bar.update(total=max(message.total, 1), progress=message.done)
        if message.label:
            self.query_one("#status-line", Static).update(inert(message.label))

    def on_loaded(self, message: Loaded) -> None:
        what, data = message.what, message.data
        if what == "status":
            self._show_status(data)
        elif what == "generations":
            table = self.query_one("#generations-table", DataTable)
            table.clear()
            for r in data:
                state = "current" if r["current"] else "previous" if r["previous"] else ""
                table.add_row(str(r["generation"]), state, f"v{r['version']}" if r["version"] else "unsigned",
                              inert(r.get("name") or "-"), r.get("quant") or "-", r["installed"])
        elif what == "documents":
            table = self.query_one("#documents-table", DataTable)
            table.clear()
            for d in data:
                table.add_row(str(d.id), inert(d.collection), str(d.chunks), d.sha256[:12], inert(Path(d.source).name),
                              key=str(d.id))
        elif what == "audit":
            table = self.query_one("#audit-table", DataTable)
            table.clear()
            for e in data:
                detail = json.dumps(e["detail"], separators=(",", ":"))
                table.add_row(str(e["id"]), e["time"], inert(e["user"]), e["action"], str(e["generation"] or "-"),
                              inert(detail[:120]))
        elif what == "feedback":
            table = self.query_one("#feedback-table", DataTable)
            table.clear()
            for f in reversed(data):  # newest first
                table.add_row(str(f["id"]), f["time"], inert(f["user"]), f["kind"], str(f["answer_audit_id"]),
                              "exported" if f["export_id"] else "pending", inert(f["question"][:80]))
        elif what == "judged":
            self.notify(f"feedback {data['id']} ({data['kind'].replace('_', ' ')}) recorded on answer "
                        f"{data['answer_audit_id']}")
        elif what == "exported":
            counts = ", ".join(f"{n} {name.removesuffix('.jsonl')}" for name, n in data["counts"].items())
            self.query_one("#feedback-status", Static).update(
                inert(f"exported {data['items']} items to {data['out']} ({counts}), signed; export {data['export_id']}"))
        elif what == "lookup":
            table = self.query_one("#lookup-table", DataTable)
            table.clear()
            for r in data:
                table.add_row(inert(r["code"] or "-"), inert(r["title"] or "-"), r["match"],
                              inert(Path(r["source"]).name))
            if not data:
                self.notify("no reference row matches", severity="warning")
        elif what == "drafted":
            out, result = data
            summary = result.summary()
            lines = [f"wrote {out}: {summary['requirements_found']} requirements, {summary['answered']} drafted, "
                     f"{len(result.gaps)} gaps, {len(result.staffing)} roles staffed, {len(result.sources)} sources"]
            if result.unknown_codes:
                lines.append("codes not in the reference tables (flagged in the draft): "
                             + ", ".join(result.unknown_codes))
            if result.gaps:
                lines.append("requirements without a response: " + ", ".join(result.gaps))
            self.query_one("#draft-status", Static).update(inert("\n".join(lines)))
        elif what == "audit-verified":
            count, bad = data
            self.query_one("#audit-status", Static).update(
                f"audit chain intact: {count} rows" if bad is None else
                f"audit chain BROKEN at row {bad} (of {count}): that row or the one before it was altered")
        elif what == "ingested":
            self.notify(f"{len(data.added)} added, {len(data.unchanged)} unchanged, {len(data.failed)} failed",
                        severity="error" if data.failed else "information")
        elif what == "removed":
            self.notify(inert(f"removed {Path(data.source).name}").plain, markup=False)
        elif what == "verified":
            self.notify(f"bundle {data.info.name} version {data.version}: signatures and hashes OK", markup=False)
        elif what == "installed":
            self.notify(clean_text(data.message), markup=False)
        elif what == "rolled back":
            self.notify(f"rolled back from generation {data[0]} to {data[1]}")

    def _show_status(self, s: dict) -> None:
        m, e = s["model"], s["embedder"]
        lines = [f"generation {s['generation']}"
                 + (f", signed bundle v{s['version']}" if s.get("version") else ", unsigned"),
                 f"model      {m['name']} {m['quant']}, {m['parameters']:,} parameters, {m['size'] / 1e6:.1f} MB",
                 f"embedder   {e['name']} ({e['dim']}-d)",
                 f"memory     {s['resident_mb']:.0f} MB resident" if s.get("resident_mb") else "memory     -"]
        lineage = s.get("lineage") or {}
        stages = lineage.get("stages") or {}
        names = list(stages) if isinstance(stages, dict) else [str(st.get("stage", "?")) for st in stages]
        if names:
            lines.append("lineage    " + " -> ".join(names))
        evaluation = (lineage.get("evaluation") or {})
        gate = evaluation.get("gate")
        if gate:
            lines.append(f"release gate {'passed' if gate.get('passed') else 'FAILED'}: "
                         + json.dumps({k: v for k, v in gate.items() if k != 'passed'})[:200])
        for quant, ppl in (evaluation.get("perplexity") or {}).items():
            lines.append(f"perplexity {quant}: {ppl if not isinstance(ppl, dict) else ppl.get('ppl')}")
        self.query_one("#model-info", Static).update(inert("\n".join(lines)))

    # -- actions ---------------------------------------------------------------------------------------
    def action_help(self) -> None:
        self.push_screen(TextScreen("Help", HELP))

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        first = {"chat": "#question", "documents": "#ingest-path", "lookup": "#lookup-query", "model": "#bundle-path",
                 "audit": "#audit-user", "feedback": "#export-path"}
        self.query_one(first[tab]).focus()


def make_app(backend) -> OperatorApp:
    return OperatorApp(backend)


def run(backend) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    make_app(backend).run()
