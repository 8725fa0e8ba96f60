"""Small pieces every pane uses: inert text and the sources table."""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable

from appliance.terminal import clean_text


def inert(text: str) -> Text:
    """Text for the terminal: no escape sequences, no control characters, no markup."""
    return Text(clean_text(text))


class SourcesTable(DataTable):
    BINDINGS = [Binding("x", "app.irrelevant", "Irrelevant source")]
