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
    from appliance.engine_server import find_binary
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
