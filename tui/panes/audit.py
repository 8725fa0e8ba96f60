"""Audit: the log's rows, filtered by user or action, and the chain verified against its checkpoints."""

from __future__ import annotations

import json

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Button, DataTable, Input, Static

from appliance.schemas import AuditVerdict
from tui.panes import Pane
from tui.widgets import inert


def verdict(data: AuditVerdict) -> str:
    bad = data.first_bad_row
    if data.intact:
        return f"audit chain intact: {data.rows} rows, {data.checkpoints} signed checkpoints"
    if bad is not None:
        return f"audit chain BROKEN at row {bad} (of {data.rows}): that row or the one before it was altered"
    return "audit log CUT OR REPLACED: " + "; ".join(data.problems)


class AuditPane(Pane):
    class Rows(Message):
        def __init__(self, rows: list[dict]):
            super().__init__()
            self.rows = rows

    class Verified(Message):
        def __init__(self, result: AuditVerdict):
            super().__init__()
            self.result = result

    def compose(self) -> ComposeResult:
        with Horizontal(classes="row"):
            yield Input(placeholder="user", id="audit-user")
            yield Input(placeholder="action (ask, ingest, install...)", id="audit-action")
            yield Button("Verify chain", id="audit-verify")
        yield Static(id="audit-status")
        yield DataTable(id="audit-table", cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#audit-table", DataTable).add_columns("id", "time", "user", "action", "gen", "detail")

    def reload(self) -> None:
        self._rows(
            self.query_one("#audit-user", Input).value.strip() or None,
            self.query_one("#audit-action", Input).value.strip() or None,
        )

    @on(Input.Submitted, "#audit-user")
    @on(Input.Submitted, "#audit-action")
    def filter(self) -> None:
        self.reload()

    @work(thread=True, group="load")
    def _rows(self, user: str | None, action: str | None) -> None:
        self.fetch("audit", lambda: self.backend.audit_rows(action, user, 200), self.Rows)

    @on(Rows)
    def _show(self, message: Rows) -> None:
        table = self.query_one("#audit-table", DataTable)
        table.clear()
        for e in message.rows:
            detail = json.dumps(e["detail"], separators=(",", ":"))
            table.add_row(
                str(e["id"]),
                e["time"],
                inert(e["user"]),
                e["action"],
                str(e["generation"] or "-"),
                inert(detail[:120]),
            )

    @on(Button.Pressed, "#audit-verify")
    def verify(self) -> None:
        self._verify()

    @work(thread=True, group="load")
    def _verify(self) -> None:
        self.fetch("audit", self.backend.audit_verify, self.Verified)

    @on(Verified)
    def _verified(self, message: Verified) -> None:
        self.query_one("#audit-status", Static).update(inert(verdict(message.result)))
