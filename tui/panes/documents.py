"""Documents: ingest a file or folder (read here, uploaded when the service runs), list, remove."""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Button, DataTable, Input, ProgressBar

from appliance.terminal import clean_text
from tui.messages import Changed, Progress
from tui.panes import Pane
from tui.screens import ConfirmScreen
from tui.widgets import inert


class DocumentsPane(Pane):
    class Listed(Message):
        def __init__(self, rows: list):
            super().__init__()
            self.rows = rows

    class Ingested(Message):
        def __init__(self, report):
            super().__init__()
            self.report = report

    class Removed(Message):
        def __init__(self, row):
            super().__init__()
            self.row = row

    def compose(self) -> ComposeResult:
        with Horizontal(classes="row"):
            yield Input(placeholder="file or folder to ingest", id="ingest-path")
            yield Input(value="default", placeholder="collection", id="ingest-collection")
            yield Button("Ingest", id="ingest")
        yield ProgressBar(total=1, id="ingest-progress", show_eta=False)  # idle: 0%, not an animation
        yield DataTable(id="documents-table", cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#documents-table", DataTable).add_columns(
            "id", "collection", "chunks", "sha256", "document"
        )

    def reload(self) -> None:
        self._list()

    @work(thread=True, group="load")
    def _list(self) -> None:
        self.fetch("documents", self.backend.documents, self.Listed)

    @on(Listed)
    def _listed(self, message: Listed) -> None:
        table = self.query_one("#documents-table", DataTable)
        table.clear()
        for d in message.rows:
            table.add_row(
                str(d.id),
                inert(d.collection),
                str(d.chunks),
                d.sha256[:12],
                inert(Path(d.source).name),
                key=str(d.id),
            )

    @on(Input.Submitted, "#ingest-path")
    @on(Button.Pressed, "#ingest")
    def ingest(self) -> None:
        if path := self.typed_path("#ingest-path", "a file or folder to ingest"):
            self._ingest(path, self.query_one("#ingest-collection", Input).value.strip() or "default")

    @work(thread=True, group="ingest")
    def _ingest(self, path: Path, collection: str) -> None:
        report = self.call(
            "ingest",
            lambda: self.backend.ingest(
                [path],
                collection,
                progress=lambda item, done, total: self.post_message(
                    Progress("#ingest-progress", done, total, Path(item).name if item else "")
                ),
            ),
        )
        if report is not None:
            self.post_message(Progress("#ingest-progress", 1, 1))
            self.post_message(self.Ingested(report))

    @on(Ingested)
    def _ingested(self, message: Ingested) -> None:
        r = message.report
        skipped = ""
        if r.skipped:
            names = ", ".join(clean_text(Path(s["source"]).name) for s in r.skipped[:5])
            skipped = f", {len(r.skipped)} skipped ({names}{' ...' if len(r.skipped) > 5 else ''}: not a type read, or hidden)"
        self.notify(
            f"{len(r.added)} added, {len(r.unchanged)} unchanged, {len(r.failed)} failed{skipped}",
            severity="error" if r.failed else "warning" if r.skipped else "information",
            markup=False,  # file names are the folder's, not ours: "[b]" in one is text
        )
        self.post_message(Changed("documents", "status", "audit"))

    @on(DataTable.RowSelected, "#documents-table")
    def remove_document(self, event: DataTable.RowSelected) -> None:
        doc_id = int(event.row_key.value)

        def answered(yes: bool | None) -> None:
            if yes:
                self._remove(doc_id)

        self.app.push_screen(ConfirmScreen(f"Remove document {doc_id}, its chunks and vectors?"), answered)

    @work(thread=True, group="ingest")
    def _remove(self, doc_id: int) -> None:
        self.fetch("remove", lambda: self.backend.remove_document(doc_id), self.Removed)

    @on(Removed)
    def _removed(self, message: Removed) -> None:
        self.notify(inert(f"removed {Path(message.row.source).name}").plain, markup=False)
        self.post_message(Changed("documents", "status", "audit"))
