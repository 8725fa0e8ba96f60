"""Model and bundles: what is serving (generation, model, embedder, lineage, release gate), the
installed generations, and verify, install and rollback of signed bundles."""

from __future__ import annotations

from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Button, DataTable, Input, ProgressBar, Static

from appliance import schemas
from tui.messages import Changed, Progress
from tui.panes import Pane
from tui.screens import ConfirmScreen
from tui.widgets import inert


def status_lines(s: schemas.Status) -> list[str]:
    m, e = s.model, s.embedder
    lines = [
        f"generation {s.generation}" + (f", signed bundle v{s.version}" if s.version else ", unsigned"),
        f"model      {m['name']} {m['quant']}, {m['parameters']:,} parameters, {m['size'] / 1e6:.1f} MB",
        f"embedder   {e['name']} ({e['dim']}-d)",
        f"memory     {s.resident_mb:.0f} MB resident" if s.resident_mb else "memory     -",
    ]
    stages = s.lineage.get("stages") or {}
    names = list(stages) if isinstance(stages, dict) else [str(st.get("stage", "?")) for st in stages]
    if names:
        lines.append("lineage    " + " -> ".join(names))
    evaluation = s.evaluation
    if evaluation and evaluation.gate:
        gate = evaluation.gate
        limits = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in gate.limits().items())
        lines.append(
            f"release gate {'passed' if gate.passed else 'FAILED'}" + (f" ({limits})" if limits else "")
        )
        lines.extend(f"  {failure}" for failure in gate.failures)
    for quant, ppl in (evaluation.perplexity if evaluation else {}).items():
        scored = f" ({ppl.tokens_scored:,} tokens)" if ppl.tokens_scored else ""
        lines.append(f"perplexity {quant}: {ppl.perplexity:.2f}{scored}")
    return lines


class ModelPane(Pane):
    class Status(Message):
        def __init__(self, status: dict):
            super().__init__()
            self.status = status

    class Generations(Message):
        def __init__(self, rows: list[dict]):
            super().__init__()
            self.rows = rows

    class Done(Message):
        """A verify, install or rollback finished: `text` says how."""

        def __init__(self, text: str):
            super().__init__()
            self.text = text

    def compose(self) -> ComposeResult:
        yield Static(id="model-info")
        with Horizontal(classes="row"):
            yield Input(placeholder="bundle directory (a mounted USB stick)", id="bundle-path")
            yield Button("Verify", id="bundle-verify")
            yield Button("Install", id="bundle-install", variant="primary")
            yield Button("Rollback", id="bundle-rollback", variant="warning")
        yield ProgressBar(total=1, id="bundle-progress", show_eta=False)
        yield DataTable(id="generations-table", cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#generations-table", DataTable).add_columns(
            "gen", "state", "version", "name", "quant", "installed"
        )

    def reload(self, status: bool = True, generations: bool = True) -> None:
        self._load(status, generations)

    @work(thread=True, group="load")
    def _load(self, status: bool, generations: bool) -> None:
        if status:
            self.fetch("status", self.backend.status, self.Status)
        if generations:
            self.fetch("generations", lambda: self.backend.generations().generations, self.Generations)

    @on(Status)
    def _status(self, message: Status) -> None:
        self.query_one("#model-info", Static).update(inert("\n".join(status_lines(message.status))))

    @on(Generations)
    def _generations(self, message: Generations) -> None:
        table = self.query_one("#generations-table", DataTable)
        table.clear()
        for r in message.rows:
            state = "current" if r["current"] else "previous" if r["previous"] else ""
            table.add_row(
                str(r["generation"]),
                state,
                f"v{r['version']}" if r["version"] else "unsigned",
                inert(r.get("name") or "-"),
                r.get("quant") or "-",
                r["installed"],
            )

    @on(Button.Pressed, "#bundle-verify")
    def verify_bundle(self) -> None:
        if path := self.typed_path("#bundle-path", "the bundle's directory (a mounted USB stick)"):
            self._bundle("verify", path)

    @on(Button.Pressed, "#bundle-install")
    def install_bundle(self) -> None:
        if path := self.typed_path("#bundle-path", "the bundle's directory (a mounted USB stick)"):
            self._bundle("install", path)

    @work(thread=True, group="bundle")
    def _bundle(self, what: str, path: Path) -> None:
        def progress(name, done, total):
            self.post_message(Progress("#bundle-progress", done, total, name))

        if what == "verify":
            if (v := self.call("verify", lambda: self.backend.verify_bundle(path, progress))) is not None:
                self.post_message(
                    self.Done(f"bundle {v.bundle.name} version {v.version}: signatures and hashes OK")
                )
        elif (
            r := self.call("install", lambda: self.backend.install_bundle(path, progress=progress))
        ) is not None:
            self.post_message(self.Done(r.message))

    @on(Button.Pressed, "#bundle-rollback")
    def rollback(self) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self._rollback()

        self.app.push_screen(
            ConfirmScreen("Return to the previous generation? The current one stays installed."), answered
        )

    @work(thread=True, group="bundle")
    def _rollback(self) -> None:
        if (moved := self.call("rollback", self.backend.rollback)) is not None:
            self.post_message(self.Done(f"rolled back from generation {moved[0]} to {moved[1]}"))

    @on(Done)
    def _done(self, message: Done) -> None:
        self.notify(inert(message.text).plain, markup=False)
        self.post_message(Changed("status", "generations", "documents", "audit"))
