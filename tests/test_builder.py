"""Builder: tokenizer parity with llama.cpp, HF -> GGUF round trip, embedder export, the demo corpus."""

import csv
import json
import re

import numpy as np
import pytest

from builder.demo import DEMO_DATA, all_held_out, load_corpus

# f16 weights and llama.cpp kernels against PyTorch fp32: the largest logit difference stays under 1% of
# the largest logit (measured 0.0037 on logits up to 1.3, i.e. 0.3%).
LOGIT_RTOL = 0.01


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny checkpoint with scaled-up weights, so logits are far from uniform."""
    import torch

    from builder.synth import synthesize

    out = tmp_path_factory.mktemp("tiny-hf")
    synthesize("tiny", out, [d.text for d in load_corpus(DEMO_DATA / "corpus")], seed=1)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(out)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gguf(tiny_checkpoint):
    from builder.llamacpp import convert_hf

    return convert_hf(tiny_checkpoint, tiny_checkpoint / "model-f16.gguf", "f16")


def test_gguf_logits_match_pytorch(tiny_checkpoint, tiny_gguf):
    import llama_cpp
    import sentencepiece as spm
    import torch
    from transformers import LlamaForCausalLM

    from builder.synth import encode

    sp = spm.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer.model"))
    ids = [1] + encode(sp, "The contractor shall provide a transition-in plan within 30 days.")
    model = LlamaForCausalLM.from_pretrained(tiny_checkpoint).eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(str(tiny_gguf), n_ctx=128, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(ids)
        actual = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    assert expected.shape == actual.shape
    assert np.abs(expected).max() > 0.2, "logits too flat for the comparison to mean anything"
    assert np.abs(expected - actual).max() < LOGIT_RTOL * np.abs(expected).max()
    assert (expected.argmax(-1) == actual.argmax(-1)).all()


def test_tokenizer_matches_llama_cpp(tiny_checkpoint, tiny_gguf):
    import llama_cpp
    import sentencepiece as spm

    from builder.synth import encode

    sp = spm.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer.model"))
    llm = llama_cpp.Llama(str(tiny_gguf), vocab_only=True, verbose=False)
    try:
        samples = [
            "<s><|system|>\nUse the sources.\n<|user|>\nCode 15-1252.00?</s><|assistant|>\n",
            "  leading spaces, tabs\tand\n\nnewlines",
            "Résumé – 😀 [12] $14.2 million",
        ]
        samples += [d.text[:2000] for d in load_corpus(DEMO_DATA / "corpus")]
        for text in samples:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == encode(sp, text), text[:60]
    finally:
        llm.close()


def test_quantize_q8_0_and_refuse_unknown_type(tiny_gguf, tmp_path):
    from builder.errors import BuilderError
    from builder.llamacpp import quantize

    out = quantize(tiny_gguf, tmp_path / "q8.gguf", "Q8_0")
    assert out.read_bytes()[:4] == b"GGUF"
    assert out.stat().st_size < tiny_gguf.stat().st_size
    with pytest.raises(BuilderError, match="unknown quantization type"):
        quantize(tiny_gguf, tmp_path / "x.gguf", "Q3_WHAT")


def test_embedder_export_records_agreement(embedder_dir):
    manifest = json.loads((embedder_dir / "embedder.json").read_text())
    assert manifest["dim"] == 384 and manifest["pooling"] == "mean" and manifest["normalize"] is True
    agreement = manifest["agreement"]
    assert agreement["fp32_vs_torch_min_cosine"] > 0.9999
    assert agreement["int8_vs_fp32_min_cosine"] > 0.98
    # MatMul weights are int8; the token embedding table stays fp32 (it costs memory, not time)
    assert (embedder_dir / "model_int8.onnx").stat().st_size < (
        embedder_dir / "model_fp32.onnx"
    ).stat().st_size * 0.7


def test_demo_corpus_has_what_the_issue_promises():
    rows = list(csv.DictReader((DEMO_DATA / "corpus" / "reference" / "labor_categories.csv").open()))
    assert len(rows) >= 40
    assert all(re.fullmatch(r"\d{2}-\d{4}\.\d{2}", r["code"]) for r in rows)
    assert len({r["code"] for r in rows}) == len(rows)
    proposals = list((DEMO_DATA / "corpus" / "proposals").iterdir())
    rfps = list((DEMO_DATA / "corpus" / "rfps").iterdir())
    assert len(proposals) >= 5 and len(rfps) >= 3
    assert {p.suffix for p in proposals + rfps} >= {".md", ".txt", ".docx", ".pdf"}


def test_held_out_questions_never_reach_training(tmp_path):
    from builder import pipeline
    from builder.demo import prepare

    items = all_held_out()
    assert len(items) >= 40 and sum(q["kind"] == "lcat_code" for q in items) >= 20
    path = prepare(tmp_path / "work", tmp_path / "gen", corpus_dir=DEMO_DATA / "corpus", quick=False)
    data = tmp_path / "work" / "data"
    chats = [
        json.loads(line)["messages"]
        for name in ("sft-qa.jsonl", "sft-write.jsonl")
        for line in (data / name).read_text().splitlines()
    ]
    pairs = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines()]
    questions = {c[-2]["content"].rsplit("Question: ", 1)[-1] for c in chats}
    replies = "\n".join([c[-1]["content"] for c in chats] + [p["chosen"] for p in pairs])
    for item in items:
        assert item["question"] not in questions
        if item["kind"] == "lcat_code":  # no reply teaches a held-out row's code or title
            assert not any(m in replies for m in item["must_contain"]), item
    for asked in (
        "15-1212.03",
        "Incident Response Lead",
        "Service Desk Manager",
        "Senior Database Administrator",
    ):
        assert asked not in replies
    assert "Cloud Architect" in replies  # a row no question asks about is trained on
    spec = pipeline.load(path)
    configs = {s.name: c for s, c in pipeline.stage_configs(spec, path.parent)}
    heldout_doc = DEMO_DATA / "corpus" / "proposals" / "2023-GSA-data-analytics.pdf"
    assert configs["eval"].heldout == [heldout_doc.resolve()]
    assert heldout_doc.resolve() not in configs["pretrain"].corpus  # perplexity text is unseen
    table = (DEMO_DATA / "corpus" / "reference").resolve()
    assert not any(p == table or table in p.parents for p in configs["pretrain"].corpus)  # left to retrieval
    assert [s.stage for s in spec.stages] == [
        "pretrain",
        "sft",
        "sft",
        "align",
        "merge",
        "export",
        "export",
        "embedder",
        "eval",
    ]
    assert spec.base.name == "model.yaml" and configs["pretrain"].base == (
        tmp_path / "work" / "stages" / "base"
    )


def test_training_chats_are_shaped_like_the_appliances_prompts(tmp_path):
    """As many sources as retrieval gives (top_k), the right one in every position, the system prompt and
    source format of appliance.engine.prompt, every kind of question the table answers."""
    from appliance.config import Settings
    from appliance.engine.prompt import SYSTEM_PROMPT
    from builder.demo import FIRST_SHARE, write_data

    write_data(tmp_path, DEMO_DATA / "corpus", seed=0, quick=False)
    chats = [json.loads(line)["messages"] for line in (tmp_path / "sft-qa.jsonl").read_text().splitlines()]
    table = [c for c in chats if 'title="labor_categories"' in c[1]["content"]]
    assert len(table) >= 1000
    positions = {}
    for chat in table:
        assert chat[0] == {"role": "system", "content": SYSTEM_PROMPT}
        sources = re.findall(r'<source n="(\d+)" title="[^"]*">\n', chat[1]["content"])
        assert [int(n) for n in sources] == list(range(1, Settings().top_k + 1)), chat[1]["content"][:300]
        cited = re.findall(r"\[(\d)\]", chat[2]["content"])
        if cited:
            positions[int(cited[0])] = positions.get(int(cited[0]), 0) + 1
    # mostly first, as retrieval ranks it (FIRST_SHARE), but every position often enough to learn to look
    assert set(positions) == set(range(1, 6)) and min(positions.values()) > len(table) * (1 - FIRST_SHARE) / 8
    assert positions[1] > len(table) * FIRST_SHARE * 0.9, positions
    asked = " ".join(c[1]["content"].rsplit("Question: ", 1)[-1] for c in table)
    for kind in ("code for", "has code", "education", "years of experience", "duties"):
        assert kind in asked, kind
    unknown = [c for c in table if "do not know" in c[2]["content"]]
    assert 0 < len(unknown) < len(table) * 0.1


def test_preference_pairs_reject_only_a_wrong_answer_code():
    """A rejected reply with another code teaches something only where the code is the answer; where the
    question names the code and asks for its title, such a pair taught DPO to stop after the code."""
    import random

    from builder.demo import preference_pairs

    def chat(question: str, reply: str) -> list[dict]:
        row = 'title: Data Engineer\ncode: 15-1243.01\n</source>\n\n<source n="2">\ncode: 15-1243.07'
        return [
            {"role": "user", "content": f"Sources:\n{row}\n\nQuestion: {question}"},
            {"role": "assistant", "content": reply},
        ]

    title = chat(
        "Which labor category has code 15-1243.01?",
        "Code 15-1243.01 is the Data Engineer labor category [1].",
    )
    code = chat(
        "What is the code for the Data Engineer?", "The Data Engineer labor category has code 15-1243.01 [1]."
    )
    pairs = preference_pairs(random.Random(0), [title, code, title], 8)
    assert [p["chosen"] for p in pairs] == [code[-1]["content"]]
    assert (
        pairs[0]["rejected"] == "The Data Engineer labor category has code 15-1243.07 [1]."
    )  # the wrong row's


def test_prose_questions_ask_for_a_figure_their_source_states():
    """Questions about the proposals and RFPs: one sentence's figure asked for, that sentence as the reply;
    never one that answers a held-out document question (the "58 to 77 percent" of q06 included)."""
    from builder.demo import Corpus, all_held_out, load_corpus, prose_facts

    corpus = Corpus(load_corpus(DEMO_DATA / "corpus"), all_held_out())
    facts = prose_facts(corpus)
    assert len(facts) >= 30
    for (_, chunk), question, sentence in facts:
        assert question.startswith("In the ") and question.endswith("?")
        assert any(ask in question for ask in ("how many", "how much", "what percentage")), question
        assert sentence in " ".join(chunk.text.split()) and sentence not in question
        assert not corpus.answers_held_out(sentence) and not corpus.leaks(sentence)
    assert not [s for _, _, s in facts if "58 to 77" in s]
    assert corpus.answers_held_out(
        "First contact resolution increased from 58 to 77 percent at the Bureau of "
        "Land Management service desk."
    )


def test_demo_chain_produced_the_fixture_generation(tiny_generation):
    """The session's tiny generation went through every stage of the demo pipeline and carries their lineage."""
    manifest = json.loads((tiny_generation / "generation.json").read_text())
    assert list(manifest["lineage"]["stages"]) == [
        "pretrain",
        "sft-qa",
        "sft-write",
        "align",
        "merge",
        "export",
        "eval",
    ]
    merge = manifest["lineage"]["stages"]["merge"]
    assert merge["config"]["method"] == "ties" and len(merge["inputs"]) == 3
    report = json.loads((tiny_generation / "eval.json").read_text())
    assert report["gate"]["passed"] is True and set(report["perplexity"]) == {"F16", "Q8_0", "Q4_K_M"}
    assert report["tasks"]["Q8_0"]["overall"]["questions"] == len(all_held_out())


