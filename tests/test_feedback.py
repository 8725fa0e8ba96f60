"""Operator feedback: tied to the audited answer, exported signed with the appliance's own key, verified
and deduplicated by the builder. Real answers from the tiny model, real ed25519 keys, real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.app import Appliance
from appliance.bundles import identity
from appliance.config import load_settings
from appliance.errors import ExitCode, FeedbackError, NotFoundError
from appliance.records.feedback import verify_export
from builder.feedback import import_exports

QUESTION = "What is the code for a Database Administrator?"
CORRECTION = "The Database Administrator labor category is 15-1242.00 [1]."


@pytest.fixture
def site(tmp_path, demo_home):
    """A copy of the demo home with answers in a conversation and feedback on them."""
    home = tmp_path / "home"
    shutil.copytree(demo_home, home, symlinks=True)
    with Appliance(load_settings(home=home)) as app:
        conversation = app.new_conversation()
        first = app.ask(QUESTION, conversation=conversation, max_tokens=8, temperature=0)
        second = app.ask(
            "Which roles need a security clearance?", conversation=conversation, max_tokens=8, temperature=0
        )
        missing = app.search("Cloud Architect 15-1241.00", k=1)[0]
        app.feedback(first.audit_id, "correction", correction=CORRECTION, note="wrong code")
        app.feedback(first.audit_id, "irrelevant_source", source=2)
        app.feedback(second.audit_id, "good")
        app.feedback(second.audit_id, "missing_source", chunk_id=missing.chunk_id)
        yield {"home": home, "app": app, "first": first, "second": second, "missing": missing}


def test_feedback_is_tied_to_the_audited_answer_and_audited(site):
    app, first = site["app"], site["first"]
    items = app.feedback_items()
    assert [i["kind"] for i in items] == ["correction", "irrelevant_source", "good", "missing_source"]
    correction = items[0]
    assert correction["question"] == QUESTION and correction["answer"] == first.answer
    assert correction["model_sha256"] == first.model["sha256"] and correction["generation"] == 1
    assert [s["chunk_id"] for s in correction["sources"]] == [h.chunk_id for h in first.sources]
    rows = app.audit_rows("feedback")
    assert {r["detail"]["feedback_id"] for r in rows} == {i["id"] for i in items}
    assert {r["id"] for r in rows} == {i["audit_id"] for i in items}
    assert app.audit_verify().intact is True
    # refused with the reason
    not_an_answer = app.audit_rows("feedback")[0]["id"]
    with pytest.raises(NotFoundError, match="is not an answer"):
        app.feedback(not_an_answer, "good")
    with pytest.raises(FeedbackError, match="needs the corrected answer"):
        app.feedback(first.audit_id, "correction", correction="  ")
    with pytest.raises(FeedbackError, match="not one of the answer's"):
        app.feedback(first.audit_id, "irrelevant_source", source=99)
    with pytest.raises(FeedbackError, match="no chunk"):
        app.feedback(first.audit_id, "missing_source", chunk_id=10**9)


def test_an_answer_outside_a_conversation_needs_its_text_and_it_must_match(site):
    app = site["app"]
    loose = app.ask(QUESTION, max_tokens=6, temperature=0)  # as an API client would get it
    with pytest.raises(FeedbackError, match="send the question and the answer"):
        app.feedback(loose.audit_id, "bad")
    with pytest.raises(FeedbackError, match="answer does not match"):
        app.feedback(loose.audit_id, "bad", question=QUESTION, answer=loose.answer + " (edited)")
    with pytest.raises(FeedbackError, match="question does not match"):
        app.feedback(loose.audit_id, "bad", question="another question", answer=loose.answer)
    assert app.feedback(loose.audit_id, "bad", question=QUESTION, answer=loose.answer).kind == "bad"


def _export(site, tmp_path, name="export", since=None) -> Path:
    out = tmp_path / name
    site["app"].feedback_export(out, since=since)
    return out


def _trusted(home: Path) -> dict:
    key = identity.load_public((home / "identity" / "appliance.pub").read_bytes())
    return {identity.key_id(key): key}


def test_export_is_signed_and_holds_only_what_the_operator_saw(site, tmp_path):
    app, first, second, missing = site["app"], site["first"], site["second"], site["missing"]
    out = _export(site, tmp_path)
    verified = verify_export(out, _trusted(site["home"]))
    records = verified.records
    assert [len(records[n]) for n in ("sft.jsonl", "dpo.jsonl", "retrieval.jsonl", "ratings.jsonl")] == [
        2,
        1,
        2,
        1,
    ]
    dpo = records["dpo.jsonl"][0]
    assert dpo["chosen"] == CORRECTION and dpo["rejected"] == first.answer
    assert dpo["prompt"][-1]["content"].endswith(f"Question: {QUESTION}")
    sft_replies = {r["messages"][-1]["content"] for r in records["sft.jsonl"]}
    assert sft_replies == {CORRECTION, second.answer}
    labels = {(r["label"], r["chunk_id"]) for r in records["retrieval.jsonl"]}
    assert labels == {("irrelevant", first.sources[1].chunk_id), ("relevant", missing.chunk_id)}
    # nothing but the judged answers' sources: every other chunk's text is absent
    shown = {h.chunk_id for h in first.sources + second.sources} | {missing.chunk_id}
    blob = "\n".join(_strings([verified.manifest, *[r for rows in records.values() for r in rows]]))
    others = [text for cid, text in app.store.conn.execute("SELECT id, text FROM chunks") if cid not in shown]
    assert others and not [t for t in others if len(t) > 60 and t in blob]
    assert all(app.store.chunks([c])[c].text in blob for c in shown)
    # exported items are marked; the export is audited; nothing pending is left to export
    assert not app.feedback_items(pending_only=True)
    row = app.audit_rows("feedback_export")[0]["detail"]
    assert row["export_id"] == verified.manifest["export_id"] and row["counts"]["dpo.jsonl"] == 1
    with pytest.raises(FeedbackError, match="no feedback to export"):
        _export(site, tmp_path, "again")
    assert app.status().appliance_key["key_id"] == verified.manifest["appliance"]["key_id"]


def _strings(value) -> list[str]:
    """Every string inside decoded JSON."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [s for v in value for s in _strings(v)] if isinstance(value, list) else []


