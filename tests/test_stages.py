"""The builder's stages on tiny models on CPU: artifacts, lineage, learning, refusals, resumability."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from builder import lineage
from builder.errors import BuilderError, GateFailed

CORPUS = Path(__file__).resolve().parent.parent / "builder" / "demo_data" / "corpus"
REPLY = "The Incident Response Lead labor category has code 15-1212.03 [1]."


def chat(reply: str = REPLY) -> dict:
    return {
        "messages": [
            {"role": "system", "content": "Use only the numbered sources."},
            {"role": "user", "content": "Which code for an Incident Response Lead?"},
            {"role": "assistant", "content": reply},
        ]
    }


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """pretrain (from scratch, tiny) -> two SFT variants -> DPO, each a few steps."""
    from builder import align, pretrain, sft, training

    root = tmp_path_factory.mktemp("stages")
    (root / "chats.jsonl").write_text(json.dumps(chat()) + "\n")
    pairs = [
        {
            "prompt": chat()["messages"][:-1],
            "chosen": REPLY,
            "rejected": "The Incident Response Lead labor category has code 15-9999.99.",
        },
        {"prompt": chat()["messages"][:-1], "chosen": REPLY},
    ]  # rejected sampled from the model
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    pre = pretrain.run(
        pretrain.PretrainConfig(
            out=root / "pretrain",
            init_shape="tiny",
            tokenizer_vocab_size=512,
            corpus=[CORPUS / "proposals"],
            seq_len=64,
            batch_size=4,
            steps=30,
            learning_rate=3e-3,
            warmup_steps=0,
            eval_fraction=0.1,
        )
    )
    lora = training.LoraSettings(r=16, alpha=32, train_embeddings=True)
    sft_a = sft.run(
        sft.SFTConfig(
            out=root / "sft-a",
            model=pre,
            datasets=[root / "chats.jsonl"],
            lora=lora,
            steps=25,
            batch_size=1,
            learning_rate=5e-3,
            warmup_steps=0,
        )
    )
    sft_b = sft.run(
        sft.SFTConfig(
            out=root / "sft-b",
            model=pre,
            datasets=[root / "chats.jsonl"],
            lora=lora,
            steps=5,
            batch_size=1,
            learning_rate=5e-3,
            warmup_steps=0,
            seed=1,
        )
    )
    aligned = align.run(
        align.AlignConfig(
            out=root / "align",
            model=sft_a,
            datasets=[root / "pairs.jsonl"],
            lora=lora,
            steps=4,
            batch_size=2,
            sample_max_tokens=6,
        )
    )
    return {"root": root, "pretrain": pre, "sft-a": sft_a, "sft-b": sft_b, "align": aligned}


def result(out: Path) -> dict:
    return json.loads((out / "lineage.json").read_text())["result"]


def test_pretrain_writes_checkpoint_and_lineage_and_learns(stages):
    out = stages["pretrain"]
    assert {"config.json", "model.safetensors", "tokenizer.model", "lineage.json"} <= {
        p.name for p in out.iterdir()
    }
    record = json.loads((out / "lineage.json").read_text())
    assert record["config"]["init_shape"] == "tiny" and record["versions"]["torch"]
    corpus_input = record["inputs"][str(CORPUS / "proposals")]
    assert corpus_input == lineage.hash_path(CORPUS / "proposals") and len(corpus_input) == 64
    assert record["result"]["last_loss"] < record["result"]["first_loss"] - 0.3
    assert record["result"]["eval_loss"] is not None
    assert not (out / "trainer").exists() and not out.with_name("pretrain.partial").exists()


def test_sft_learns_the_reply_and_only_the_reply(stages):
    from builder import training

    r = result(stages["sft-a"])
    assert r["last_loss"] < r["first_loss"] * 0.5, r
    assert (stages["sft-a"] / "adapter" / "adapter_config.json").is_file()
    tok = training.Tokenizer(stages["pretrain"])
    ids, mask = training.encode_chat(tok, chat()["messages"])
    learned = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(learned).strip() == REPLY  # the reply and its EOS, nothing of the prompt
    assert learned[-1] == tok.eos_id
    prompt, completion = training.prompt_completion(tok, chat()["messages"])
    assert (
        tok.encode(prompt) + tok.encode(completion) == ids[: len(tok.encode(prompt) + tok.encode(completion))]
    )


def test_sft_leaves_out_chats_whose_reply_is_cut_and_refuses_when_none_is_left(stages, tmp_path):
    """A chat cut before its reply starts has nothing to learn: left out and counted; when that is every
    chat, a BuilderError says so (TRL would fail on an empty dataset with a sampler's ValueError)."""
    from builder import sft

    long = chat()
    long["messages"][1]["content"] = "Sources: " + "the incident response plan " * 200
    (tmp_path / "long.jsonl").write_text(json.dumps(long) + "\n")
    (tmp_path / "mixed.jsonl").write_text(json.dumps(long) + "\n" + json.dumps(chat()) + "\n")
    with pytest.raises(BuilderError, match="longer than max_length"):
        sft.run(
            sft.SFTConfig(
                out=tmp_path / "none",
                model=stages["pretrain"],
                datasets=[tmp_path / "long.jsonl"],
                steps=1,
                batch_size=1,
                max_length=64,
            )
        )
    assert not (tmp_path / "none").exists()
    out = sft.run(
        sft.SFTConfig(
            out=tmp_path / "one",
            model=stages["pretrain"],
            datasets=[tmp_path / "mixed.jsonl"],
            steps=1,
            batch_size=1,
            max_length=64,
        )
    )
    assert (result(out)["chats"], result(out)["left_out"]) == (1, 1)


def test_align_samples_missing_rejected_replies_and_trains(stages):
    r = result(stages["align"])
    assert r["generated_rejected"] == 1 and r["pairs"] + r["dropped_identical"] == 2
    assert r["steps"] == 4 and "rewards_margins" in r


def test_merge_refuses_mismatched_models_before_reading_tensors(stages, tmp_path):
    from builder import merge
    from builder.synth import synthesize

    other = tmp_path / "other"
    synthesize("tiny", other, ["some text to train a tokenizer on"] * 50)
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (other / "config.json").write_text(json.dumps(cfg))
    (other / "model.safetensors").write_bytes(b"not read")  # proves no tensor is read
    config = merge.MergeConfig(
        out=tmp_path / "m",
        method="ties",
        base_model=stages["pretrain"],
        models=[{"model": stages["sft-a"]}, {"model": other}],
    )
    with pytest.raises(BuilderError, match=r"num_hidden_layers differs \(3 vs 2\)"):
        merge.run(config)
    cfg["num_hidden_layers"] = 2
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BuilderError, match="tokenizer.model files differ"):
        merge.run(config)
    assert not (tmp_path / "m").exists()


