"""GGUF structure checks, in Python, before llama.cpp parses a file.

`check_header` is cheap (24 bytes) and runs every time a model is loaded. `validate` parses the whole
header and tensor table with the `gguf` reader and runs when a generation is installed: bad magic,
implausible counts, a truncated file, tensors pointing outside the file or overlapping are refused
with a `ModelError`. A chat template stored inside the GGUF is reported and never used: the template
comes from the generation directory.
"""

from __future__ import annotations

import struct
from pathlib import Path

from appliance.errors import ModelError

GGUF_MAGIC = b"GGUF"
_MIN_KV_BYTES = 12  # key length (8) + one byte of key + value type (4), at the very least
_MIN_TENSOR_INFO_BYTES = 24  # name length (8) + n_dims (4) + type (4) + offset (8)


def check_header(path: Path) -> tuple[int, int, int]:
    """(version, tensor count, key count) of a GGUF v2/v3, or ModelError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model ({exc.strerror})", "reinstall the generation") from exc
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise ModelError(f"{path}: not a GGUF file (bad magic)", "reinstall the generation")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise ModelError(f"{path}: GGUF version {version} is not supported", "rebuild with the pinned builder")
    if n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > size:
        raise ModelError(f"{path}: GGUF header claims {n_tensors} tensors and {n_kv} keys, more than a "
                         f"{size}-byte file can hold", "the file is damaged; rebuild or reinstall it")
    return version, n_tensors, n_kv


def validate(path: Path) -> dict:
    """Parse the header and tensor table; return a summary, or raise ModelError naming the defect."""
    import gguf

    _, n_tensors, n_kv = check_header(path)
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, struct.error, OSError) as exc:
        raise ModelError(f"{path}: malformed GGUF ({exc})", "the file is damaged or truncated; rebuild it") from exc
    if len(reader.tensors) != n_tensors:
        raise ModelError(f"{path}: header says {n_tensors} tensors, the table holds {len(reader.tensors)}",
                         "the file is damaged; rebuild it")
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        raise ModelError(f"{path}: no general.architecture key", "convert the model with the pinned builder")
    architecture = bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8", errors="replace")
    end = 0
    for tensor in sorted(reader.tensors, key=lambda t: t.data_offset):
        if tensor.n_elements <= 0 or any(int(d) <= 0 for d in tensor.shape):
            raise ModelError(f"{path}: tensor {tensor.name} has shape {list(tensor.shape)}", "rebuild the model")
        if tensor.data_offset < end:
            raise ModelError(f"{path}: tensor {tensor.name} overlaps the one before it", "rebuild the model")
        end = tensor.data_offset + tensor.n_bytes
        if end > size:
            raise ModelError(f"{path}: tensor {tensor.name} ends at byte {end}, past the end of the file "
                             f"({size})", "the file is truncated; copy or rebuild it")
    return {"architecture": architecture, "tensors": n_tensors, "keys": n_kv, "bytes": size,
            "embedded_chat_template_ignored": "tokenizer.chat_template" in reader.fields}