def test_a_refused_write_marks_nothing(site, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something").write_text("x")
    with pytest.raises(FeedbackError, match="not an empty directory"):
        site["app"].feedback_export(taken)
    assert len(site["app"].feedback_items(pending_only=True)) == 4


def _flip(path: Path, offset: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _edit(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: _flip(d / "dpo.jsonl"), "dpo.jsonl: does not match the signed manifest"),
        (
            lambda d: _edit(d / "manifest.json", b'"since": null', b'"since": "2000-01-01"'),
            "signature does not verify",
        ),
        (lambda d: (d / "retrieval.jsonl").unlink(), "retrieval.jsonl: missing"),
        (lambda d: (d / "manifest.sig").unlink(), "manifest.sig: missing"),
        (lambda d: (d / "extra.jsonl").write_text("{}\n"), "extra.jsonl: not in the signed manifest"),
    ],
    ids=["tampered-file", "tampered-manifest", "missing-file", "missing-signature", "extra-file"],
)
def test_import_refuses_a_damaged_export_and_writes_nothing(site, tmp_path, damage, message):
    out = _export(site, tmp_path)
    damage(out)
    dataset = tmp_path / "dataset"
    with pytest.raises(FeedbackError, match=message):
        import_exports([out], [site["home"] / "identity" / "appliance.pub"], dataset)
    assert not dataset.exists()


