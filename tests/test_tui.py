"""The operator UI, driven by Textual's pilot over a real appliance home (the tiny model, the demo corpus)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input, Static, TabbedContent

from appliance.app import Appliance
from appliance.config import load_settings
from appliance.terminal import clean_text
from tui.app import ConfirmScreen, TextScreen, make_app

SIZES = [(80, 24), (120, 40)]


@pytest.fixture
def ui_home(tmp_path, demo_home) -> Path:
    home = tmp_path / "home"
    shutil.copytree(demo_home, home, symlinks=True)
    return home


def _app(home: Path):
    return make_app(Appliance(load_settings(home=home), long_lived=True))


async def _settle(pilot, app, until=lambda: True, seconds: float = 60) -> None:
    for _ in range(int(seconds / 0.05)):
        await pilot.pause(0.05)
        if until() and not app.busy and not [w for w in app.workers if w.is_running]:
            return
    raise AssertionError("the UI did not settle")


async def _ask(pilot, app, question: str) -> None:
    app.query_one("#question", Input).focus()
    await pilot.press(*question)
    await pilot.press("enter")
    await _settle(pilot, app, until=lambda: app.last_answer is not None)


async def _ingest_rfps(pilot, app, corpus_copy: Path) -> DataTable:
    """The three demo RFPs into a new collection from the documents screen; the table then lists 13."""
    await pilot.press("f3")
    app.query_one("#ingest-path", Input).value = str(corpus_copy / "rfps")
    app.query_one("#ingest-collection", Input).value = "new-rfps"
    app.query_one("#ingest-path", Input).focus()
    await pilot.press("enter")
    table = app.query_one("#documents-table", DataTable)
    await _settle(pilot, app, until=lambda: table.row_count == 13)
    return table


async def test_chat_round_trip_shows_sources_and_keeps_history(ui_home):
    app = _app(ui_home)
    async with app.run_test(size=(120, 40)) as pilot:
        await _settle(pilot, app)
        await _ask(pilot, app, "What is the code for a Database Administrator?")
        answer = app.last_answer
        sources = app.query_one("#sources", DataTable)
        assert sources.row_count == len(answer.sources) > 0
        assert "labor_categories.csv" in str(sources.get_row_at(0)[2])
        shown = [str(w.content) for w in app.query("#transcript Static")]
        assert any(clean_text(answer.answer)[:20] in s for s in shown), (answer.answer, shown)
        # Enter on a source opens it in full
        sources.focus()
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert isinstance(app.screen, TextScreen) and answer.sources[0].text[:30] in str(
            app.screen.query_one("#dialog-body", Static).content
        )
        await pilot.press("escape")
        # the passage the appliance found supporting the answer is named, and marked in its source
        assert answer.evidence, "the appliance names the sentence that supports the answer"
        n = answer.evidence[0]["n"]
        assert any(s.startswith(f"evidence [{n}]: ") for s in shown), shown
        sources.move_cursor(row=n - 1)
        await pilot.press("enter")
        await pilot.pause(0.2)
        body = app.screen.query_one("#dialog-body", Static).content
        marked = [body.plain[sp.start : sp.end] for sp in body.spans if "reverse" in str(sp.style)]
        assert marked == [clean_text(answer.evidence[0]["text"])]
        await pilot.press("escape")
        # a follow-up goes into the same stored conversation
        first = app.conversation
        app.last_answer = None
        await _ask(pilot, app, "And its title?")
        assert app.conversation == first
        messages = app.backend.store.messages(first)
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
        assert messages[1]["audit_id"] == answer.audit_id
        await pilot.press("ctrl+n")
        assert app.conversation is None and not list(app.query("#transcript Static"))


class HostileEngine:
    """A model whose output tries to retitle the terminal, clear it and inject Rich markup."""

    n_ctx = 512
    name = "hostile"
    OUTPUT = ["\x1b]0;pwned\x07", "\x1b[2J", "[bold red]", "ok", "[/bold red]", " \x07done"]

    def count_tokens(self, text: str) -> int:
        return len(text.split()) + 1

    def stream(self, messages, max_tokens, sampling):
        yield from self.OUTPUT

    def close(self) -> None:
        pass


async def test_escape_sequences_and_markup_in_model_output_are_inert(ui_home):
    app = _app(ui_home)
    async with app.run_test(size=(80, 24)) as pilot:
        await _settle(pilot, app)
        app.backend._engine = HostileEngine()
        await _ask(pilot, app, "hello")
        widget = app.query("#transcript Static.assistant").last()
        text = widget.content
        assert str(text) == "[bold red]ok[/bold red] done"
        # what the appliance adds after it (evidence, flags) is made inert the same way
        for line in app.query("#transcript Static").results():
            assert "\x1b" not in str(line.content) and "\x07" not in str(line.content)
        assert not text.spans  # no style came from the model's markup
        svg = app.export_screenshot()
        assert "pwned" not in svg and "[bold red]ok[/bold red]" in svg.replace("&#160;", " ")


@pytest.mark.parametrize("size", SIZES)
async def test_every_screen_fits_and_answers_the_keyboard(ui_home, size):
    app = _app(ui_home)
    async with app.run_test(size=size) as pilot:
        await _settle(pilot, app)
        screen = app.screen.region
        panes = {
            "f2": ("chat", ["#transcript", "#sources", "#question"]),
            "f3": ("documents", ["#ingest-path", "#ingest", "#documents-table"]),
            "f4": (
                "lookup",
                ["#lookup-query", "#lookup-table", "#draft-rfp", "#draft-go", "#draft-progress"],
            ),
            "f5": (
                "model",
                ["#model-info", "#bundle-path", "#bundle-install", "#bundle-rollback", "#generations-table"],
            ),
            "f6": ("audit", ["#audit-user", "#audit-verify", "#audit-table"]),
            "f7": ("feedback", ["#export-path", "#export-go", "#feedback-table"]),
        }
        for key, (tab, ids) in panes.items():
            await pilot.press(key)
            await pilot.pause(0.2)
            assert app.query_one(TabbedContent).active == tab
            for wid in ids:
                region = app.query_one(wid).region
                assert region.height > 0 and region.width > 0, (tab, wid, region)
                assert screen.contains_region(region), (tab, wid, region, size)
        assert app.query_one("#documents-table", DataTable).row_count == 10
        assert "generation 1" in str(app.query_one("#model-info", Static).content)
        await pilot.press("f1")
        assert isinstance(app.screen, TextScreen)
        await pilot.press("escape")


async def test_documents_ingest_with_progress_then_remove_after_confirmation(ui_home, corpus_copy):
    app = _app(ui_home)
    async with app.run_test(size=(120, 40)) as pilot:
        await _settle(pilot, app)
        table = await _ingest_rfps(pilot, app, corpus_copy)
        bar = app.query_one("#ingest-progress")
        assert bar.progress == bar.total
        table.focus()
        await pilot.press("enter")
        await pilot.pause(0.2)
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await _settle(pilot, app)
        assert table.row_count == 13
        await pilot.press("enter")
        await pilot.pause(0.2)
        await pilot.press("y")
        await _settle(pilot, app, until=lambda: table.row_count == 12)


async def test_rollback_asks_first_and_audit_verifies(ui_home):
    app = _app(ui_home)
    async with app.run_test(size=(120, 40)) as pilot:
        await _settle(pilot, app)
        await pilot.press("f5")
        await pilot.click("#bundle-rollback")
        await pilot.pause(0.2)
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await _settle(pilot, app)
        assert any("no previous generation" in n.message for n in app._notifications)
        await pilot.press("f6")
        await pilot.click("#audit-verify")
        await _settle(
            pilot, app, until=lambda: "intact" in str(app.query_one("#audit-status", Static).content)
        )
        assert app.query_one("#audit-table", DataTable).row_count > 0


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "keys",
    [[], ["f3"], ["f4"], ["f5"], ["f6"], ["f7"], ["f1"]],
    ids=["chat", "documents", "lookup", "model", "audit", "feedback", "help"],
)
def test_snapshot_each_screen(snap_compare, size, keys):
    """Each screen at 80x24 and 120x40, over fixed data (tests/tui_snapshot_app.py) so the SVG is stable."""
    from tui_snapshot_app import prepare

    app_path = Path(__file__).parent / "tui_snapshot_app.py"
    assert snap_compare(str(app_path), terminal_size=size, press=keys, run_before=prepare)


async def test_feedback_from_the_chat_then_export(ui_home, tmp_path):
    """Judge the last answer from the keyboard (good, correction, irrelevant source, missing source),
    see it on the feedback screen, export it signed."""
    from appliance.bundles import identity
    from appliance.records.feedback import verify_export
    from tui.app import CorrectionScreen, SourcePickScreen

    app = _app(ui_home)
    async with app.run_test(size=(120, 40)) as pilot:
        await _settle(pilot, app)
        await _ask(pilot, app, "What is the code for a Database Administrator?")
        await pilot.press("ctrl+g")
        await _settle(pilot, app)
        await pilot.press("ctrl+r")
        await pilot.pause(0.2)
        assert isinstance(app.screen, CorrectionScreen)
        area = app.screen.query_one("#correction")
        area.text = "The Database Administrator code is 15-1242.00 [1]."
        await pilot.press("ctrl+s")
        await _settle(pilot, app)
        app.query_one("#sources", DataTable).focus()
        await pilot.press("down", "x")  # the second source did not belong
        await _settle(pilot, app)
        await pilot.press("ctrl+o")
        await pilot.pause(0.2)
        assert isinstance(app.screen, SourcePickScreen)
        await pilot.press(*"Cloud Architect", "enter")
        picks = app.screen.query_one("#pick-table", DataTable)
        await _settle(pilot, app, until=lambda: picks.row_count > 0)
        await pilot.press("enter")
        await _settle(pilot, app)
        items = app.backend.feedback_items()
        assert [i["kind"] for i in items] == ["good", "correction", "irrelevant_source", "missing_source"]
        assert items[1]["correction"].endswith("15-1242.00 [1].") and items[2]["source_n"] == 2
        await pilot.press("f7")
        table = app.query_one("#feedback-table", DataTable)
        await _settle(pilot, app, until=lambda: table.row_count == 4)
        app.query_one("#export-path", Input).value = str(tmp_path / "usb" / "feedback")
        await pilot.click("#export-go")
        status = app.query_one("#feedback-status", Static)
        await _settle(pilot, app, until=lambda: "exported 4 items" in str(status.content))
    key = identity.load_public((ui_home / "identity" / "appliance.pub").read_bytes())
    verified = verify_export(tmp_path / "usb" / "feedback", {identity.key_id(key): key})
    assert verified.manifest["files"]["dpo.jsonl"]["records"] == 1


async def test_through_the_running_service(ui_home, corpus_copy, tmp_path, monkeypatch):
    """With a service running, the UI holds no model and opens no database: it asks, ingests (sending
    the files it read), looks up and drafts through the socket, and the service records the turns."""
    import tempfile

    from running import sqlite_rows, start_service, stop_service

    from appliance.client import ServiceClient

    sockdir = Path(tempfile.mkdtemp(prefix="appliance-tui-"))
    sock = sockdir / "api.sock"
    proc = start_service(ui_home, sock)
    monkeypatch.chdir(tmp_path)  # the draft is written to the working directory
    client = ServiceClient(sock)
    try:
        app = make_app(client)
        async with app.run_test(size=(120, 40)) as pilot:
            await _settle(pilot, app)
            assert "generation 1" in str(app.query_one("#model-info", Static).content)
            assert app.query_one("#documents-table", DataTable).row_count == 10
            await _ask(pilot, app, "What is the code for a Database Administrator?")
            assert app.last_answer.sources and app.last_answer.audit_id
            app.last_answer = None
            await _ask(pilot, app, "And its duties?")
            # ingest: the UI reads the files and uploads them
            await _ingest_rfps(pilot, app, corpus_copy)
            # lookup, then a draft with progress
            await pilot.press("f4")
            await pilot.press(*"15-12", "enter")
            lookup = app.query_one("#lookup-table", DataTable)
            await _settle(pilot, app, until=lambda: lookup.row_count > 1)
            assert all(str(lookup.get_row_at(i)[0]).startswith("15-12") for i in range(lookup.row_count))
            app.query_one("#draft-rfp", Input).value = str(
                corpus_copy / "rfps" / "RFP-2026-EPA-data-platform.pdf"
            )
            app.query_one("#draft-rfp", Input).focus()
            (tmp_path / "RFP-2026-EPA-data-platform-draft.md").write_text("an earlier draft, edited by hand")
            await pilot.press("enter")
            status = app.query_one("#draft-status", Static)
            await _settle(pilot, app, until=lambda: "wrote" in str(status.content), seconds=120)
            # a file of that name is never replaced: the draft takes the next free name
            assert (
                tmp_path / "RFP-2026-EPA-data-platform-draft.md"
            ).read_text() == "an earlier draft, edited by hand"
            assert (tmp_path / "RFP-2026-EPA-data-platform-draft-2.md").read_text().startswith("#")
            assert "RFP-2026-EPA-data-platform-draft-2.md" in str(status.content)
            assert app.query_one("#draft-progress").progress == app.query_one("#draft-progress").total
            # feedback on the last answer, then a signed export written here, by the UI, not the service
            await pilot.press("f2", "ctrl+g")
            await _settle(pilot, app)
            await pilot.press("f7")
            app.query_one("#export-path", Input).value = str(tmp_path / "export")
            await pilot.click("#export-go")
            await _settle(
                pilot,
                app,
                until=lambda: "exported 1 items" in str(app.query_one("#feedback-status", Static).content),
            )
        with sqlite_rows(ui_home) as conn:
            turns = conn.execute(
                "SELECT role, content FROM messages WHERE conversation_id = ? ORDER BY id",
                (app.conversation,),
            ).fetchall()
            sources = {
                r[0]
                for r in conn.execute(
                    "SELECT source FROM documents d JOIN collections c ON "
                    "c.id = d.collection_id WHERE c.name = 'new-rfps'"
                )
            }
        assert [r for r, _ in turns] == ["user", "assistant"] * 2 and turns[2][1] == "And its duties?"
        assert sources == {str(p.resolve()) for p in (corpus_copy / "rfps").iterdir()}
        assert (
            json.loads((tmp_path / "export" / "ratings.jsonl").read_text())["answer"] == turns[3][1].strip()
        )
    finally:
        client.close()
        stop_service(proc, sock)
        sockdir.rmdir()


async def test_the_ui_survives_the_service_stopping_and_recovers_when_it_is_back(ui_home):
    """The service stops under a running UI: a lookup says the service is not answering (the UI stays
    up); once the service is back on its socket the same lookup is answered."""
    import tempfile

    from running import start_service, stop_service

    from appliance.client import ServiceClient

    sockdir = Path(tempfile.mkdtemp(prefix="appliance-tui-"))
    sock = sockdir / "api.sock"
    proc = start_service(ui_home, sock)
    client = ServiceClient(sock)
    try:
        app = make_app(client)
        async with app.run_test(size=(120, 40)) as pilot:
            await _settle(pilot, app)
            stop_service(proc, sock)
            await pilot.press("f4")
            await pilot.press(*"15-12", "enter")
            await _settle(pilot, app)
            errors = [n for n in app._notifications if n.severity == "error"]
            assert errors and "not answering" in errors[-1].message, [n.message for n in app._notifications]
            assert app.is_running and app.query_one("#lookup-table", DataTable).row_count == 0
            proc = start_service(ui_home, sock)
            app.query_one("#lookup-query", Input).focus()
            await pilot.press("enter")
            lookup = app.query_one("#lookup-table", DataTable)
            await _settle(pilot, app, until=lambda: lookup.row_count > 1)
            assert str(lookup.get_row_at(0)[0]).startswith("15-12")
    finally:
        client.close()
        if proc.poll() is None:
            stop_service(proc, sock)
        sockdir.rmdir()


def test_model_pane_shows_the_builders_evaluation(demo_home):
    """The Model pane reads the evaluation the builder wrote (eval.json's shape, through the contract's
    EvalSummary): each quant's perplexity as a number and the gate's verdict with its limits, never
    "None" or raw JSON."""
    from tui.panes.model import status_lines

    with Appliance(load_settings(home=demo_home)) as app:
        status = app.status()
    evaluation = json.loads((demo_home / "current" / "generation.json").read_text())["lineage"]["evaluation"]
    lines = status_lines(status)
    for quant, measured in evaluation["perplexity"].items():
        assert (
            f"perplexity {quant}: {measured['perplexity']:.2f} ({measured['tokens_scored']:,} tokens)"
            in lines
        )
    gate = next(line for line in lines if line.startswith("release gate"))
    assert gate.startswith("release gate passed" if evaluation["gate"]["passed"] else "release gate FAILED")
    assert "max ppl increase" in gate and "{" not in gate
    assert not any("None" in line for line in lines), lines


def test_model_pane_lists_a_failed_gates_reasons():
    from appliance.schemas import Status
    from tui.panes.model import status_lines

    status = Status.model_validate(
        {
            "home": "/h",
            "generation": 3,
            "model": {"name": "m", "quant": "Q4_K_M", "parameters": 1, "size": 1},
            "embedder": {"name": "e", "dim": 384},
            "lineage": {
                "evaluation": {
                    "perplexity": {"F16": 20.0, "Q4_K_M": {"perplexity": 25.5}},
                    "gate": {
                        "passed": False,
                        "failures": ["Q4_K_M: perplexity 25.5 is 28% above F16"],
                        "max_ppl_increase": 0.1,
                        "kind": None,
                    },
                }
            },
        }
    )
    lines = status_lines(status)
    assert "release gate FAILED (max ppl increase 0.1)" in lines
    assert "  Q4_K_M: perplexity 25.5 is 28% above F16" in lines
    assert "perplexity F16: 20.00" in lines and "perplexity Q4_K_M: 25.50" in lines


def test_a_draft_never_replaces_a_file_or_follows_a_planted_link(tmp_path):
    from tui.panes.lookup import write_new

    target = tmp_path / "elsewhere.txt"
    (tmp_path / "rfp-draft.md").symlink_to(target)  # dangling: writing through it would create target
    out = write_new(tmp_path, "rfp-draft", ".md", "# draft")
    assert out == tmp_path / "rfp-draft-2.md" and out.read_text() == "# draft" and not target.exists()
    assert write_new(tmp_path, "rfp-draft", ".md", "# again") == tmp_path / "rfp-draft-3.md"