def test_unknown_shape_is_refused():
    from builder.errors import BuilderError
    from builder.synth import shape_config

    with pytest.raises(BuilderError, match="choose one of tiny, llama-3.2-1b"):
        shape_config("gpt-5")


def test_builder_cli_help_teaches():
    from click.testing import CliRunner

    from builder.cli import cli

    for args in (["--help"], ["demo", "--help"], ["synth", "--help"], ["embedder", "export", "--help"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0 and "Example" in result.output, args


def test_demo_data_from_a_corpus_with_renamed_headers_or_no_table(tmp_path):
    """`builder demo --corpus DIR` on a realistic folder: a labor-category table whose headers are not
    the demo's ("LCAT Code, Labor Category, ...") trains on its rows under their own column names; a
    folder with no table trains on its prose; a table with no code or title column is refused clearly."""
    import shutil

    from appliance.errors import IngestError
    from builder.demo import write_data

    renamed = tmp_path / "renamed"
    shutil.copytree(DEMO_DATA / "corpus", renamed)
    table = renamed / "reference" / "labor_categories.csv"
    rows = list(csv.DictReader(table.open()))
    headers = {
        "code": "LCAT Code",
        "title": "Labor Category",
        "duties": "Description",
        "education": "Minimum Education",
        "years": "Years of Experience",
    }
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(headers.values()))
        writer.writeheader()
        writer.writerows({headers[k]: v for k, v in r.items()} for r in rows)
    counts = write_data(tmp_path / "data-renamed", renamed, seed=0, quick=True)
    assert counts["table_rows"] == len(rows) and counts["qa_chats"] > 0
    shown = (tmp_path / "data-renamed" / "sft-qa.jsonl").read_text()
    assert "LCAT Code: " in shown and "Minimum Education: " in shown and "\\ncode: " not in shown

    prose_only = tmp_path / "prose"
    shutil.copytree(DEMO_DATA / "corpus" / "proposals", prose_only)
    counts = write_data(tmp_path / "data-prose", prose_only, seed=0, quick=True)
    assert counts["table_rows"] == 0 and counts["qa_chats"] > 0 and counts["copy_drills"] == 0

    (renamed / "reference" / "notes.csv").write_text(
        "Amount,Notes\n1200,paid on delivery after the inspection\n"
    )
    table.unlink()
    with pytest.raises(IngestError, match="no code (or title )?column"):
        write_data(tmp_path / "data-bad", renamed, seed=0, quick=True)
