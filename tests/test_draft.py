"""Proposal drafting on the demo RFPs: every requirement in the matrix, codes real or flagged, citations resolved."""

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import cli
from appliance.errors import ExitCode

RFPS = Path(__file__).resolve().parent.parent / "builder" / "demo_data" / "corpus" / "rfps"
EXPECTED_IDS = {
    "RFP-2025-USDA-application-modernization.md": [
        "C.2.1",
        "C.2.2",
        "C.2.3",
        "C.2.4",
        "C.2.5",
        "C.2.6",
        "C.2.7",
        "C.3.1",
        "C.3.2",
        "L.1",
        "L.2",
        "L.3",
        "M.2",
    ],
    "RFP-2025-DOT-service-desk.docx": [
        "C.2.1",
        "C.2.2",
        "C.2.3",
        "C.2.4",
        "C.2.5",
        "C.2.6",
        "C.2.7",
        "C.3.1",
        "L.1",
        "L.2",
    ],
    "RFP-2026-EPA-data-platform.pdf": ["C.2.1", "C.2.2", "C.2.3", "C.2.4", "C.2.5", "C.2.6", "C.3.1"],
}


def _known_codes(app):
    return {r["code"] for r in app.store.ref_rows()}


@pytest.mark.parametrize("name", sorted(EXPECTED_IDS))
def test_demo_rfp_draft(app, name):
    draft = app.draft(RFPS / name, ["proposals", "reference"], max_tokens=16)
    md = draft.markdown
    assert [r.id for r in draft.requirements] == EXPECTED_IDS[name]
    for req in draft.requirements:  # each statement is in the matrix, with its id and section
        assert f"| {req.id} | {req.section} | - | {req.text} |" in md
    assert [r.id for r in draft.requirements if r.kind == "evaluation"] == [
        i for i in EXPECTED_IDS[name] if i.startswith("M.")
    ]
    known = _known_codes(app)
    for code in set(re.findall(r"\b\d{2}-\d{4}\.\d{2}\b", md)):
        assert code in known or f"{code} [UNVERIFIED CODE" in md, code
    listed = {int(n) for n in re.findall(r"^\[(\d+)\] ", md, re.MULTILINE)}
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", md.split("## Sources")[0])}
    assert cited <= listed
    assert listed == set(range(1, len(draft.sources) + 1))


def test_staffing_comes_from_the_reference_table(app):
    draft = app.draft(RFPS / "RFP-2025-USDA-application-modernization.md", max_tokens=4)
    by_title = sorted((s.code, s.title, s.key) for s in draft.staffing if s.how == "exact title")
    assert by_title == [
        ("11-3021.00", "Program Manager", True),  # "Key personnel are the Program Manager and ..."
        ("15-1241.01", "Cloud Architect", False),
        ("15-1242.01", "Senior Database Administrator", False),
        ("15-1252.00", "Software Developer", False),
        ("15-1252.02", "Software Architect", True),
        ("15-1252.03", "DevSecOps Engineer", False),
    ]
    assert {s.code for s in draft.staffing} <= _known_codes(app)
    pm = next(s for s in draft.staffing if s.code == "11-3021.00")
    assert pm.years == "12" and "PMP" in pm.education
    assert "| Program Manager | Program Manager | 11-3021.00 |" in draft.markdown
    # the plan: each task of section C with the categories its requirements call for
    plan = {t.task: {r.code for r in t.roles} for t in draft.plan}
    assert plan["C.2.3"] == {"15-1252.03"}  # "a DevSecOps pipeline with automated testing"
    assert "### Staffing plan by task" in draft.markdown and "From `labor_categories.csv`." in draft.markdown


def test_requirements_that_imply_a_role_by_its_duties_are_staffed_for_review(app, tmp_path):
    """A statement of work that names no role: the categories its duties call for come from the table
    (by the rows' titles and duties), marked as matched by duties; page limits and reports call for nobody."""
    rfp = tmp_path / "rfp.md"
    rfp.write_text(
        "# RFP 42: Release engineering\n\n## SECTION C - STATEMENT OF WORK\n\n"
        "C.2.1 The contractor shall conduct software testing of every release with automated test plans.\n\n"
        "C.2.2 The contractor must provide on-site Tier 2 desktop support for all staff.\n\n"
        "C.2.3 The contractor shall deliver monthly status reports.\n\n"
        "## SECTION L - INSTRUCTIONS\n\nL.1 The technical volume shall not exceed 30 pages.\n"
    )
    draft = InventingGenerator.draft(app, rfp)
    by_duties = {(s.title, s.code, s.how) for s in draft.staffing}
    assert by_duties == {
        ("Software Quality Assurance Analyst", "15-1253.00", "duties of C.2.1"),
        ("Tier 2 Desktop Support Specialist", "15-1232.01", "duties of C.2.2"),
    }, by_duties
    assert "| duties of C.2.1 |" in draft.markdown
    # a role the RFP names by title is staffed by title, and its duties do not add it twice
    rfp.write_text(
        rfp.read_text().replace(
            "C.2.3 The contractor shall deliver monthly status reports.",
            "C.2.3 Key personnel: a Software Quality Assurance Analyst.",
        )
    )
    staffed = [(s.code, s.how) for s in InventingGenerator.draft(app, rfp).staffing]
    assert staffed.count(("15-1253.00", "exact title")) == 1 and len({c for c, _ in staffed}) == len(staffed)