def test_ties_merge_loads_and_generates(stages):
    import llama_cpp
    import torch

    from builder import llamacpp, merge

    out = merge.run(
        merge.MergeConfig(
            out=stages["root"] / "merge",
            method="ties",
            base_model=stages["pretrain"],
            models=[
                {"model": stages["align"], "density": 0.7, "weight": 0.5},
                {"model": stages["sft-b"], "density": 0.7, "weight": 0.5},
            ],
        )
    )
    assert result(out)["recipe"]["merge_method"] == "ties"
    # the merge combined the two models' changes to the base: not a copy of the base or of either model
    from transformers import LlamaForCausalLM

    def weights(path):
        return {k: v.float() for k, v in LlamaForCausalLM.from_pretrained(path).state_dict().items()}

    base, a, b, merged = (weights(p) for p in (stages["pretrain"], stages["align"], stages["sft-b"], out))
    name = "model.layers.0.self_attn.q_proj.weight"
    da, db, dm = a[name] - base[name], b[name] - base[name], merged[name] - base[name]
    assert da.abs().max() > 0 and db.abs().max() > 0, (
        "the inputs must differ from the base for this to mean anything"
    )
    assert (
        dm.abs().max() > 0
        and not torch.equal(merged[name], a[name])
        and not torch.equal(merged[name], b[name])
    )
    assert (
        dm.abs() <= torch.maximum(da.abs(), db.abs()) + 1e-4
    ).all()  # TIES never goes past the inputs' changes
    assert torch.nn.functional.cosine_similarity(dm.flatten(), (da + db).flatten(), dim=0) > 0.5
    gguf = llamacpp.convert_hf(out, stages["root"] / "merged.gguf", "f16")
    llm = llama_cpp.Llama(str(gguf), n_ctx=256, verbose=False, n_threads=2)
    try:
        out = llm(
            "<|user|>\nWhich code for an Incident Response Lead?\n<|assistant|>\n",
            max_tokens=12,
            temperature=0.0,
        )
    finally:
        llm.close()
    assert out["usage"]["completion_tokens"] >= 1 and out["choices"][0]["text"]


