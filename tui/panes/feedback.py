"""Feedback: what operators judged, and the signed export for the builder (written here, by this user)."""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Button, DataTable, Input, Static

from appliance.schemas import ExportWritten
from tui.messages import Changed
from tui.panes import Pane
from tui.widgets import inert


class FeedbackPane(Pane):
    class Items(Message):
        def __init__(self, items: list[dict]):
            super().__init__()
            self.items = items

    class Exported(Message):
        def __init__(self, result: ExportWritten):
            super().__init__()
            self.result = result

    def compose(self) -> ComposeResult:
        with Horizontal(classes="row"):
            yield Input(placeholder="directory to export to (a USB stick)", id="export-path")
            yield Button("Export", id="export-go", variant="primary")
        yield Static(id="feedback-status")
        yield DataTable(id="feedback-table", cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#feedback-table", DataTable).add_columns(
            "id", "time", "user", "kind", "answer", "state", "question"
        )

    def reload(self) -> None:
        self._items()

    @work(thread=True, group="load")
    def _items(self) -> None:
        self.fetch("feedback", lambda: self.backend.feedback_items(limit=500), self.Items)

    @on(Items)
    def _show(self, message: Items) -> None:
        table = self.query_one("#feedback-table", DataTable)
        table.clear()
        for f in reversed(message.items):  # newest first
            table.add_row(
                str(f["id"]),
                f["time"],
                inert(f["user"]),
                f["kind"],
                str(f["answer_audit_id"]),
                "exported" if f["export_id"] else "pending",
                inert(f["question"][:80]),
            )

    @on(Input.Submitted, "#export-path")
    @on(Button.Pressed, "#export-go")
    def export(self) -> None:
        if out := self.typed_path("#export-path", "a directory to export to"):
            self._export(out)

    @work(thread=True, group="load")
    def _export(self, out: Path) -> None:
        self.fetch("export", lambda: self.backend.feedback_export(out), self.Exported)

    @on(Exported)
    def _exported(self, message: Exported) -> None:
        data = message.result
        counts = ", ".join(f"{n} {name.removesuffix('.jsonl')}" for name, n in data.counts.items())
        self.query_one("#feedback-status", Static).update(
            inert(f"exported {data.items} items to {data.out} ({counts}), signed; export {data.export_id}")
        )
        self.post_message(Changed("feedback", "audit"))
