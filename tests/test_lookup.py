"""`appliance lookup`: exact code, code prefix, title words; straight from the reference table."""

import json

from click.testing import CliRunner

from appliance.cli import cli
from appliance.errors import ExitCode


def _lookup(home, *args):
    result = CliRunner().invoke(cli, ["--home", str(home), "lookup", *args, "--json"])
    return result, (json.loads(result.stdout)["rows"] if result.exit_code == 0 else None)


def test_exact_code_then_prefix(demo_home):
    _, rows = _lookup(demo_home, "15-1252.00")
    assert [(r["code"], r["title"], r["match"]) for r in rows] == [
        ("15-1252.00", "Software Developer", "exact code")
    ]
    assert rows[0]["data"]["education"].startswith("Bachelor's degree") and rows[0]["data"]["years"] == "3"
    _, rows = _lookup(demo_home, "15-1252")
    assert [r["code"] for r in rows] == ["15-1252.00", "15-1252.01", "15-1252.02", "15-1252.03"]
    assert {r["match"] for r in rows} == {"code prefix"}
    _, rows = _lookup(demo_home, "15-12")
    assert len(rows) == 20 and all(r["code"].startswith("15-12") for r in rows)


def test_title_words_rank_full_matches_first(demo_home):
    _, rows = _lookup(demo_home, "database administrator")
    assert [r["title"] for r in rows[:2]] == ["Database Administrator", "Senior Database Administrator"]
    assert rows[0]["match"] == "all title words"
    assert all(r["match"] != "all title words" for r in rows[2:])


def test_no_match_is_exit_3_and_collection_filter(demo_home):
    result = CliRunner().invoke(cli, ["--home", str(demo_home), "lookup", "astronaut"])
    assert result.exit_code == ExitCode.NOT_FOUND and "no reference row matches" in result.output
    _, rows = _lookup(demo_home, "15-1252.00", "--collection", "proposals")
    assert rows == []