def test_merge_config_checks_method_needs():
    from builder.merge import MergeConfig

    with pytest.raises(ValueError, match="ties needs base_model"):
        MergeConfig(out=Path("x"), method="ties", models=[{"model": "a"}, {"model": "b"}])
    with pytest.raises(ValueError, match="slerp merges exactly two models and needs t"):
        MergeConfig(out=Path("x"), method="slerp", base_model="a", models=[{"model": "a"}, {"model": "b"}])


@pytest.fixture(scope="module")
def exported(stages):
    from builder import export

    return export.run(
        export.ExportConfig(out=stages["root"] / "export", model=stages["sft-a"], quants=["Q8_0", "Q4_K_M"])
    )


def test_export_writes_each_quant_and_perplexity_stays_close(exported):
    from builder import llamacpp

    files = json.loads((exported / "export.json").read_text())["files"]
    assert set(files) == {"F16", "Q8_0", "Q4_K_M"}
    # the tiny model's rows (64 wide) cannot take K-quant blocks (256): llama.cpp falls back, recorded
    assert files["Q4_K_M"]["fallback_tensors"] > 0 and files["Q8_0"]["fallback_tensors"] == 0
    text = (CORPUS / "proposals" / "2020-SBA-loan-portal.md").read_text()
    ppl = {q: llamacpp.perplexity(exported / f"model-{q}.gguf", text, ctx=128)["perplexity"] for q in files}
    assert ppl["Q8_0"] < ppl["F16"] * 1.02
    assert ppl["Q4_K_M"] < ppl["F16"] * 1.25


def test_export_of_an_adapter_merges_it_into_its_base(stages, tmp_path):
    from builder import export

    out = export.run(
        export.ExportConfig(
            out=tmp_path / "e", model=stages["sft-a"] / "adapter", base=stages["pretrain"], quants=["Q8_0"]
        )
    )
    assert (out / "model-Q8_0.gguf").stat().st_size > 0 and not (out / "merged-hf").exists()


def test_export_refuses_rows_that_no_block_fits(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from builder import export, llamacpp
    from builder.synth import train_tokenizer

    train_tokenizer(["odd widths need a clear refusal"] * 50, tmp_path / "odd", 300)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=512,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).save_pretrained(tmp_path / "odd")
    f16 = llamacpp.convert_hf(tmp_path / "odd", tmp_path / "odd.gguf", "f16")
    with pytest.raises(BuilderError, match=r"rows of 48 values: Q4_K_M cannot store them"):
        export.row_check(f16, "Q4_K_M")
    with pytest.raises(ValueError, match="need an importance matrix"):
        export.ExportConfig(out=tmp_path / "x", model=tmp_path / "odd", quants=["IQ2_XS"])
    with pytest.raises(ValueError, match="unknown quant type Q3_WHAT"):
        export.ExportConfig(out=tmp_path / "x", model=tmp_path / "odd", quants=["Q3_WHAT"])


