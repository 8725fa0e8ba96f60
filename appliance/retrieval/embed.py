"""The ONNX embedder (the only module that imports onnxruntime).

Reads an embedder directory written by `builder embedder export`: `embedder.json` (name, dim,
pooling, normalize, max_length, the ONNX file to use) and `tokenizer.json`. Embeds in batches on
the CPU; pooling and normalisation follow the manifest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from appliance.errors import ModelError

EMBEDDER_MANIFEST = "embedder.json"
QUERIES_KEPT = 64  # single texts (queries) remembered by an embedder


class OnnxEmbedder:
    def __init__(self, directory: Path, threads: int = 0, batch_size: int = 8, variant: str | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        manifest_path = directory / EMBEDDER_MANIFEST
        if not manifest_path.is_file():
            raise ModelError(
                f"{directory}: no {EMBEDDER_MANIFEST}", "export the embedder with `builder embedder export`"
            )
        self.manifest = json.loads(manifest_path.read_text())
        self.name: str = self.manifest["name"]
        self.dim: int = int(self.manifest["dim"])
        self.pooling: str = self.manifest.get("pooling", "mean")
        self.normalize: bool = bool(self.manifest.get("normalize", True))
        self.batch_size = batch_size
        variant = variant or self.manifest.get("default", "int8")
        model_file = self.manifest["files"].get(variant)
        if model_file is None or not (directory / model_file).is_file():
            raise ModelError(
                f"{directory}: embedder variant '{variant}' is not present",
                f"available: {', '.join(self.manifest['files'])}",
            )
        self.variant = variant
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        max_length = int(self.manifest.get("max_length", 256))
        self.tokenizer.enable_truncation(max_length=max_length)
        self.tokenizer.enable_padding(pad_id=int(self.manifest.get("pad_id", 0)))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(directory / model_file), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ModelError(
                f"{directory / model_file}: onnxruntime cannot load it ({exc})", "re-export the embedder"
            ) from exc
        self.input_names = {i.name for i in self.session.get_inputs()}
        self._queries: dict[str, np.ndarray] = {}  # the last QUERIES_KEPT single texts, oldest first

    def embed(self, texts: list[str]) -> np.ndarray:
        """One vector a text. A single text (a query) is remembered: a question is embedded once for its
        search and found again to rank its evidence (appliance.retrieval.evidence.rank)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) == 1 and (kept := self._queries.get(texts[0])) is not None:
            return kept[None].copy()
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        # Sorting by length keeps padding per batch small; results go back to the caller's order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(texts), self.batch_size):
            idx = order[start : start + self.batch_size]
            out[idx] = self._embed_batch([texts[i] for i in idx])
        if len(texts) == 1:
            self._queries[texts[0]] = out[0].copy()
            while len(self._queries) > QUERIES_KEPT:
                self._queries.pop(next(iter(self._queries)))
        return out

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run(None, feeds)[0]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask[..., None].astype(np.float32)
            pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        if self.normalize:
            pooled = pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return pooled.astype(np.float32)
