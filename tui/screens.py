"""The modal screens: a text (a source in full, the help), a yes/no question, the correction editor,
and the search for a source that should have been found."""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, Static, TextArea

from appliance.terminal import clean_text
from tui.widgets import inert


class TextScreen(ModalScreen):
    """A scrollable text (a full source, the help), closed with Escape."""

    BINDINGS = [Binding("escape", "dismiss", "Close")]

    def __init__(self, title: str, body: str, highlight: tuple[int, int] | None = None):
        """`highlight`: (start, end) of the body to mark (the sentence that supports an answer)."""
        super().__init__()
        self.title_text, self.body, self.highlight = title, body, highlight

    def compose(self) -> ComposeResult:
        text = inert(self.body)
        if self.highlight:  # each part made inert apart, so the marked span stays where it was
            start, end = self.highlight
            text = inert(self.body[:start])
            marked = inert(self.body[start:end])
            marked.stylize("reverse")
            text.append_text(marked)
            text.append_text(inert(self.body[end:]))
        with Vertical(id="dialog"):
            yield Label(inert(self.title_text), id="dialog-title")
            with VerticalScroll():
                yield Static(text, id="dialog-body")
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
            yield Label(
                "Search for the source that should have been found; Enter on a result picks it",
                id="dialog-title",
            )
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
            table.add_row(
                str(h.chunk_id),
                inert(Path(h.source).name),
                inert(" ".join(h.text.split())[:120]),
                key=str(h.chunk_id),
            )
        table.focus()

    @on(DataTable.RowSelected, "#pick-table")
    def pick(self, event: DataTable.RowSelected) -> None:
        self.dismiss(int(event.row_key.value))

    def action_cancel(self) -> None:
        self.dismiss(None)