def test_eval_gate_fails_with_the_numbers(exported, embedder_dir, tmp_path):
    from builder import evaluate

    questions = tmp_path / "q.jsonl"
    questions.write_text(
        json.dumps(
            {
                "id": "a",
                "kind": "lcat_code",
                "question": "Code of an Incident Response Lead?",
                "must_contain": ["15-1212.03"],
            }
        )
        + "\n"
    )
    # the release this one replaces answered the same question (and one no longer asked) exactly
    answered = {"retrieved_answer_source": True, "with_retrieval": {"exact": True}}
    before = {
        "tasks": {
            "Q8_0": {
                "answers": [
                    {"question": "Code of an Incident Response Lead?", "kind": "lcat_code", **answered}
                    | {"without_retrieval": {"exact": False}},
                    {"question": "A question dropped since?", "kind": "lcat_code", **answered}
                    | {"without_retrieval": {"exact": False}},
                ]
            }
        }
    }
    (tmp_path / "previous.json").write_text(json.dumps(before))
    (tmp_path / "garbled.json").write_text(json.dumps({"tasks": {"Q8_0": {"answers": [{"question": 1}]}}}))
    config = evaluate.EvalConfig(
        out=tmp_path / "eval",
        export=exported,
        heldout=[CORPUS / "proposals" / "2020-SBA-loan-portal.md"],
        ppl_ctx=128,
        questions=questions,
        corpus=[CORPUS / "reference"],
        embedder=embedder_dir,
        max_tokens=8,
        gate={"max_ppl_increase": 0.5, "min_accuracy_with_retrieval": 0.9, "kind": "lcat_code"},
        previous=tmp_path / "garbled.json",
    )
    with pytest.raises(BuilderError, match="garbled.json: no answered questions"):  # before any answering
        evaluate.run(config)
    assert not (tmp_path / "eval" / "eval.json").exists()
    config.previous = tmp_path / "previous.json"
    with pytest.raises(
        GateFailed, match=r"Q8_0 on lcat_code questions: 0% exact with retrieval \(needs >= 90%\)"
    ):
        evaluate.run(config)
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["gate"]["passed"] is False
    # the next cycle: compared on the one question both releases were asked
    assert report["previous"]["tasks"]["Q8_0"]["previous"]["overall"]["questions"] == 1
    assert (
        "Q8_0 on lcat_code questions: 0% exact with retrieval on the 1 question the previous release was "
        "also asked, against its 100% (allowed drop 5%)"
    ) in report["gate"]["failures"]
    assert set(report["perplexity"]) == {"F16", "Q8_0", "Q4_K_M"}
    row = report["tasks"]["Q8_0"]["answers"][0]
    assert (
        row["retrieved_answer_source"] is True
    )  # retrieval found the row; the tiny model just cannot read it
    with pytest.raises(GateFailed):  # the gate holds on every later look, not only the first
        evaluate.check_gate(tmp_path / "eval")