class InventingGenerator:
    """The model edge only: writes a response with a code that does not exist."""

    name = "inventor"
    n_ctx = 4096

    def count_tokens(self, text):
        return len(text.split())

    def stream(self, messages, max_tokens, sampling):
        yield "Our Quantum Engineer (99-9999.99) leads this [1] ; see also [42] ."

    @classmethod
    def draft(cls, app, rfp):
        return app.draft(rfp, ["proposals", "reference"], generator=cls())


def test_invented_code_is_flagged_not_kept_silently(app):
    draft = app.draft(RFPS / "RFP-2026-EPA-data-platform.pdf", generator=InventingGenerator())
    assert draft.unknown_codes == ["99-9999.99"]
    assert "99-9999.99 [UNVERIFIED CODE: not in the reference table]" in draft.markdown
    assert "codes not in the reference table: 99-9999.99" in draft.markdown
    assert "[42]" not in draft.markdown  # a citation of a source never given is dropped
    assert draft.model_dump()["unknown_codes"] == ["99-9999.99"]


def test_cli_writes_markdown_docx_and_json_summary(demo_home, tmp_path):
    out = tmp_path / "draft.md"
    result = CliRunner().invoke(
        cli,
        [
            "--home",
            str(demo_home),
            "draft",
            str(RFPS / "RFP-2026-EPA-data-platform.pdf"),
            "--out",
            str(out),
            "--docx",
            "--json",
            "--max-tokens",
            "8",
            "-c",
            "proposals",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["requirements_found"] == 7 and summary["to_answer"] == 7
    assert summary["answered"] + len(summary["gaps"]) + len(summary["needs_writing"]) == 7
    assert {"codes_used", "unknown_codes", "citations", "gaps"} <= set(summary)
    assert out.read_text().startswith("# Proposal draft:")
    import docx

    document = docx.Document(str(out.with_suffix(".docx")))
    matrix = document.tables[0]
    assert [c.text for c in matrix.rows[0].cells] == [
        "ID",
        "Section",
        "Page",
        "Requirement",
        "Evaluated under",
        "Response location",
        "Status",
    ]
    assert len(matrix.rows) == 8
    audited = json.loads(
        CliRunner()
        .invoke(
            cli, ["--home", str(demo_home), "audit", "list", "--json", "--action", "draft", "--limit", "1"]
        )
        .stdout
    )["rows"]
    assert audited[0]["detail"]["rfp"].endswith("RFP-2026-EPA-data-platform.pdf")
    assert audited[0]["detail"]["requirements"] == 7 and len(audited[0]["detail"]["rfp_sha256"]) == 64


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "empty file"),
        (b"Thank you for your interest. We look forward to meeting you.", "no requirement statements"),
        (None, "no extractable text"),
    ],
)
def test_unusable_rfp_gets_a_clear_message(demo_home, tmp_path, scanned_pdf, content, expected):
    if content is None:
        path = scanned_pdf
    else:
        path = tmp_path / "rfp.txt"
        path.write_bytes(content)
    result = CliRunner().invoke(
        cli, ["--home", str(demo_home), "draft", str(path), "--out", str(tmp_path / "o.md")]
    )
    assert result.exit_code == ExitCode.INGEST
    assert expected in result.output
    assert not (tmp_path / "o.md").exists()


def test_an_uploaded_rfp_is_named_as_its_caller_knows_it_in_errors(app):
    """A draft error once named the service's private temporary path."""
    from appliance.errors import IngestError

    with pytest.raises(IngestError) as raised:
        app.draft_upload(
            "/home/alice/rfp.txt",
            b"Thank you for your interest. We look forward to meeting you.",
            generator=object(),
        )
    assert "/home/alice/rfp.txt" in str(raised.value) and ".upload-" not in str(raised.value)
    assert str(app.settings.home) not in str(raised.value)


class EchoGenerator(InventingGenerator):
    """The model edge only: answers each requirement by restating it, with a citation."""

    def stream(self, messages, max_tokens, sampling):
        asked = messages[-1]["content"]
        yield (
            asked.split("Write our proposal's response to requirement ", 1)[1]
            .split(": ", 1)[1]
            .split("\n")[0]
        )
        yield " [1]"


