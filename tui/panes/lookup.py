"""Lookup and draft: reference-table rows by code, prefix or title words (no model); a proposal draft
from an RFP file, written to the working directory."""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Button, DataTable, Input, ProgressBar, Static

from appliance.schemas import DraftReport
from tui.messages import Changed, Failed, Progress
from tui.panes import Pane
from tui.widgets import inert


class LookupPane(Pane):
    class Found(Message):
        def __init__(self, rows: list[dict]):
            super().__init__()
            self.rows = rows

    class Drafted(Message):
        def __init__(self, out: Path, result: DraftReport):
            super().__init__()
            self.out, self.result = out, result

    def compose(self) -> ComposeResult:
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

    def on_mount(self) -> None:
        self.query_one("#lookup-table", DataTable).add_columns("code", "title", "match", "source")

    @on(Input.Submitted, "#lookup-query")
    @on(Button.Pressed, "#lookup-go")
    def lookup(self) -> None:
        query = self.query_one("#lookup-query", Input).value.strip()
        if query:
            self._lookup(query)

    @work(thread=True, group="load")
    def _lookup(self, query: str) -> None:
        self.fetch("lookup", lambda: self.backend.lookup(query, None, 200), self.Found)

    @on(Found)
    def _found(self, message: Found) -> None:
        table = self.query_one("#lookup-table", DataTable)
        table.clear()
        for r in message.rows:
            table.add_row(
                inert(r["code"] or "-"), inert(r["title"] or "-"), r["match"], inert(Path(r["source"]).name)
            )
        if not message.rows:
            self.notify("no reference row matches", severity="warning")

    @on(Input.Submitted, "#draft-rfp")
    @on(Button.Pressed, "#draft-go")
    def draft(self) -> None:
        if rfp := self.typed_path("#draft-rfp", "the RFP file to draft from"):
            collections = [
                c.strip() for c in self.query_one("#draft-collections", Input).value.split(",") if c.strip()
            ]
            self._draft(rfp, collections or None, Path.cwd())

    @work(thread=True, group="ask")
    def _draft(self, rfp: Path, collections: list[str] | None, folder: Path) -> None:
        def progress(item, done, total):
            self.post_message(Progress("#draft-progress", done, total, f"requirement {item}" if item else ""))

        result = self.call("draft", lambda: self.backend.draft(rfp, collections, progress=progress))
        if result is None:
            return
        try:
            out = write_new(folder, f"{rfp.stem}-draft", ".md", result.markdown)
        except OSError as exc:
            self.post_message(Failed("draft", f"{folder}: cannot write the draft ({exc.strerror})"))
            return
        self.post_message(self.Drafted(out, result))

    @on(Drafted)
    def _drafted(self, message: Drafted) -> None:
        result = message.result
        lines = [f"wrote {message.out}: {result.summary()}", *result.warnings()]
        self.query_one("#draft-status", Static).update(inert("\n".join(lines)))
        self.post_message(Changed("audit"))


def write_new(folder: Path, stem: str, suffix: str, text: str, tries: int = 100) -> Path:
    """Write `text` to `folder/stem+suffix`, or to `stem-2`, `stem-3` ... when that exists: a draft
    never replaces a file (an earlier draft, or anything else of that name), and never follows a link
    planted in its place (the file is created exclusively)."""
    for n in range(1, tries + 1):
        out = folder / f"{stem}{'' if n == 1 else f'-{n}'}{suffix}"
        try:
            fh = out.open("x", encoding="utf-8")
        except FileExistsError:
            continue
        try:
            with fh:
                fh.write(text)
        except BaseException:
            out.unlink(missing_ok=True)  # nothing half-written is left behind
            raise
        return out
    raise FileExistsError(17, f"{stem}{suffix} and {tries - 1} numbered copies exist", str(folder))
