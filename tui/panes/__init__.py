"""One module per pane of the operator UI. Each owns its widgets, its workers (which take their inputs
as arguments and post one typed message per result) and the handlers that show them."""

from __future__ import annotations

from pathlib import Path

from textual.containers import Vertical
from textual.widgets import Input


class Pane(Vertical):
    """A pane: `reload()` fetches what it shows; `call(where, fn)` is the app's one way into the backend
    (None after a failure the app has shown)."""

    @property
    def backend(self):
        return self.app.backend

    def call(self, where: str, fn):
        return self.app.call(where, fn)

    def fetch(self, where: str, fn, message) -> None:
        """On a worker: `fn()` through `call`, its result posted to this pane as `message(result)`
        (nothing is posted after a failure: the app has shown it)."""
        result = self.call(where, fn)
        if result is not None:
            self.post_message(message(result))

    def reload(self) -> None:
        """Fetch what this pane shows (in a worker); panes with nothing to fetch keep this."""

    def typed_path(self, field: str, asking: str) -> Path | None:
        """The path typed in `field`, or None after asking for one."""
        typed = self.query_one(field, Input).value.strip()
        if not typed:
            self.notify(f"give {asking}", severity="warning")
            return None
        return Path(typed).expanduser()