class SameGenerator(InventingGenerator):
    """The model edge only: one cited paragraph, whatever is asked."""

    def stream(self, messages, max_tokens, sampling):
        yield "Our program office runs weekly risk reviews with the agency and tracks every action [1]."


def test_a_response_that_restates_or_repeats_is_marked_needs_writing_never_drafted(app):
    rfp = RFPS / "RFP-2026-EPA-data-platform.pdf"
    draft = app.draft(rfp, ["proposals"], generator=EchoGenerator())
    assert set(draft.needs_writing) == {r.id for r in draft.requirements if r.kind == "obligation"}
    assert set(draft.needs_writing.values()) == {"restates the requirement"}
    assert draft.answered == 0 and "| Drafted |" not in draft.markdown
    assert "| Needs writing (restates the requirement) |" in draft.markdown
    assert "**NEEDS WRITING (restates the requirement).**" in draft.markdown
    assert "responses that need writing: C.2.1" in draft.markdown

    draft = app.draft(rfp, ["proposals"], generator=SameGenerator())
    assert not draft.needs_writing["C.2.1"].startswith("repeats")  # the first is judged on its own
    assert draft.needs_writing["C.2.2"] == "repeats the response to C.2.1"
    assert draft.answered == 0


def test_what_makes_a_response_need_writing():
    from appliance.drafting.draft import weakness
    from appliance.schemas import Requirement

    req = Requirement(
        id="C.4.2", text="The Contractor shall patch all Oracle databases monthly.", section="C"
    )
    ours = (
        "Our database administrators applied quarterly patch sets to 41 Oracle instances for NOAA with no "
        "unplanned outage [1]. We stage every patch in a test enclave first, run the regression suite the "
        "application owners signed off, and roll back automatically when a health check fails [2]. The same "
        "team patches monthly here, inside the maintenance window the agency sets."
    )
    assert weakness(ours, req, {}, unsupported=[], relevance=0.62) is None
    assert weakness(ours.replace(" [1]", "").replace(" [2]", ""), req, {}) == "cites no source"
    assert weakness("The Contractor shall patch all Oracle databases monthly [1].", req, {}) == (
        "restates the requirement"
    )
    assert weakness(ours, req, {"C.4.1": ours}) == "repeats the response to C.4.1"
    assert weakness("The contractor shall apply " + ours, req, {}) == "in the RFP's voice, not ours"
    theirs = (
        "The Government will evaluate the staffing plan and the agency will approve each patch window [1]."
    )
    assert weakness(theirs + " It runs monthly." * 12, req, {}) == "speaks for the Government, not for us"
    assert weakness(ours, req, {}, unsupported=["41"]) == "holds what no source shows: 41"
    assert weakness(ours, req, {}, relevance=0.2) == "answers something else"
    # saying what the Government does is fine in a response that says what we do
    assert weakness(ours + " The COR will approve each patch window.", req, {}, relevance=0.6) is None
    assert weakness("We patch every Oracle instance within the window [1].", req, {}) == (
        "too short for a response (9 words)"
    )
    short = req.model_copy(update={"word_limit": 9})  # a limit shorter than a paragraph: short is right
    assert weakness("We patch every Oracle instance within the window [1].", short, {}) is None


def test_staffing_draws_only_on_the_tables_of_the_collections_named(home):
    """Two labor-category tables, in two reference collections: a draft staffs from the one its
    collections name, says which, and staffs nobody when none is named among them."""
    from appliance.app import Appliance
    from appliance.config import load_settings

    shred = Path(__file__).resolve().parent.parent / "bench" / "shred"
    tables = {
        "reference": shred / "tuned" / "lcats-tuned.csv",
        "other": shred / "held-out" / "lcats-held-out.csv",
    }
    with Appliance(load_settings(home=home, reference_collections=["reference", "other"])) as app:
        for collection, table in tables.items():
            assert not app.ingest([table], collection).failed
        codes = {c: {r["code"] for r in app.store.ref_rows() if r["collection"] == c} for c in tables}
        rfp = shred / "tuned" / "rfp02.text.md"
        for collection, table in tables.items():
            draft = app.draft(rfp, [collection], generator=SameGenerator())
            staffed = {s.code for s in draft.staffing} | {r.code for t in draft.plan for r in t.roles}
            assert staffed and staffed <= codes[collection], collection
            assert f"From `{table.name}`." in draft.markdown
        assert not app.ingest([RFPS.parent / "proposals" / "2020-SBA-loan-portal.md"], "proposals").failed
        nobody = app.draft(rfp, ["proposals"], generator=SameGenerator())
        assert not nobody.staffing and not nobody.plan
        assert "No reference table among the collections the draft drew on" in nobody.markdown
