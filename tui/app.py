"""The operator UI: chat with cited sources, documents, lookup and drafting, model and bundles, audit
log, feedback. The app holds the backend, the bindings and the tabs; each pane (tui/panes/) owns its
widgets, workers and handlers; modal screens are in tui/screens.py, the stylesheet in tui/app.tcss.

`make_app(backend)` builds it over a client of the running service (`appliance.client.ServiceClient`:
the model stays loaded once, in the service, which records this user from the socket) or, with no
service running, an in-process `Appliance`; both have the same methods (appliance.protocols.Backend).
The UI does no work on its own thread: every call runs in a thread worker through `call`, one at a
time, and comes back as a typed message; a failure (the service stopped, a refusal) is shown and the
UI goes on. Model output and document text are shown as plain `Text`: terminal escape sequences and
control characters are stripped first and Rich markup is never interpreted.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import Footer, ProgressBar, Static, TabbedContent, TabPane

from appliance.errors import ApplianceError
from appliance.records.audit import os_user
from appliance.terminal import clean_text
from tui.messages import Changed, Failed, Progress
from tui.panes.audit import AuditPane
from tui.panes.chat import ChatPane
from tui.panes.documents import DocumentsPane
from tui.panes.feedback import FeedbackPane
from tui.panes.lookup import LookupPane
from tui.panes.model import ModelPane
from tui.screens import ConfirmScreen, CorrectionScreen, SourcePickScreen, TextScreen
from tui.widgets import inert

__all__ = [
    "ConfirmScreen",
    "CorrectionScreen",
    "OperatorApp",
    "SourcePickScreen",
    "TextScreen",
    "inert",
    "make_app",
    "run",
]

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


class OperatorApp(App):
    TITLE = "appliance"
    CSS_PATH = Path(__file__).with_name("app.tcss")
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

    FIRST_FIELD = {
        "chat": "#question",
        "documents": "#ingest-path",
        "lookup": "#lookup-query",
        "model": "#bundle-path",
        "audit": "#audit-user",
        "feedback": "#export-path",
    }

    def __init__(self, backend):
        """`backend`: a ServiceClient or an Appliance (see the module docstring)."""
        super().__init__()
        self.backend = backend
        self.lock = threading.Lock()  # one call into the backend at a time
        self.user = os_user()

    def compose(self) -> ComposeResult:
        with TabbedContent(initial="chat"):
            for title, tab, pane in (
                ("Chat", "chat", ChatPane),
                ("Documents", "documents", DocumentsPane),
                ("Lookup/Draft", "lookup", LookupPane),
                ("Model", "model", ModelPane),
                ("Audit", "audit", AuditPane),
                ("Feedback", "feedback", FeedbackPane),
            ):
                with TabPane(title, id=tab):
                    made = pane(id=f"{tab}-pane")
                    if isinstance(made, ChatPane):
                        self._chat = made  # its conversation outlives the screen (read after the app exits)
                    yield made
        yield Static(id="status-line")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#question").focus()
        self.refresh_all()

    # -- the panes --------------------------------------------------------------------------------------
    @property
    def chat(self) -> ChatPane:
        return self._chat

    @property
    def last_answer(self):
        return self.chat.last_answer

    @last_answer.setter
    def last_answer(self, answer) -> None:
        self.chat.last_answer = answer

    @property
    def conversation(self) -> int | None:
        return self.chat.conversation

    @property
    def busy(self) -> bool:
        return self.chat.busy

    def refresh_all(self) -> None:
        for pane in (ModelPane, DocumentsPane, AuditPane, FeedbackPane):
            self.query_one(pane).reload()

    @on(Changed)
    def _changed(self, message: Changed) -> None:
        """What one pane did, shown by the others."""
        areas = message.areas
        if areas & {"status", "generations"}:
            self.query_one(ModelPane).reload(status="status" in areas, generations="generations" in areas)
        for area, pane in (("documents", DocumentsPane), ("audit", AuditPane), ("feedback", FeedbackPane)):
            if area in areas:
                self.query_one(pane).reload()

    # -- the one way into the backend ---------------------------------------------------------------------
    def call(self, where: str, fn):
        """`fn()` on a worker's thread, one at a time; a failure is posted (Failed) and gives None."""
        with self.lock:
            try:
                return fn()
            except ApplianceError as exc:
                self.post_message(Failed(where, str(exc)))
            except OSError as exc:
                self.post_message(Failed(where, f"{exc.strerror or exc}"))
        return None

    def status_line(self, text: str) -> None:
        self.query_one("#status-line", Static).update(inert(text))

    def on_failed(self, message: Failed) -> None:
        self.notify(
            clean_text(message.error),
            title=f"{message.where} failed",
            severity="error",
            timeout=10,
            markup=False,
        )

    def on_progress(self, message: Progress) -> None:
        self.query_one(message.bar, ProgressBar).update(total=max(message.total, 1), progress=message.done)
        if message.label:
            self.status_line(message.label)

    # -- actions ------------------------------------------------------------------------------------------
    def action_help(self) -> None:
        self.push_screen(TextScreen("Help", HELP))

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        self.query_one(self.FIRST_FIELD[tab]).focus()

    def action_judge(self, kind: str) -> None:
        self.chat.judge(kind)

    def action_correct(self) -> None:
        self.chat.correct()

    def action_irrelevant(self) -> None:
        self.chat.irrelevant()

    def action_missing(self) -> None:
        self.chat.missing()

    def action_new_conversation(self) -> None:
        self.chat.new_conversation()

    def action_copy_answer(self) -> None:
        self.chat.copy_answer()


def make_app(backend) -> OperatorApp:
    return OperatorApp(backend)


def run(backend) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    make_app(backend).run()
