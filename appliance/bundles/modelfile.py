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
MAX_ARRAY = 600_000  # the largest real vocabulary or merge list is about 500,000 entries
MAX_STRING = 16_000_000  # one metadata string (a chat template is a few KB)
MAX_KEYS = 100_000
MAX_METADATA_BYTES = 256_000_000
_FIXED = {
    0: 1,
    1: 1,
    2: 2,
    3: 2,
    4: 4,
    5: 4,
    6: 4,
    7: 1,
    10: 8,
    11: 8,
    12: 8,
}  # type -> size; 8 string, 9 array
_MIN_KV_BYTES = 12  # key length (8) + one byte of key + value type (4), at the very least
_MIN_TENSOR_INFO_BYTES = 24  # name length (8) + n_dims (4) + type (4) + offset (8)


def check_header(path: Path) -> tuple[int, int, int]:
    """(version, tensor count, key count) of a GGUF v2/v3, or ModelError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError as exc:
        raise ModelError(
            f"{path}: cannot read the model ({exc.strerror})", "reinstall the generation"
        ) from exc
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise ModelError(f"{path}: not a GGUF file (bad magic)", "reinstall the generation")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise ModelError(
            f"{path}: GGUF version {version} is not supported", "rebuild with the pinned builder"
        )
    if n_tensors * _MIN_TENSOR_INFO_BYTES + n_kv * _MIN_KV_BYTES > size:
        raise ModelError(
            f"{path}: GGUF header claims {n_tensors} tensors and {n_kv} keys, more than a "
            f"{size}-byte file can hold",
            "the file is damaged; rebuild or reinstall it",
        )
    return version, n_tensors, n_kv


def scan_metadata(path: Path) -> int:
    """Walk the key/value section without building it, refusing arrays, strings and totals past their
    bounds before any are read: a 1-million-string array took the gguf reader 21 s and 1.6 GB.
    Returns the section's end offset."""
    _, _, n_kv = check_header(path)
    size = path.stat().st_size
    if n_kv > MAX_KEYS:
        raise ModelError(f"{path}: {n_kv} metadata keys (at most {MAX_KEYS})", "rebuild the model")

    def bad(what: str) -> ModelError:
        return ModelError(
            f"{path}: malformed GGUF metadata ({what})", "the file is damaged or hostile; rebuild it"
        )

    with open(path, "rb") as fh:
        fh.seek(24)

        def u(fmt: str) -> int:
            raw = fh.read(struct.calcsize(fmt))
            if len(raw) != struct.calcsize(fmt):
                raise bad("runs past the end of the file")
            return struct.unpack(fmt, raw)[0]

        def string(what: str) -> None:
            n = u("<Q")
            if n > MAX_STRING:
                raise bad(f"{what}: a string of {n} bytes (at most {MAX_STRING})")
            fh.seek(n, 1)

        def value(kind: int, key: str, depth: int = 0) -> None:
            if kind in _FIXED:
                fh.seek(_FIXED[kind], 1)
            elif kind == 8:
                string(key)
            elif kind == 9 and depth < 2:
                inner, count = u("<I"), u("<Q")
                if count > MAX_ARRAY:
                    raise bad(f"{key}: an array of {count} items (at most {MAX_ARRAY})")
                if inner in _FIXED:
                    fh.seek(_FIXED[inner] * count, 1)
                else:
                    for _ in range(count):
                        value(inner, key, depth + 1)
            else:
                raise bad(f"{key}: value type {kind} is not a GGUF type")
            if fh.tell() > min(size, MAX_METADATA_BYTES):
                raise bad(f"{key}: runs past {min(size, MAX_METADATA_BYTES)} bytes")

        for _ in range(n_kv):
            n = u("<Q")
            if n > 65_536:
                raise bad(f"a key of {n} bytes")
            key = fh.read(n).decode("utf-8", errors="replace")
            value(u("<I"), key)
        return fh.tell()


def validate(path: Path) -> dict:
    """Parse the header and tensor table; return a summary, or raise ModelError naming the defect."""
    import gguf

    _, n_tensors, n_kv = check_header(path)
    scan_metadata(path)  # bounded before the gguf reader materialises any of it
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, struct.error, OSError) as exc:
        raise ModelError(
            f"{path}: malformed GGUF ({exc})", "the file is damaged or truncated; rebuild it"
        ) from exc
    if len(reader.tensors) != n_tensors:
        raise ModelError(
            f"{path}: header says {n_tensors} tensors, the table holds {len(reader.tensors)}",
            "the file is damaged; rebuild it",
        )
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        raise ModelError(f"{path}: no general.architecture key", "convert the model with the pinned builder")
    architecture = bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8", errors="replace")
    end = 0
    for tensor in sorted(reader.tensors, key=lambda t: t.data_offset):
        if tensor.n_elements <= 0 or any(int(d) <= 0 for d in tensor.shape):
            raise ModelError(
                f"{path}: tensor {tensor.name} has shape {list(tensor.shape)}", "rebuild the model"
            )
        if tensor.data_offset < end:
            raise ModelError(f"{path}: tensor {tensor.name} overlaps the one before it", "rebuild the model")
        end = tensor.data_offset + tensor.n_bytes
        if end > size:
            raise ModelError(
                f"{path}: tensor {tensor.name} ends at byte {end}, past the end of the file ({size})",
                "the file is truncated; copy or rebuild it",
            )
    return {
        "architecture": architecture,
        "tensors": n_tensors,
        "keys": n_kv,
        "bytes": size,
        "embedded_chat_template_ignored": "tokenizer.chat_template" in reader.fields,
    }
