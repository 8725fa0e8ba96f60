"""Reference tables with whatever headers a real one has: the columns found by header and by content, an
explicit mapping, a clear refusal; and ingest and staffing reading them the same way (a real store)."""

import pytest

from appliance.app import Appliance
from appliance.config import load_settings
from appliance.documents.columns import detect, parse_mapping
from appliance.documents.readers import read_document
from appliance.drafting.staffing import named as staff
from appliance.errors import IngestError

RENAMED = (
    "LCAT Code,Labor Category,Description,Minimum Education,Years of Experience,Certifications\n"
    '15-1299.08,Systems Engineer,"Designs integrated systems, interfaces and test plans.",'
    "Bachelor's degree in engineering,8,CompTIA Security+\n"
    '15-2051.00,Data Scientist,"Builds statistical models and analytics pipelines for mission data.",'
    "Master's degree,5,\n"
)


def test_renamed_headers_are_found_by_their_words(tmp_path):
    path = tmp_path / "lcats.csv"
    path.write_text(RENAMED)
    roles = read_document(path, 1_000_000).table.roles
    assert (roles.code, roles.title, roles.duties, roles.education, roles.years, roles.certification) == (
        "LCAT Code",
        "Labor Category",
        "Description",
        "Minimum Education",
        "Years of Experience",
        "Certifications",
    )
    assert roles.describe().startswith('code = "LCAT Code" (header), title = "Labor Category" (header)')


def test_unnamed_columns_are_found_by_their_content():
    rows = [
        {"A": "Program Manager", "B": "11-3021.00", "C": "Leads the program, its staff and its reporting."},
        {"A": "Help Desk Specialist", "B": "15-1232.00", "C": "Answers tickets and restores service fast."},
        {
            "A": "Database Administrator",
            "B": "15-1242.00",
            "C": "Keeps databases backed up, tuned and patched.",
        },
    ]
    roles = detect(["A", "B", "C"], rows)
    assert (roles.code, roles.title, roles.duties) == ("B", "A", "C")
    assert roles.how == {"code": "content", "title": "content", "duties": "content"}
    # site-specific codes are codes too when a column is all of them, one per row
    site = [{"Id": f"LC-{100 + i}", "Role": r["A"]} for i, r in enumerate(rows)]
    assert detect(["Id", "Role"], site).code == "Id"


def test_header_words_match_whole_and_numbers_or_dates_are_not_codes():
    assert detect(["Name", "Title", "Code"]).title == "Title", "the earlier synonym wins"
    assert detect(["Associated Skills", "Phonetic spelling", "Labor Category"]).code is None
    rows = [{"Rate": "125.00", "Start": "2024-01-05"}, {"Rate": "99.50", "Start": "2024-02-05"}]
    assert detect(["Rate", "Start"], rows).code is None


def test_an_explicit_mapping_wins_and_a_wrong_one_is_refused():
    columns = ["Cat", "Num", "Text"]
    roles = detect(columns, [], parse_mapping("code=Num, title=Cat"))
    assert (roles.code, roles.title, roles.how["code"]) == ("Num", "Cat", "mapping")
    with pytest.raises(IngestError, match="does not have"):
        detect(columns, [], {"code": "Number"})
    with pytest.raises(IngestError, match="unknown column role"):
        detect(columns, [], {"salary": "Num"})
    with pytest.raises(IngestError, match="not a column mapping"):
        parse_mapping("code")


def test_a_table_without_a_code_or_title_is_refused_with_what_was_found():
    note = "paid on delivery after inspection and acceptance by the contracting officer"
    roles = detect(["Amount", "Notes"], [{"Amount": "1200", "Notes": note}, {"Amount": "75", "Notes": note}])
    with pytest.raises(IngestError) as refused:
        roles.require_key("lcats.csv")
    assert "no code or title column found" in refused.value.message
    assert "code=COLUMN,title=COLUMN" in refused.value.fix


def test_ingest_and_staffing_read_renamed_headers(home, tmp_path):
    folder = tmp_path / "reference"
    folder.mkdir()
    (folder / "lcats.csv").write_text(RENAMED)
    with Appliance(load_settings(home=home)) as app:
        report = app.ingest([folder], "reference")
        assert not report.failed, report.failed
        rows = app.store.ref_rows()
        assert {(r["code"], r["title"]) for r in rows} == {
            ("15-1299.08", "Systems Engineer"),
            ("15-2051.00", "Data Scientist"),
        }
        roles = staff(
            "The contractor shall provide a Systems Engineer and a Data Scientist.", rows, lambda _: None
        )
    by_code = {r.code: r for r in roles}
    assert by_code["15-1299.08"].education == "Bachelor's degree in engineering"
    assert by_code["15-1299.08"].years == "8"
    assert by_code["15-2051.00"].education == "Master's degree" and by_code["15-2051.00"].years == "5"
