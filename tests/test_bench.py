"""The benchmarks still run (small sizes): `make bench` must not rot between releases."""

import json

import pytest

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


def test_the_reading_sets_hold_what_their_keys_say():
    """bench/reading: every answer is written in its document word for word, every document a question
    names exists, the unanswerable ones name none; the two sets share no document."""
    from bench.reading import HERE, load

    names = {}
    for name in ("calibration", "test"):
        docs, questions = load(name)
        texts = {p.name: " ".join(p.read_text().split()) for p in docs.iterdir()}
        names[name] = set(texts)
        kinds = {q.kind for q in questions}
        assert kinds == {"fact", "multi", "unanswerable"}, kinds
        for q in questions:
            if q.kind == "unanswerable":
                assert q.doc is None and q.answers == []
            else:
                assert q.answers and all(" ".join(a.split()) in texts[q.doc] for a in q.answers), q.question
    assert not names["calibration"] & names["test"]
    assert (HERE / "test" / "questions.jsonl").exists()


def test_the_reading_benchmark_scores_a_reply_the_way_it_says():
    from bench.reading import ABSTAINED_RE, holds

    assert holds("It was worth $4.7  million [1].", ["$4.7 million"])
    assert not holds("It was worth $4.7 billion.", ["$4.7 million"])
    assert holds("Ana and Bo led it.", ["Ana", "Bo"], every=True) and not holds(
        "Ana led.", ["Ana", "Bo"], every=True
    )
    assert ABSTAINED_RE.search("The documents do not cover this question.")
    assert ABSTAINED_RE.search("The sources do not say, so I do not know.")
    assert not ABSTAINED_RE.search("The contract covered 57 months [1].")


def test_the_reading_benchmark_prints_its_table(tiny_generation):
    from bench import reading

    lines = reading.run(tiny_generation, "calibration", each=1)
    assert "3 questions (1 facts, 1 multi-part, 1 that no document answers)" in lines[0]
    rows = [line for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[2].strip() for r in rows] == [label for label, _ in reading.VARIANTS]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert cells[2].endswith("/1 (0%)") or cells[2].endswith("/1 (100%)")
        assert float(cells[-1]) > 0


def test_the_demo_tables_are_read_from_the_generations_records(tiny_generation):
    """Every stage the chain ran has its row (its seconds from its lineage), and the eval table holds
    each kind of held-out question for both models and the gate's verdict, from eval.json."""
    from bench import demo

    report = json.loads((tiny_generation / "eval.json").read_text())
    stages = demo.stages_table(tiny_generation)
    names = [line.split("|")[1].strip() for line in stages[2:-1]]
    assert {"pretrain", "sft-qa", "align", "merge", "export", "eval"} <= set(names), names
    sft = next(line for line in stages if line.startswith("| sft-qa "))
    assert "->" in sft, sft  # its loss, first and last step
    table = "\n".join(demo.eval_table(tiny_generation))
    for kind, label in demo.KINDS.items():
        if kind in report["tasks"]["Q8_0"]["by_kind"]:
            assert label in table
    verdict = "passed" if report["gate"]["passed"] else "failed"
    assert f"| release gate |  | {verdict}" in table, table


def test_the_demo_tables_say_what_to_run_when_nothing_was_built(tmp_path):
    from bench import demo

    with pytest.raises(SystemExit, match="make setup"):
        demo.eval_table(tmp_path)
    with pytest.raises(SystemExit, match="make setup"):
        demo.stages_table(tmp_path)


def test_the_speed_comparisons_take_their_two_sides_in_turn():
    """bench.decode and bench.service measure the appliance and bare llama.cpp in alternation, each
    side's best, the baseline at the prompt length the appliance sent."""
    from bench.decode import interleaved

    calls = []
    speeds = iter([20.0, 24.0])

    def measured():
        calls.append("appliance")
        return {"tokens_per_s": next(speeds), "prompt_tokens": 422}

    def baseline(context):
        calls.append(("bare", context))
        return {"tg": 25.0 - len(calls)}

    app, base = interleaved(measured, baseline, "tokens_per_s", rounds=2)
    assert calls == ["appliance", ("bare", 422), "appliance", ("bare", 422)]
    assert app["tokens_per_s"] == 24.0 and base["tg"] == 23.0
