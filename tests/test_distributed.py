"""Several training processes (torchrun, DDP over gloo on CPU): every rank trains, rank 0 alone writes
the outputs and runs the single-process stages, and the pipeline still ends in one clean directory."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CORPUS = Path(__file__).resolve().parent.parent / "builder" / "demo_data" / "corpus"


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="torchrun not installed"
)
def test_pipeline_under_torchrun_two_processes(tmp_path):
    chat = {
        "messages": [
            {"role": "user", "content": "Code for an Incident Response Lead?"},
            {"role": "assistant", "content": "15-1212.03 [1]."},
        ]
    }
    (tmp_path / "chats.jsonl").write_text(json.dumps(chat) + "\n" * 1)
    spec = {
        "name": "ddp",
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
                    "steps": 3,
                },
            },
            {
                "name": "sft",
                "stage": "sft",
                "config": {"model": "@pretrain", "datasets": ["chats.jsonl"], "steps": 3, "batch_size": 1},
            },
            {"name": "export", "stage": "export", "config": {"model": "@sft", "quants": ["Q8_0"]}},
        ],
    }
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [
            str(torchrun),
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "builder.cli",
            "run",
            str(tmp_path / "pipeline.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "work"
    assert sorted(p.name for p in work.iterdir()) == [
        "export",
        "pretrain",
        "sft",
    ]  # no .partial, no rank dirs
    sft = json.loads((work / "sft" / "lineage.json").read_text())["result"]
    assert sft["steps"] == 3
    assert (work / "export" / "model-Q8_0.gguf").stat().st_size > 0
    assert proc.stderr.count("export: wrote") == 1  # rank 0 alone exported