def test_import_refuses_an_unknown_key_then_imports_dedupes_and_skips_a_replay(site, tmp_path):
    from builder.cli import cli as builder_cli

    out = _export(site, tmp_path)
    stranger, _ = identity.ensure(tmp_path / "other-appliance")
    dataset = tmp_path / "dataset"
    r = CliRunner().invoke(
        builder_cli,
        [
            "feedback",
            "import",
            str(out),
            "--trust",
            str(stranger.path / "appliance.pub"),
            "--out",
            str(dataset),
        ],
    )
    assert r.exit_code == ExitCode.FEEDBACK and "which is not trusted" in r.output and not dataset.exists()
    pub = str(site["home"] / "identity" / "appliance.pub")
    r = CliRunner().invoke(
        builder_cli,
        [
            "feedback",
            "import",
            str(out),
            "--trust",
            pub,
            "--trust",
            str(stranger.path / "appliance.pub"),
            "--out",
            str(dataset),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    first = json.loads(r.stdout)
    assert first["added"]["dpo.jsonl"] == 1 and first["added"]["questions.jsonl"] == 1

    def rows(name):
        return [
            json.loads(x)
            for p in (dataset / name, dataset / "heldout" / name)
            for x in p.read_text().splitlines()
        ]

    assert rows("questions.jsonl")[0]["must_contain"] == ["15-1242.00"]
    assert len(rows("sft.jsonl")) == 2 and len(rows("retrieval.jsonl")) == 2
    # the same directory again: a replay, skipped; a re-export of the same items: duplicates, skipped
    again = import_exports([out], [Path(pub)], dataset)
    assert again.replayed and not again.imported
    re_export = _export(site, tmp_path, "re-export", since="2000-01-01")
    third = import_exports([re_export], [Path(pub)], dataset)
    assert len(third.imported) == 1 and sum(third.added.values()) == 0 and third.duplicates == 6
    history = json.loads((dataset / "imports.json").read_text())
    assert [h["export_id"] for h in history] == [
        first["imported"][0]["export_id"],
        third.imported[0]["export_id"],
    ]
    assert len(rows("sft.jsonl")) == 2  # nothing doubled


def test_round_trip_correction_to_dpo_to_an_installed_bundle(site, tmp_path, tiny_generation, embedder_dir):
    """The demo's turn on the tiny model: corrected on the appliance -> signed export -> import ->
    DPO on the correction (TRL's DPOTrainer) -> export -> eval of the corrected question before and
    after -> signed bundle -> installed on the appliance, whose lineage names the export."""
    from appliance.cli import cli as appliance_cli
    from builder.cli import cli as builder_cli
    from builder.demo import build

    export = _export(site, tmp_path)
    dataset = tmp_path / "dataset"
    import_exports([export], [site["home"] / "identity" / "appliance.pub"], dataset, heldout_fraction=0.0)
    export_id = json.loads((export / "manifest.json").read_text())["export_id"]
    work = (
        tiny_generation.parent / f".{tiny_generation.name}.work"
    )  # the session's chain: its stages are reused
    generation = tmp_path / "generation"
    result = build(generation, quick=True, embedder_dir=embedder_dir, feedback=dataset, work=work)
    ran = {name for name, st in result["stages"].items() if not st.get("skipped")}
    assert {
        "sft-feedback",
        "align-feedback",
        "export-feedback",
        "eval-feedback-after",
    } <= ran and "pretrain" not in ran
    before, after = result["feedback"]["before"], result["feedback"]["after"]
    assert before["questions"] == after["questions"] == 1
    align = json.loads((work / "stages" / "align-feedback" / "lineage.json").read_text())
    assert (
        align["result"]["pairs"] == 1 and align["result"]["generated_rejected"] == 0
    )  # the pair as exported
    assert [e["export_id"] for e in align["feedback_exports"]] == [export_id]
    manifest = json.loads((generation / "generation.json").read_text())
    assert manifest["lineage"]["stages"]["align-feedback"]["feedback_exports"][0]["export_id"] == export_id

    runner = CliRunner()
    keys, bundle = tmp_path / "keys", tmp_path / "bundle"
    for args in (
        ["keys", "init", "--out", str(keys)],
        [
            "bundle",
            "create",
            "--generation",
            str(generation),
            "--keys",
            str(keys),
            "--version",
            "next",
            "--out",
            str(bundle),
        ],
    ):
        r = runner.invoke(builder_cli, args)
        assert r.exit_code == 0, r.output
    home = ["--home", str(site["home"]), "--local"]
    for args in (["trust", "init", str(keys / "root.json")], ["bundle", "install", str(bundle)]):
        r = runner.invoke(appliance_cli, [*home, *args])
        assert r.exit_code == 0, r.output
    status = json.loads(runner.invoke(appliance_cli, [*home, "status", "--json"]).stdout)
    assert status["generation"] == 2 and status["version"] == 1
    assert status["lineage"]["stages"]["align-feedback"]["feedback_exports"][0]["export_id"] == export_id


def test_cli_ask_then_feedback_list_and_export(site, tmp_path):
    """`appliance ask` keeps its answers in a conversation, so the audit id it prints is enough."""
    from appliance.cli import cli as appliance_cli

    runner = CliRunner()
    home = ["--home", str(site["home"]), "--local"]
    r = runner.invoke(appliance_cli, [*home, "ask", QUESTION, "--max-tokens", "6"])
    assert r.exit_code == 0, r.output
    audit_id = int(r.stderr.rsplit("audit id ", 1)[1].split(":")[0])
    assert (
        runner.invoke(appliance_cli, [*home, "feedback", "add", str(audit_id), "--good", "--bad"]).exit_code
        == 2
    )
    r = runner.invoke(
        appliance_cli, [*home, "feedback", "add", str(audit_id), "--correct", CORRECTION, "--json"]
    )
    assert r.exit_code == 0, r.output
    listed = json.loads(
        runner.invoke(appliance_cli, [*home, "feedback", "list", "--pending", "--json"]).stdout
    )
    assert listed["items"][-1]["correction"] == CORRECTION and len(listed["items"]) == 5
    r = runner.invoke(appliance_cli, [*home, "feedback", "export", "--out", str(tmp_path / "usb"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["counts"]["dpo.jsonl"] == 2
    r = runner.invoke(appliance_cli, [*home, "feedback", "export", "--out", str(tmp_path / "usb2")])
    assert r.exit_code == ExitCode.FEEDBACK and "no feedback to export" in r.output
    status = runner.invoke(appliance_cli, [*home, "status"]).stdout
    assert "signing key " + identity.load(site["home"]).key_id in status


def test_held_out_split_keeps_each_question_on_one_side_in_every_file(site, tmp_path):
    from builder.feedback import heldout

    out = _export(site, tmp_path)
    questions = [QUESTION, "Which roles need a security clearance?"]
    # a share between the two questions' hash positions puts exactly one of them in heldout/
    low, high = sorted(next(f / 1000 for f in range(1001) if heldout(q, f / 1000)) for q in questions)
    dataset = tmp_path / "dataset"
    import_exports(
        [out], [site["home"] / "identity" / "appliance.pub"], dataset, heldout_fraction=(low + high) / 2
    )
    sides = {}
    for split in ("", "heldout"):
        for name in ("sft.jsonl", "dpo.jsonl", "retrieval.jsonl", "ratings.jsonl"):
            for line in (dataset / split / name).read_text().splitlines():
                sides.setdefault(json.loads(line)["feedback"]["question"], set()).add(split)
    assert set(sides) == set(questions) and all(len(s) == 1 for s in sides.values())
    assert {next(iter(s)) for s in sides.values()} == {"", "heldout"}
