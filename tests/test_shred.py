"""Shredding an RFP into compliance-matrix rows: what counts, identifiers, sections, pages, factors; and
the figures on RFPs written by helpers that saw no code (bench/shred), held as floors."""

import json
import time
from pathlib import Path

import pytest

from appliance.documents.readers import Document, parse_document
from appliance.drafting.shred import MAX_REQUIREMENTS, obligation, shred

SHRED = Path(__file__).resolve().parent.parent / "bench" / "shred"

RFP = """# Request for Proposals 70RDAD26R0007

## SECTION B - SUPPLIES OR SERVICES AND PRICES

| CLIN | Description | Amount |
| --- | --- | --- |
| 0001 | Base year services, the Contractor shall perform all tasks | $1 |

## SECTION C - STATEMENT OF WORK

C.1 Background. The agency operates 14 regional offices.

C.4.2 Database Support. The Contractor shall perform the following:

(a) Patch every Oracle database within 30 days of a vendor release.

(b) Restore any database from backup within 4 hours.

C.4.3 The Government will provide office space for four contractor staff.

C.4.4 The COR shall review each monthly report. The Contractor shall deliver the report by the fifth business day.

The Contractor shall keep a current inventory of all licenses.

Page 1 of 2

C.5 Reports. Monthly reports shall be delivered in PDF. Badges will be issued by the Government.

| ID | Standard | Threshold |
| --- | --- | --- |
| PRS-1 | Tier 1 calls answered within 60 seconds | 90% |

## SECTION L - INSTRUCTIONS TO OFFERORS

| Volume | Page limit |
| --- | --- |
| Volume I - Technical | 25 |

L.5.2 The Offeror shall address the following, not to exceed 300 words:

- its approach to database patching;
- its staffing plan.

## SECTION M - EVALUATION FACTORS FOR AWARD

M.1 Basis for award. Award will be made on a best value tradeoff basis.

M.2.1 Factor 1, Technical Approach. The Government will evaluate the Offeror's approach to Section C.4 and its response to L.5.2.

M.2.2 Factor 2, Reports. The Government will evaluate how the Offeror meets C.5 and the performance standards.
"""


def _rows(text=RFP, name="rfp.md"):
    return {r.id: r for r in shred(parse_document(Path(name), text.encode())).requirements}


def test_offeror_obligations_are_rows_and_the_governments_are_not():
    rows = _rows()
    assert list(rows) == [
        "C.4.2",
        "C.4.2(a)",
        "C.4.2(b)",
        "C.4.4",
        "C.u1",
        "C.5",
        "PRS-1",
        "L.u1",
        "L.5.2",
        "L.5.2(a)",
        "L.5.2(b)",
        "M.2.1",
        "M.2.2",
    ]
    assert "C.4.3" not in rows and "C.1" not in rows  # the Government's obligation; background
    assert rows["C.4.4"].text.startswith("The COR shall review")  # kept whole: the Contractor's part counts
    assert (
        rows["C.u1"].derived
        and rows["C.u1"].text == "The Contractor shall keep a current inventory of all licenses."
    )
    assert rows["C.4.2(a)"].text.startswith(
        "Patch every Oracle database"
    )  # an item inherits its lead-in's duty
    assert rows["L.5.2(b)"].text == "its staffing plan."
    assert rows["PRS-1"].text == "Tier 1 calls answered within 60 seconds | 90%"
    assert rows["L.u1"].kind == "format" and rows["L.u1"].text == "Volume I - Technical | 25"
    assert [rows[i].kind for i in ("M.2.1", "M.2.2")] == ["evaluation", "evaluation"]


def test_sections_headings_pages_and_the_factors_that_evaluate_them():
    rows = _rows()
    assert {i: r.section for i, r in rows.items()} == {i: i[0] if i[0] in "CLM" else "C" for i in rows}
    assert rows["C.4.2(b)"].heading == "C.4.2 Database Support"  # its parent's inline title
    assert rows["C.u1"].page == 1 and rows["C.5"].page == 2  # "Page 1 of 2" ends the first page
    assert rows["C.4.2(a)"].evaluated_under == ["M.2.1"]
    assert rows["L.5.2(a)"].evaluated_under == ["M.2.1"]
    assert rows["C.5"].evaluated_under == ["M.2.2"]
    assert rows["C.u1"].evaluated_under == []  # C.4 names C.4.x; the unnumbered row is in no named part


