"""Chat: questions answered with cited sources, in a stored conversation; feedback on the last answer."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Input, Static

from appliance.schemas import FeedbackRecorded
from tui.messages import Changed
from tui.panes import Pane
from tui.screens import CorrectionScreen, SourcePickScreen, TextScreen
from tui.widgets import SourcesTable, inert


class ChatPane(Pane):
    class Piece(Message):
        """Text of the answer being written."""

        def __init__(self, text: str):
            super().__init__()
            self.text = text

    class Answered(Message):
        """The whole answer (None: the call failed, and the app said why)."""

        def __init__(self, answer, conversation: int | None):
            super().__init__()
            self.answer, self.conversation = answer, conversation

    class Judged(Message):
        def __init__(self, item: FeedbackRecorded):
            super().__init__()
            self.item = item

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conversation: int | None = None
        self.last_answer = None
        self.busy = False
        self._pieces: list[str] = []
        self._answer_widget: Static | None = None

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="transcript")
        yield SourcesTable(id="sources", cursor_type="row")
        yield Input(placeholder="Ask about your documents; Enter to send", id="question")

    def on_mount(self) -> None:
        self.query_one("#sources", DataTable).add_columns("n", "cited", "document", "chunk", "text")

    # -- asking ----------------------------------------------------------------------------------------
    @on(Input.Submitted, "#question")
    def ask(self, event: Input.Submitted) -> None:
        question = event.value.strip()
        if not question or self.busy:
            if self.busy:
                self.notify("still answering the last question", severity="warning")
            return
        event.input.value = ""
        self.start_answer(question)
        self.app.status_line("answering...")
        self._ask(question, self.conversation, self.app.user)

    def start_answer(self, question: str) -> None:
        """The question in the transcript, and an empty answer that pieces fill."""
        self.busy = True
        transcript = self.query_one("#transcript", VerticalScroll)
        transcript.mount(Static(inert(f"you: {question}"), classes="user"))
        self._pieces = []
        self._answer_widget = Static(Text(""), classes="assistant")
        transcript.mount(self._answer_widget)
        transcript.scroll_end(animate=False)

    @work(thread=True, group="ask")
    def _ask(self, question: str, conversation: int | None, user: str) -> None:
        def run():
            nonlocal conversation
            if conversation is None:
                conversation = self.backend.new_conversation(user)
            return self.backend.ask(
                question,
                conversation=conversation,
                on_text=lambda piece: self.post_message(self.Piece(piece)),
            )

        answer = self.call("ask", run)
        self.post_message(self.Answered(answer, conversation))

    @on(Piece)
    def _piece(self, message: Piece) -> None:
        self._pieces.append(message.text)
        self._answer_widget.update(inert("".join(self._pieces)))
        self.query_one("#transcript", VerticalScroll).scroll_end(animate=False)

    @on(Answered)
    def _answered(self, message: Answered) -> None:
        self.busy = False
        self.conversation = message.conversation
        answer = message.answer
        if answer is None:
            self._answer_widget.update(inert("(no answer)"))
            self.app.status_line("")
            return
        self.last_answer = answer
        self._answer_widget.update(inert(answer.answer))
        table = self.query_one("#sources", DataTable)
        table.clear()
        cited = {c["n"] for c in answer.citations}
        for i, hit in enumerate(answer.sources, start=1):
            owner = getattr(hit, "owner", None)  # an upload's name alone could be another user's path
            document = Path(hit.source).name + (f" ({owner})" if owner else "")
            table.add_row(
                str(i),
                "*" if i in cited else "",
                inert(document),
                str(hit.position),
                inert(" ".join(hit.text.split())[:200]),
                key=str(i),
            )
        transcript = self.query_one("#transcript", VerticalScroll)
        if answer.unverified_codes:
            transcript.mount(
                Static(
                    inert(
                        "unverified codes (no source contains them): " + ", ".join(answer.unverified_codes)
                    ),
                    classes="warning",
                )
            )
        if answer.abstained:
            transcript.mount(
                Static("no retrieved passage answers this; the model was not asked", classes="warning")
            )
        if answer.not_given:
            transcript.mount(
                Static(
                    f"the question asks for {' or '.join(answer.not_given)}; the answer gives none",
                    classes="warning",
                )
            )
        if answer.unsupported:
            transcript.mount(
                Static(
                    inert("not in the sources it was given: " + ", ".join(answer.unsupported)),
                    classes="warning",
                )
            )
        for e in answer.evidence:
            transcript.mount(Static(inert(f"evidence [{e['n']}]: {e['text']}"), classes="evidence"))
        for c in getattr(answer, "conflicting_codes", []):
            transcript.mount(
                Static(
                    inert(f"{c['code']} contradicts the reference table: {c['title']} is {c['table_code']}"),
                    classes="warning",
                )
            )
        t = answer.timing
        self.app.status_line(
            f"{len(answer.sources)} sources, {len(answer.citations)} cited; retrieval "
            f"{t['retrieval_ms']:.0f} ms, reading {t['reading_ms']:.0f} ms, "
            f"first token {t['ttft_ms']:.0f} ms, "
            f"{t['tokens_per_s'] or 0:.1f} tokens/s"
        )
        self.post_message(Changed("audit"))

    @on(DataTable.RowSelected, "#sources")
    def open_source(self, event: DataTable.RowSelected) -> None:
        if self.last_answer is None:
            return
        n = int(event.row_key.value)
        hit = self.last_answer.sources[n - 1]
        marked = next(((e["start"], e["end"]) for e in self.last_answer.evidence if e["n"] == n), None)
        self.app.push_screen(
            TextScreen(f"[{n}] {Path(hit.source).name}, chunk {hit.position}", hit.text, marked)
        )

    def new_conversation(self) -> None:
        self.conversation = None
        self.last_answer = None
        self.query_one("#transcript", VerticalScroll).remove_children()
        self.query_one("#sources", DataTable).clear()
        self.notify("new conversation")

    def copy_answer(self) -> None:
        if self.last_answer is not None:
            self.app.copy_to_clipboard(inert(self.last_answer.answer).plain)
            self.notify("answer copied")

    # -- feedback on the last answer --------------------------------------------------------------------
    def _judged(self) -> int | None:
        """The last answer's audit id, or None after saying there is nothing to judge."""
        if self.last_answer is None or self.last_answer.audit_id is None:
            self.notify("no answer to judge yet", severity="warning")
            return None
        return self.last_answer.audit_id

    def judge(self, kind: str) -> None:
        if (audit_id := self._judged()) is not None:
            self._feedback(audit_id, kind)

    def correct(self) -> None:
        if (audit_id := self._judged()) is not None:

            def written(text: str | None) -> None:
                if text:
                    self._feedback(audit_id, "correction", correction=text)

            self.app.push_screen(CorrectionScreen(self.last_answer.answer), written)

    def irrelevant(self) -> None:
        table = self.query_one("#sources", DataTable)
        if (audit_id := self._judged()) is not None and table.row_count:
            n = int(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)
            self._feedback(audit_id, "irrelevant_source", source=n)

    def missing(self) -> None:
        if (audit_id := self._judged()) is not None:

            def picked(chunk_id: int | None) -> None:
                if chunk_id:
                    self._feedback(audit_id, "missing_source", chunk_id=chunk_id)

            self.app.push_screen(
                SourcePickScreen(lambda q: self.call("search", lambda: self.backend.search(q, 8))), picked
            )

    @work(thread=True, group="load")
    def _feedback(self, audit_id: int, kind: str, **fields) -> None:
        self.fetch("feedback", lambda: self.backend.feedback(audit_id, kind, **fields), self.Judged)

    @on(Judged)
    def _shown_judged(self, message: Judged) -> None:
        item = message.item
        self.notify(
            f"feedback {item.id} ({item.kind.replace('_', ' ')}) recorded on answer {item.answer_audit_id}"
        )
        self.post_message(Changed("feedback", "audit"))
