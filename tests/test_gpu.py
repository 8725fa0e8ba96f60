"""The builder's GPU path: bf16 chosen automatically on CUDA, a LoRA step that learns, throughput.

Skipped where there is no CUDA device; run on one with `pytest -m gpu`."""

import json

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_sft_trains_in_bf16_on_cuda_and_loss_falls(tmp_path):
    from builder import sft, synth, training
    from builder.lineage import device

    assert device() == ("cuda", True)
    texts = ["The Incident Response Lead labor category has code 15-1212.03."] * 50
    synth.synthesize("tiny", tmp_path / "base", texts, dtype="bfloat16")
    chat = {
        "messages": [
            {"role": "user", "content": "Code for the Incident Response Lead?"},
            {"role": "assistant", "content": "15-1212.03 [1]."},
        ]
    }
    (tmp_path / "chats.jsonl").write_text(json.dumps(chat) + "\n")
    model = training.load_model(tmp_path / "base")
    assert next(model.parameters()).dtype == torch.bfloat16
    config = sft.SFTConfig(
        out=tmp_path / "sft",
        model=tmp_path / "base",
        datasets=[tmp_path / "chats.jsonl"],
        steps=30,
        batch_size=1,
        learning_rate=5e-3,
        warmup_steps=0,
        lora=training.LoraSettings(r=16, alpha=32, train_embeddings=True),
    )
    sft.run(config)
    result = json.loads((tmp_path / "sft" / "lineage.json").read_text())["result"]
    assert result["last_loss"] < result["first_loss"] * 0.5, result
    assert result["tokens_per_s"] > 0