def test_eval_resumes_where_it_stopped(exported, embedder_dir, tmp_path, monkeypatch, capfd):
    """An eval interrupted at its third question asks only that one again; a changed config or a line
    the interruption cut short is not trusted."""
    from appliance.retrieval import rag
    from builder import evaluate

    questions = tmp_path / "q.jsonl"
    asked = [
        ("Code of an Incident Response Lead?", "15-1212.03"),
        ("Code of a Cloud Architect?", "15-1241.00"),
    ]
    asked.append(("Code of a Database Administrator?", "15-1242.00"))
    questions.write_text(
        "".join(
            json.dumps({"id": str(i), "kind": "lcat_code", "question": q, "must_contain": [code]}) + "\n"
            for i, (q, code) in enumerate(asked)
        )
    )
    config = evaluate.EvalConfig(
        out=tmp_path / "eval",
        export=exported,
        questions=questions,
        corpus=[CORPUS / "reference"],
        embedder=embedder_dir,
        max_tokens=4,
        task_quants=["Q8_0"],
        gate={"max_ppl_increase": None},
    )
    real, calls = rag.answer, []

    def answer(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 5:  # the third question, with retrieval
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(rag, "answer", answer)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run(config)
    assert not (tmp_path / "eval").exists()
    log = tmp_path / "eval.checkpoints" / "answers.jsonl"
    assert len(log.read_text().splitlines()) == 3  # the key, then two whole answers
    calls.clear()
    evaluate.run(config)
    assert calls == [asked[2][0]] * 2  # with retrieval and without: the only question asked again
    assert "eval: Q8_0 2 of 3 answers kept from an interrupted run" in capfd.readouterr().err
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert [a["question"] for a in report["tasks"]["Q8_0"]["answers"]] == [q for q, _ in asked]
    assert not log.parent.exists()  # the output landed: nothing left to resume
    # what is not trusted: another config's answers, and the line an interruption cut short
    key = "k1"
    evaluate.AnswerLog(config.out, key).add("eval", "Q8_0", "q?", {"exact": True})
    with log.open("a") as fh:
        fh.write('{"label": "eval", "quant": "Q8_0", "quest')
    assert set(evaluate.AnswerLog(config.out, key).done) == {("eval", "Q8_0", "q?")}
    assert evaluate.AnswerLog(config.out, "k2").done == {}


def _pipeline(tmp_path: Path, sft_steps: int) -> Path:
    (tmp_path / "chats.jsonl").write_text(json.dumps(chat()) + "\n")
    spec = {
        "name": "t",
        "work": "work",
        "stages": [
            {
                "name": "pretrain",
                "stage": "pretrain",
                "config": {
                    "init_shape": "tiny",
                    "tokenizer_vocab_size": 512,
                    "corpus": [str(CORPUS / "proposals")],
                    "seq_len": 64,
                    "batch_size": 2,
                    "steps": 2,
                },
            },
            {
                "name": "sft",
                "stage": "sft",
                "config": {
                    "model": "@pretrain",
                    "datasets": ["chats.jsonl"],
                    "steps": sft_steps,
                    "batch_size": 1,
                },
            },
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_run_skips_unchanged_stages_and_reruns_what_changed(tmp_path):
    from builder import pipeline

    path = _pipeline(tmp_path, 2)
    first = pipeline.run(path)
    assert [s["skipped"] for s in first["stages"].values()] == [False, False]
    assert [s["skipped"] for s in pipeline.run(path)["stages"].values()] == [True, True]
    (tmp_path / "chats.jsonl").write_text(json.dumps(chat("Another reply [1].")) + "\n")
    assert [s["skipped"] for s in pipeline.run(path)["stages"].values()] == [True, False]
    forced = pipeline.run(path, force=["pretrain"])["stages"]
    assert forced["pretrain"]["skipped"] is False  # sft reruns only if the new output differs


def test_run_resumes_after_a_stage_is_killed(tmp_path):
    path = _pipeline(tmp_path, 100_000)
    builder = [sys.executable, "-m", "builder.cli", "run", str(path)]
    proc = subprocess.Popen(builder, stderr=subprocess.PIPE, text=True, start_new_session=True)
    partial = tmp_path / "work" / "sft.partial"
    deadline = time.monotonic() + 120
    while not partial.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial.exists() and not (tmp_path / "work" / "sft").exists()  # nothing looks finished
    assert (tmp_path / "work" / "pretrain" / "lineage.json").is_file()
    spec = yaml.safe_load(path.read_text())
    spec["stages"][1]["config"]["steps"] = 2  # (only to end the test quickly: sft reruns either way)
    path.write_text(yaml.safe_dump(spec))
    done = subprocess.run(builder, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "[pretrain] unchanged, skipped" in done.stderr and "[sft] running sft" in done.stderr
    assert (tmp_path / "work" / "sft" / "lineage.json").is_file() and not partial.exists()


def test_config_errors_name_the_field_and_exit_4(tmp_path):
    from click.testing import CliRunner

    from builder.cli import cli

    bad = tmp_path / "sft.yaml"
    bad.write_text("out: o\nmodel: m\ndatasets: [d.jsonl]\nlearning_rte: 0.1\nsteps: -1\n")
    run = CliRunner().invoke(cli, ["sft", str(bad)])
    assert run.exit_code == 4
    assert "learning_rte: Extra inputs are not permitted" in run.output
    assert "steps: Input should be greater than or equal to 1" in run.output
    (tmp_path / "p.yaml").write_text(
        "name: x\nwork: w\nstages:\n  - {name: a, stage: sft, config: {model: '@b'}}\n"
    )
    run = CliRunner().invoke(cli, ["run", str(tmp_path / "p.yaml")])
    assert run.exit_code == 4 and "refers to @b, which is not an earlier stage" in run.output
    (tmp_path / "g.yaml").write_text(
        "name: x\nwork: w\nstages:\n  - {name: e, stage: embedder, config: {}}\n"
        "generation: {out: g, model: '@export/model-Q8_0.gguf', embedder: '@e'}\n"
    )
    run = CliRunner().invoke(cli, ["run", str(tmp_path / "g.yaml")])
    assert run.exit_code == 4 and "generation refers to @export, which is not a stage" in run.output


def test_stage_help_lists_every_field():
    from click.testing import CliRunner

    from builder.cli import cli
    from builder.pretrain import PretrainConfig

    out = CliRunner().invoke(cli, ["pretrain", "--help"]).output
    assert all(f"  {name}:" in out for name in PretrainConfig.model_fields)
    assert "Example CONFIG" in out


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A checkpoint shaped like Qwen's: a byte-level BPE tokenizer.json and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("hf-base")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [p.read_text() for p in (CORPUS / "proposals").glob("*.md")]
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=600,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=False,
        )
    ).save_pretrained(out)
    return out


def test_sft_on_a_hugging_face_tokenizer_and_its_own_template(hf_checkpoint, tmp_path):
    from builder import sft, training

    tok = training.Tokenizer(hf_checkpoint)
    assert tok.hf is not None and "<|im_start|>" in tok.template_text
    ids, mask = training.encode_chat(tok, chat()["messages"])
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == REPLY + "<|im_end|>"
    (tmp_path / "chats.jsonl").write_text(json.dumps(chat()) + "\n")
    out = sft.run(
        sft.SFTConfig(
            out=tmp_path / "sft",
            model=hf_checkpoint,
            datasets=[tmp_path / "chats.jsonl"],
            steps=20,
            batch_size=1,
            learning_rate=5e-3,
            warmup_steps=0,
            lora={"r": 16, "alpha": 32, "train_embeddings": True},
        )
    )
    r = result(out)
    assert r["last_loss"] < r["first_loss"] * 0.6, r
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").read_text() == CHATML


def test_the_base_models_pipelines_are_valid():
    """The pipelines in models/ load, every stage config validates, and they start from their manifest."""
    from builder import pipeline

    models = Path(__file__).resolve().parent.parent / "models"
    for path in sorted(models.glob("*/*.yaml")):
        if path.name == "model.yaml":
            continue
        spec = pipeline.load(path)
        configs = pipeline.stage_configs(spec, path.parent)
        assert spec.base == (path.parent / "model.yaml").resolve(), path
        assert [s.stage for s, _ in configs] == [
            "pretrain",
            "sft",
            "sft",
            "align",
            "merge",
            "export",
            "export",
            "embedder",
            "eval",
        ], path
        evaluation = next(c for s, c in configs if s.stage == "eval")
        assert evaluation.baseline is not None and evaluation.gate.beat_baseline, path
    gpu = pipeline.stage_configs(
        pipeline.load(models / "smollm2-135m-instruct" / "gpu-workstation.yaml"),
        models / "smollm2-135m-instruct",
    )
    export = next(c for s, c in gpu if s.name == "export")
    assert "Q4_K_M" in export.quants and export.imatrix is not None
    assert next(c for s, c in gpu if s.name == "sft-qa").steps >= 1000


@pytest.mark.slow
def test_export_with_an_importance_matrix_from_the_corpus(stages, tmp_path):
    """llama-imatrix and llama-quantize are built from the pinned source once (cached beside it)."""
    import llama_cpp

    from builder import export

    out = export.run(
        export.ExportConfig(
            out=tmp_path / "e",
            model=stages["sft-a"],
            quants=["IQ4_XS", "Q4_K_M"],
            imatrix={"corpus": [CORPUS / "proposals"], "chunks": 4, "ctx": 128},
        )
    )
    report = json.loads((out / "export.json").read_text())
    assert len(report["imatrix"]["sha256"]) == 64 and (out / "imatrix.gguf").is_file()
    assert not (out / "calibration.txt").exists()
    for quant in ("IQ4_XS", "Q4_K_M"):
        llm = llama_cpp.Llama(str(out / f"model-{quant}.gguf"), n_ctx=64, verbose=False, n_threads=2)
        try:
            assert llm.tokenize(b"Transition plan") and llm.n_vocab() == 512
        finally:
            llm.close()


def test_pretrain_mixes_replay_text_at_the_ratio_asked(tmp_path):
    from builder import pretrain

    general = tmp_path / "general.jsonl"
    general.write_text(
        "".join(json.dumps({"text": f"General text number {i}. " * 40}) + "\n" for i in range(20))
    )
    out = pretrain.run(
        pretrain.PretrainConfig(
            out=tmp_path / "p",
            init_shape="tiny",
            tokenizer_vocab_size=512,
            corpus=[CORPUS / "proposals"],
            replay=[general],
            replay_ratio=0.25,
            seq_len=64,
            batch_size=2,
            steps=2,
            eval_fraction=0.1,
        )
    )
    r = result(out)
    domain = r["train_blocks"] - r["replay_blocks"]
    assert r["replay_blocks"] == round(domain * 0.25 / 0.75) > 0
    with pytest.raises(ValueError, match="replay_ratio > 0 needs replay text"):
        pretrain.PretrainConfig(out=tmp_path / "x", init_shape="tiny", corpus=[CORPUS], replay_ratio=0.2)
    with pytest.raises(ValueError, match="exactly one of base"):
        pretrain.PretrainConfig(out=tmp_path / "x", corpus=[CORPUS])


def test_a_killed_training_stage_resumes_from_its_last_checkpoint(stages, tmp_path):
    (tmp_path / "chats.jsonl").write_text(json.dumps(chat()) + "\n")
    config = tmp_path / "sft.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "out": "sft",
                "model": str(stages["pretrain"]),
                "datasets": ["chats.jsonl"],
                "steps": 100_000,
                "max_minutes": 0.2,
                "save_every": 5,
                "batch_size": 1,
            }
        )
    )
    builder = [sys.executable, "-m", "builder.cli", "sft", str(config)]
    proc = subprocess.Popen(builder, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = tmp_path / "sft.checkpoints"
    deadline = time.monotonic() + 120
    while (
        not list(checkpoints.glob("*/checkpoint-*/trainer_state.json"))
        and time.monotonic() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = sorted(
        (p.parent for p in checkpoints.glob("*/checkpoint-*/trainer_state.json")),
        key=lambda p: int(p.name.split("-")[1]),
    )
    assert saved and not (tmp_path / "sft").exists()
    # as if the kill had come while the next checkpoint was being written
    half = saved[-1].with_name(f"checkpoint-{int(saved[-1].name.split('-')[1]) + 1000}")
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"cut off")
    done = subprocess.run(builder, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stderr
    r = result(tmp_path / "sft")
    assert r["resumed_from"] and r["resumed_from"] != str(half)
    assert r["steps"] > int(Path(r["resumed_from"]).name.split("-")[1])
    assert not checkpoints.exists()  # removed once the stage completed


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "dare_ties", "slerp"])
def test_every_merge_method_writes_a_checkpoint(stages, tmp_path, method):
    from transformers import LlamaForCausalLM

    from builder import merge

    models = [
        {"model": stages["sft-a"], "weight": 0.5, "density": 0.7},
        {"model": stages["sft-b"], "weight": 0.5},
    ]
    if method in ("linear", "slerp"):
        models = [{"model": m["model"], "weight": 0.5} for m in models]
    out = merge.run(
        merge.MergeConfig(
            out=tmp_path / method,
            method=method,
            models=models,
            base_model=None if method == "linear" else stages["pretrain"],
            t=0.5 if method == "slerp" else None,
        )
    )
    assert result(out)["recipe"]["merge_method"] == method
    merged = LlamaForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in merged.parameters()) > 0 and (out / "tokenizer.model").is_file()


