"""llama.cpp on the builder side: the HF -> GGUF converter and quantization, both from the same pinned
llama-cpp-python release the appliance runs, so converter and runtime always agree.

The converter is `convert_hf_to_gguf.py` from the pinned sdist (`make setup` unpacks it and exports
BUILDER_LLAMA_CPP), run with that tree's own `gguf-py` first on PYTHONPATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from builder.errors import BuilderError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"

# llama.cpp file types (enum llama_ftype) by the names llama-quantize uses.
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q5_0": 8, "Q2_K": 10, "Q3_K_M": 12,
          "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32}


def source_dir() -> Path:
    env = os.environ.get("BUILDER_LLAMA_CPP")
    default = (Path.home() / ".cache" / "slm-appliance" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
               / "vendor" / "llama.cpp")
    path = Path(env) if env else default
    if not (path / "convert_hf_to_gguf.py").is_file():
        raise BuilderError(f"llama.cpp converter not found in {path}",
                           "run `make setup` (it unpacks the pinned llama-cpp-python source), or set "
                           "BUILDER_LLAMA_CPP to its vendor/llama.cpp directory")
    return path


def convert_hf(hf_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """HF checkpoint directory -> GGUF with llama.cpp's own converter."""
    src = source_dir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), os.environ.get("PYTHONPATH", "")]),
               NO_LOCAL_GGUF="", HF_HUB_OFFLINE="1")
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(out),
           "--outtype", outtype]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise BuilderError(f"GGUF conversion of {hf_dir} failed:\n{tail}",
                           "check that the architecture and tokenizer are ones llama.cpp supports "
                           "(a SentencePiece tokenizer.model converts; custom BPE does not)")
    print(f"converted {hf_dir} -> {out} ({out.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s)",
          file=sys.stderr)
    return out


def quantize(src: Path, dst: Path, qtype: str, threads: int = 0) -> Path:
    """Quantize a GGUF with the llama.cpp library the appliance itself runs."""
    import logging

    import llama_cpp

    # llama.cpp logs every tensor while quantizing; keep errors only (the summary is printed below).
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    if qtype.upper() not in FTYPES:
        raise BuilderError(f"unknown quantization type {qtype}", f"choose one of {', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype.upper()]
    params.nthread = threads or (os.cpu_count() or 1)
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise BuilderError(f"quantizing {src} to {qtype} failed (llama.cpp returned {rc})",
                           "tensor sizes must be multiples of the quant block size (32; 256 for K-quants)")
    print(f"quantized {src.name} -> {dst.name} {qtype} ({dst.stat().st_size / 1e6:.1f} MB, "
          f"{time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return dst