@pytest.mark.parametrize(
    "sentence, who",
    [
        ("The Contractor shall maintain the system.", "ours"),
        ("All deliverables must be submitted electronically.", "ours"),
        ("Offerors are required to submit three references.", "ours"),
        ("The Contractor will provide a transition plan.", "ours"),
        ("The Government will provide workstations.", "theirs"),
        ("The Contracting Officer will notify the Contractor in writing.", "theirs"),
        ("NOAA shall furnish the data sets.", "theirs"),
        ("Badges will be issued by the Government within ten days.", "theirs"),
        ("Offerors are advised that the Government will evaluate price.", "theirs"),
        ("This contract will be a firm-fixed-price award.", None),
        ("The period of performance is one base year.", None),
    ],
)
def test_whose_obligation_a_sentence_states(sentence, who):
    assert obligation(sentence) == who


def test_pdf_and_docx_pages_come_from_the_file():
    """The same RFP as a PDF and a DOCX gives each row the page its text begins on, row by row."""
    from bench.shred import score

    key = json.loads((SHRED / "tuned" / "rfp01.key.json").read_text())
    for name in ("rfp01.pdf", "rfp01.docx"):
        path = SHRED / "tuned" / name
        doc = parse_document(path, path.read_bytes())
        assert len(doc.pages) == (SHRED / "tuned" / "rfp01.md").read_text().count("\n---page---\n") + 1
        measured = score(path, key)
        assert measured.pages == measured.found == measured.expected, measured.misses


def test_a_hostile_rfp_is_shredded_in_bounded_time_and_rows():
    lines = "\n".join(
        f"C.{i // 100}.{i % 100} The Contractor shall do task {i}." for i in range(MAX_REQUIREMENTS + 500)
    )
    long_line = "C.1.1 The Contractor shall " + "(((( " * 100_000
    hostile = [
        long_line + "\n" + "- " * 200_000,
        "A" * 2_000_000,  # capitals where an agency's name would be
        "Abc " * 500_000,
        "SECTION C" + " " * 300_000 + "x\nPRS-1" + " " * 300_000 + "|",  # spaces where a separator goes
        "\n".join(["The contractor shall do the work described here every day"] * 35_000),  # one paragraph
        "The Government shall " * 40_000,  # a modal every few words, in one sentence
    ]
    start = time.perf_counter()
    assert len(shred(Document(Path("x.md"), "md", "x", lines)).requirements) == MAX_REQUIREMENTS
    for text in hostile:
        shred(Document(Path("y.md"), "md", "y", text))
    assert time.perf_counter() - start < 30  # each took 8 s to hours before the patterns were bounded


def _figures(name):
    from bench.shred import scores

    return scores(name)


# The lowest figure measured on any file of each set (bench/shred.py, the README's table), rounded
# down: `tuned` is what the rules were written against; `held-out` was not looked at; `reviewed` was
# measured once blind (90% of rows found), then its failures mended the rules; `blind` was written
# after that and measured once (98%).
FLOORS = {
    "tuned": {"found": 0.99, "ids": 0.98, "sections": 0.98, "pages": 0.98, "traps": 0, "extra": 1},
    "held-out": {"found": 0.96, "ids": 0.98, "sections": 0.98, "pages": 0.98, "traps": 2, "extra": 0},
    "reviewed": {"found": 0.91, "ids": 0.98, "sections": 0.98, "pages": 0.98, "traps": 3, "extra": 1},
    "blind": {"found": 0.95, "ids": 0.98, "sections": 0.98, "pages": 0.98, "traps": 0, "extra": 0},
}


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_rfps_the_code_was_not_written_against(name):
    """Rows found, and the identifier, section and page of the rows found, on every file (Markdown
    text, DOCX, PDF) of each RFP, held at the floors above."""
    floor = FLOORS[name]
    for s in _figures(name):
        assert s.found >= floor["found"] * s.expected, (s.name, s.misses)
        for field in ("ids", "sections", "pages"):
            assert getattr(s, field) >= floor[field] * s.found, (s.name, field, s.misses)
        assert s.traps <= floor["traps"] and s.extra <= floor["extra"], (s.name, s.misses)


@pytest.mark.parametrize("stem", ["rfp01", "rfp02"])
def test_page_word_limits_and_format_are_read_from_section_l(stem):
    """The volumes' page limits (a table, in each file format), each item's word limit and the font,
    size and margins, against the key of the RFPs the rules were written on."""
    key = json.loads((SHRED / "tuned" / f"{stem}.key.json").read_text())
    for suffix in (".text.md", ".docx", ".pdf"):
        path = SHRED / "tuned" / f"{stem}{suffix}"
        got = shred(parse_document(path, path.read_bytes()))
        volumes = {(" ".join(v.split()[:2]), n) for v, n in got.page_limits.items()}
        assert volumes == {
            (" ".join(p["volume"].split()[:2]), p["pages"])
            for p in key["page_limits"]
            if p["volume"].startswith("Volume")
        }, (suffix, got.page_limits)
        assert sorted(r.word_limit for r in got.requirements if r.word_limit) == sorted(
            w["words"] for w in key["word_limits"]
        )
        assert got.format == {
            "font": key["format"]["font"],
            "size_pt": key["format"]["size_pt"],
            "margins_in": key["format"]["margins_in"],
        }