def test_lm_head_on_labelled_positions_only_gives_the_same_loss(stages):
    """builder sft and align have TRL score only the positions that carry a label (on a CPU TRL scores
    every one); the loss must not change, only the time."""
    import torch
    import trl.trainer.utils as trl_utils

    from builder import training

    model = training.load_model(stages["pretrain"])
    trl_utils.add_fused_lm_head(model)
    torch.manual_seed(0)
    ids = torch.randint(0, 500, (2, 48))
    labels = ids.clone()
    labels[:, :36] = -100  # a prompt, then a reply
    assert training.score_labelled_positions_only()
    assert trl_utils._use_triton(torch.device("cpu")) is True
    with torch.no_grad():
        labelled = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
        patched, trl_utils._use_triton = trl_utils._use_triton, trl_utils._use_triton.original
        try:
            every = model(input_ids=ids, labels=labels, fused_lm_head=True).loss
        finally:
            trl_utils._use_triton = patched
        plain = model(input_ids=ids, labels=labels).loss  # transformers' own loss over full logits
    assert torch.allclose(labelled, every, atol=1e-5) and torch.allclose(labelled, plain, atol=1e-4), (
        labelled,
        every,
        plain,
    )


def test_precision_auto_uses_bf16_only_where_the_cpu_has_it(tmp_path, monkeypatch, capsys):
    """bf16 on a CPU without bf16 instructions is emulated (60x slower than fp32 on an AVX2 EPYC): auto
    picks it only where the CPU multiplies bf16 itself, and asking for it there anyway is warned about."""
    from builder import training

    def bf16_of(precision: str) -> bool:
        return training.training_arguments(
            tmp_path,
            steps=1,
            batch_size=1,
            grad_accum=1,
            learning_rate=1e-4,
            warmup_steps=0,
            seed=0,
            precision=precision,
        ).bf16

    for native in (False, True):
        monkeypatch.setattr(training, "cpu_has_bf16", lambda native=native: native)
        assert bf16_of("auto") is native and bf16_of("fp32") is False
        capsys.readouterr()
        assert bf16_of("bf16") is True
        assert ("without bf16 instructions" in capsys.readouterr().err) is not native
