"""Hybrid retrieval over the demo corpus: exact codes first, meaning found, collections respected."""

import json

import numpy as np
from click.testing import CliRunner

from appliance.cli import cli
from appliance.retrieval.rag import fts_query, search


def test_exact_code_comes_first(app):
    for code, title in [
        ("15-1242.00", "Database Administrator"),
        ("11-3021.03", "Transition Manager"),
        ("43-9111.00", "Records Management Specialist"),
    ]:
        hits = app.search(f"who is {code}?")
        assert hits[0].exact and f"code: {code}" in hits[0].text and f"title: {title}" in hits[0].text


def test_code_prefix_returns_the_family_first(app):
    hits = app.search("15-1252", k=6)
    # A row's chunk starts with its title; its code is the line after it.
    assert [h.text.split("\n")[1] for h in hits[:4]] == [
        "code: 15-1252.00",
        "code: 15-1252.01",
        "code: 15-1252.02",
        "code: 15-1252.03",
    ]


def test_exact_code_beats_vectors_even_when_they_point_elsewhere(app):
    # The words pull towards cyber security; the code names a Technical Writer.
    hits = app.search("security operations incident response 27-3042.00")
    assert "title: Technical Writer" in hits[0].text


def test_meaning_finds_the_right_document(app):
    cases = {
        "how many folders per month did we digitize for the Labor department": "2021-VA-records-management.md",
        "waves for moving NOAA applications to the cloud": "2023-NOAA-cloud-migration.docx",
        "price reasonableness model for quotes": "2023-GSA-data-analytics.pdf",
        "answer calls within 60 seconds at the transportation service desk": "RFP-2025-DOT-service-desk.docx",
    }
    for query, expected in cases.items():
        sources = [h.source.rsplit("/", 1)[-1] for h in app.search(query, k=3)]
        assert expected in sources, (query, sources)


def test_collection_restricts_results(app):
    hits = app.search("service desk staffing", k=10, collection="rfps")
    assert hits and {h.collection for h in hits} == {"rfps"}
    hits = app.search("15-1232.02", k=5, collection="proposals")
    assert hits and all(h.collection == "proposals" for h in hits)
    assert "15-1232.02" in hits[0].text


def test_fusion_uses_both_lists(app):
    """A chunk found only by vectors and one found only by keywords both reach the fused list."""
    query = "folders scanned quality control"
    keyword = app.store.keyword_search(fts_query(query), 50)
    vector = app.store.vector_search(app.embedder.embed([query])[0], 50)
    fused = [h.chunk_id for h in search(app.store, app.embedder, query, k=500, fetch=50)]
    assert set(fused) == {c for c, _ in keyword} | {c for c, _ in vector}
    assert fused[0] in {c for c, _ in keyword[:3]} | {c for c, _ in vector[:3]}


def test_search_json_contract(demo_home):
    result = CliRunner().invoke(cli, ["--home", str(demo_home), "search", "15-1241.01", "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert len(rows) == 3
    assert {"chunk_id", "doc_id", "source", "title", "score", "text"} <= set(rows[0])
    assert "Cloud Architect" in rows[0]["text"]


def test_query_vectors_are_unit_length_and_meaningful(app):
    vectors = app.embedder.embed(
        ["database backup and recovery", "restoring databases from backups", "a picnic in the park"]
    )
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2


def test_unknown_collection_is_a_clear_error(demo_home):
    result = CliRunner().invoke(cli, ["--home", str(demo_home), "search", "x", "--collection", "nope"])
    assert result.exit_code == 3 and "no collection named 'nope'" in result.output