def test_a_response_is_cut_to_its_word_limit_at_a_sentence():
    from appliance.drafting.draft import within

    text = "One two three. Four five six seven. Eight nine."
    assert within(text, 20) == (text, 0)
    assert within(text, 8) == ("One two three. Four five six seven.", 2)
    assert within("A single long sentence of many words", 3) == ("A single long", 4)


def test_the_docx_follows_section_l_with_the_matrix_on_pages_of_its_own(tmp_path):
    import docx
    from docx.shared import Inches, Pt

    from appliance.drafting.draft import write_docx

    markdown = (
        "# Proposal draft: x\n\nIntro.\n\n## Compliance matrix\n\n| ID | Text |\n| --- | --- |\n| C.1 | a |\n\n"
        "## Technical approach\n\n### C.1\n\nWe will.\n"
    )
    write_docx(markdown, tmp_path / "d.docx", {"font": "Arial", "size_pt": 11.0, "margins_in": 0.75})
    document = docx.Document(str(tmp_path / "d.docx"))
    normal = document.styles["Normal"].font
    assert (normal.name, normal.size) == ("Arial", Pt(11))
    assert len(document.sections) == 3  # the cover, the matrix, the responses
    assert all(s.left_margin == Inches(0.75) and s.top_margin == Inches(0.75) for s in document.sections)


# Task -> category rows of the staffing plans (bench/staffing.py), summed over each set's two RFPs:
# measured 31 right of 32 proposed and 37 wanted on `tuned`, 26 of 36 and 42 on `held-out`.
STAFFING = {"tuned": (0.93, 0.80), "held-out": (0.68, 0.60)}


@pytest.mark.parametrize("name", sorted(STAFFING))
def test_staffing_plans_on_rfps_the_code_was_not_written_against(embedder_dir, name):
    from bench.staffing import embedder, measure

    found = measure(name, embedder(embedder_dir))
    right, got, want = (sum(m[k] for m in found) for k in ("right", "got", "want"))
    precision, recall = STAFFING[name]
    assert right >= precision * got and right >= recall * want, [m["detail"] for m in found]


def test_forms_seen_in_a_reviewed_rfp():
    """What a blind RFP's misses taught (bench/shred/reviewed): "agrees to"; numbered steps under a
    lead-in; deliverables numbered like D-01 after section D; an attachment heading after section L; a
    number restated in figures at a line start; a titled lead-in to the factors; a definition's
    "who is responsible for"."""
    text = (
        "## SECTION B - SUPPLIES\n\nB.1 General. The Contractor shall furnish all management and labor.\n\n"
        "## SECTION C - STATEMENT OF WORK\n\nC.5.2 Transition-Out. The Contractor shall:\n\n"
        "C.5.2.1 Deliver a Transition-Out Plan to the Contracting Officer.\n\n"
        "C.5.2.2 Return all Government-furnished property.\n\n"
        "C.6 Kickoff. The Contractor will attend a kickoff meeting within ten\n(10) business days after award.\n\n"
        "C.7 Insurance. The Vendor agrees to maintain liability insurance.\n\n"
        "C.8 Definitions.\n\n(a) Site manager: the VA employee who is responsible for call quality.\n\n"
        "## SECTION L - INSTRUCTIONS\n\nL.1 The Offeror shall submit one volume.\n\n"
        "## ATTACHMENT J-1 - DELIVERABLES\n\n| ID | Deliverable | Due |\n| --- | --- | --- |\n"
        "| D-01 | Quality Review Plan with sampling method | 30 days |\n| L-1 | Past Performance Questionnaire | - |\n\n"
        "## SECTION M - EVALUATION\n\nM.1 Evaluation Factors. The Government will evaluate proposals using the "
        "factors below.\n\nM.2 Technical Approach. The Government will evaluate the soundness of the approach.\n"
    )
    doc = Document(Path("x.md"), "md", "x", "Department of Veterans Affairs (VA) call centers.\n\n" + text)
    rows = {r.id: r for r in shred(doc).requirements}
    assert list(rows) == ["B.1", "C.5.2", "C.5.2.1", "C.5.2.2", "C.6", "C.7", "L.1", "D-01", "M.2"]
    assert rows["C.6"].text.endswith("within ten (10) business days after award.")
    assert rows["D-01"].section == "J" and rows["M.2"].kind == "evaluation"


def test_every_row_keeps_an_id_of_its_own():
    text = "## SECTION C\n\n1. The Contractor shall do one thing.\n\n## SECTION L\n\n1. The Offeror shall do another.\n"
    ids = [r.id for r in shred(Document(Path("x.md"), "md", "x", text)).requirements]
    assert ids == ["1", "1 (2)"]
