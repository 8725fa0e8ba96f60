"""The benchmarks still run (small sizes): `make bench` must not rot between releases."""

from bench import search


def test_search_benchmark_prints_its_table():
    lines = search.run([1000], queries=20)
    assert lines[0].startswith("| chunks | hybrid cached p50 ms")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[0] == "1,000" and cells[-1].endswith("x")
    assert all(float(c) > 0 for c in cells[1:-1])


def test_bundle_benchmark_prints_its_table():
    from bench import bundle

    lines = bundle.run(0.02)
    assert lines[0].startswith("| what | seconds | MB/s | vs sha256sum |")
    install = next(line for line in lines if "appliance bundle install" in line)
    assert float(install.split("|")[-2].strip().rstrip("x")) > 0


def test_concurrency_benchmark_prints_its_table(tiny_generation):
    from appliance.engine.server import find_binary
    from bench import concurrency

    if find_binary() is None:
        import pytest

        pytest.skip("needs llama-server (`make deps` builds it)")
    lines = concurrency.run(tiny_generation / "model.gguf", clients=(1, 2))
    assert lines[0].startswith("| clients | aggregate decode tok/s")
    assert [line.split("|")[1].strip() for line in lines[2:4]] == ["1", "2"]
    assert any(line.startswith("search while 4 answers stream: p95") for line in lines)
    alone = next(line for line in lines if line.startswith("decode alone ("))
    assert float(alone.split(" = ")[1].split("x")[0]) > 0 and "bare llama-server" in alone
    assert any(line.startswith("resident: service") for line in lines)


def test_the_readmes_measured_tables_are_the_bench_results():
    """Each generated table in the README is a result file a benchmark wrote, machine line included
    (bench/report.py), so the README cannot show a figure no run printed."""
    from bench import report

    text = report.README.read_text()
    blocks = list(report.BLOCK.finditer(text))
    assert len(blocks) >= 3, "the README's generated tables lost their markers"
    for block in blocks:
        result = (report.RESULTS / f"{block.group(2)}.md").read_text()
        assert block.group(3) == result, (
            f"README's {block.group(2)} table is not bench/results/{block.group(2)}.md"
        )
        assert result.startswith("Measured on ") and " cores, " in result.splitlines()[0]
    assert report.main(["--check"]) == 0


def test_a_hand_edited_table_is_caught(tmp_path, monkeypatch):
    from bench import report

    (tmp_path / "results").mkdir()
    monkeypatch.setattr(report, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(report, "README", tmp_path / "README.md")
    report.record(
        "search", ["| chunks | p95 ms |", "| --- | --- |", "| 10,000 | 5.48 |"], "python -m bench search"
    )
    report.README.write_text("# x\n\n<!-- bench:search -->\nold table\n<!-- /bench:search -->\n")
    assert report.main(["--check"]) == 1
    assert report.main([]) == 0 and report.main(["--check"]) == 0
    assert "| 10,000 | 5.48 |" in report.README.read_text() and "old table" not in report.README.read_text()
    report.README.write_text(report.README.read_text().replace("5.48", "4.00"))  # a figure edited by hand
    assert report.main(["--check"]) == 1
