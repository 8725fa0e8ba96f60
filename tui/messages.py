"""Messages every pane may post: they bubble to the app, which shows them or tells other panes. Each
pane's own results are typed messages of that pane (tui/panes/)."""

from __future__ import annotations

from textual.message import Message


class Failed(Message):
    """A call into the backend failed; the app shows it and carries on."""

    def __init__(self, where: str, error: str):
        super().__init__()
        self.where, self.error = where, error


class Progress(Message):
    """Long work moved on: `bar` is the id of the pane's progress bar, `label` goes on the status line."""

    def __init__(self, bar: str, done: float, total: float, label: str = ""):
        super().__init__()
        self.bar, self.done, self.total, self.label = bar, done, total, label


class Changed(Message):
    """Something a pane did changes what other panes show: `areas` among "status", "documents",
    "generations", "audit", "feedback"."""

    def __init__(self, *areas: str):
        super().__init__()
        self.areas = set(areas)
