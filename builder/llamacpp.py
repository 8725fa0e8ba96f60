"""llama.cpp on the builder side: the HF -> GGUF converter and quantization, both from the same pinned
llama-cpp-python release the appliance runs, so converter and runtime always agree.

The converter is `convert_hf_to_gguf.py` from the pinned sdist (`make setup` unpacks it and exports
BUILDER_LLAMA_CPP), run with that tree's own `gguf-py` first on PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from builder.errors import BuilderError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"

# The file types llama-quantize offers, by its names; their llama_ftype numbers come from gguf-py's
# LlamaFileType and each type's block width from GGML_QUANT_SIZES, not from a copy kept here.
QUANT_NAMES = (
    "F32",
    "F16",
    "BF16",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q2_K_S",
    "Q3_K_S",
    "Q3_K_M",
    "Q3_K_L",
    "Q4_K_S",
    "Q4_K_M",
    "Q5_K_S",
    "Q5_K_M",
    "Q6_K",
    "IQ1_S",
    "IQ1_M",
    "IQ2_XXS",
    "IQ2_XS",
    "IQ2_S",
    "IQ2_M",
    "IQ3_XXS",
    "IQ3_XS",
    "IQ3_S",
    "IQ3_M",
    "IQ4_NL",
    "IQ4_XS",
)
FTYPES = {
    name: int(LlamaFileType.ALL_F32 if name == "F32" else LlamaFileType[f"MOSTLY_{name}"])
    for name in QUANT_NAMES
}
# Types llama.cpp refuses to make without an importance matrix (llama-quantize's own list).
NEEDS_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M", "Q2_K_S"}


def _block_width(name: str) -> int:
    """The row length a file type's main tensor type packs in one block (Q4_K_M: Q4_K's 256); the
    IQ mixes without a tensor type of their own (IQ3_M, IQ2_M, IQ3_XS) are built of 256-wide types."""
    for candidate in (name, name.rsplit("_", 1)[0]):
        if candidate in GGMLQuantizationType.__members__:
            return GGML_QUANT_SIZES[GGMLQuantizationType[candidate]][0]
    return 256


# Row length each type's blocks need; K and IQ types fall back to a 32-wide type on other rows.
BLOCK = {name: _block_width(name) for name in FTYPES}
TOOLS = ("llama-imatrix", "llama-quantize")


def source_dir() -> Path:
    env = os.environ.get("BUILDER_LLAMA_CPP")
    default = (
        Path.home()
        / ".cache"
        / "slm-appliance"
        / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}"
        / "vendor"
        / "llama.cpp"
    )
    path = Path(env) if env else default
    if not (path / "convert_hf_to_gguf.py").is_file():
        raise BuilderError(
            f"llama.cpp converter not found in {path}",
            "run `make setup` (it unpacks the pinned llama-cpp-python source), or set "
            "BUILDER_LLAMA_CPP to its vendor/llama.cpp directory",
        )
    return path


def convert_hf(hf_dir: Path, out: Path, outtype: str = "f16") -> Path:
    """HF checkpoint directory -> GGUF with llama.cpp's own converter."""
    src = source_dir()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), os.environ.get("PYTHONPATH", "")]),
        NO_LOCAL_GGUF="",
        HF_HUB_OFFLINE="1",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        str(src / "convert_hf_to_gguf.py"),
        str(hf_dir),
        "--outfile",
        str(out),
        "--outtype",
        outtype,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise BuilderError(
            f"GGUF conversion of {hf_dir} failed:\n{tail}",
            "check that the architecture and tokenizer are ones llama.cpp supports "
            "(a SentencePiece tokenizer.model converts; custom BPE does not)",
        )
    print(
        f"converted {hf_dir} -> {out} ({out.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s)",
        file=sys.stderr,
    )
    return out


def tools_dir() -> Path:
    """llama.cpp's command-line tools built from the pinned source (once; cached beside it).

    Same portable CPU flags as the wheel the appliance runs, plus CUDA when nvcc is present.
    """
    src = source_dir()
    build = src.parent.parent.parent / "llama-tools"
    binaries = build / "bin"
    if all((binaries / t).is_file() for t in TOOLS):
        return binaries
    flags = [
        "-DGGML_NATIVE=OFF",
        "-DGGML_AVX=ON",
        "-DGGML_AVX2=ON",
        "-DGGML_FMA=ON",
        "-DGGML_F16C=ON",
        "-DGGML_BMI2=ON",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_SERVER=OFF",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DCMAKE_BUILD_TYPE=Release",
    ]
    print(f"building {', '.join(TOOLS)} from {src} (once, a few minutes) ...", file=sys.stderr)
    log = build.with_suffix(".log")
    build.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        for cmd in (
            ["cmake", "-S", str(src), "-B", str(build / "cmake"), *flags],
            [
                "cmake",
                "--build",
                str(build / "cmake"),
                "--parallel",
                str(os.cpu_count() or 2),
                "--target",
                *TOOLS,
            ],
        ):
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                raise BuilderError(
                    f"building llama.cpp tools failed; see {log}",
                    "install cmake and a C++ compiler (build-essential)",
                )
    binaries.mkdir(exist_ok=True)
    for tool in TOOLS:
        found = next((build / "cmake").rglob(tool), None)
        if found is None:
            raise BuilderError(f"{tool} was not built; see {log}", "check the log for the compiler error")
        shutil.copy2(found, binaries / tool)
    return binaries


def imatrix(model: Path, text_file: Path, out: Path, *, chunks: int, ctx: int, threads: int = 0) -> Path:
    """An importance matrix of `model` over the customer's own text, with llama-imatrix."""
    tool = tools_dir() / "llama-imatrix"
    cmd = [
        str(tool),
        "-m",
        str(model),
        "-f",
        str(text_file),
        "-o",
        str(out),
        "--chunks",
        str(chunks),
        "-c",
        str(ctx),
        "-t",
        str(threads or os.cpu_count() or 1),
        "--no-ppl",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
        raise BuilderError(
            f"llama-imatrix failed:\n{tail}",
            "the text must be at least one context long (ctx tokens); give more or lower ctx",
        )
    print(f"imatrix over {text_file.name}: {out.name} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return out


def quantize_with_imatrix(src: Path, dst: Path, qtype: str, matrix: Path, threads: int = 0) -> Path:
    """Quantize with llama-quantize (the Python binding cannot pass an importance matrix)."""
    tool = tools_dir() / "llama-quantize"
    cmd = [
        str(tool),
        "--imatrix",
        str(matrix),
        str(src),
        str(dst),
        qtype.upper(),
        str(threads or os.cpu_count() or 1),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not dst.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-10:])
        raise BuilderError(
            f"quantizing {src.name} to {qtype} failed:\n{tail}", "see the llama.cpp message above"
        )
    print(
        f"quantized {src.name} -> {dst.name} {qtype} with imatrix ({dst.stat().st_size / 1e6:.1f} MB)",
        file=sys.stderr,
    )
    return dst


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
    with _c_stderr() as log:  # a line per tensor (and per fallback); the export prints its own summary
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-8:])
        raise BuilderError(
            f"quantizing {src} to {qtype} failed (llama.cpp returned {rc}):\n{tail}",
            "tensor sizes must be multiples of the quant block size (32; 256 for K-quants)",
        )
    print(
        f"quantized {src.name} -> {dst.name} {qtype} ({dst.stat().st_size / 1e6:.1f} MB, "
        f"{time.perf_counter() - start:.1f} s)",
        file=sys.stderr,
    )
    return dst


@contextlib.contextmanager
def _c_stderr():
    """What C code writes to stderr (file descriptor 2) goes to a temporary file instead, yielded."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.NamedTemporaryFile(prefix="llama-", suffix=".log") as fh:
        os.dup2(fh.fileno(), 2)
        try:
            yield Path(fh.name)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def perplexity(model: Path, text: str, *, ctx: int = 512, max_tokens: int = 16384, threads: int = 0) -> dict:
    """Perplexity of `text` under a GGUF, scored as llama-perplexity does: the text is cut into
    contexts of `ctx` tokens and only the second half of each is scored (every scored token sees at
    least ctx/2 tokens before it)."""
    import logging

    import llama_cpp
    import numpy as np

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    llm = llama_cpp.Llama(
        str(model),
        n_ctx=ctx,
        n_batch=ctx,
        logits_all=True,
        verbose=False,
        n_threads=threads or (os.cpu_count() or 1),
    )
    try:
        tokens = llm.tokenize(text.encode(), add_bos=False, special=False)[:max_tokens]
        n_chunks = len(tokens) // ctx
        if n_chunks < 1:
            raise BuilderError(
                f"held-out text has {len(tokens)} tokens, fewer than one context ({ctx})",
                "give more held-out text or a smaller ppl_ctx",
            )
        nll, count = 0.0, 0
        first = ctx // 2
        for c in range(n_chunks):
            chunk = [llm.token_bos()] + tokens[c * ctx : (c + 1) * ctx - 1]
            llm.reset()
            llm.eval(chunk)
            logits = np.array(llm.scores[: len(chunk)], dtype=np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            for pos in range(first, len(chunk) - 1):
                nll -= logp[pos, chunk[pos + 1]]
                count += 1
    finally:
        llm.close()
    return {"perplexity": round(float(np.exp(nll / count)), 4), "tokens_scored": count, "contexts": n_chunks}


def _load(model: Path, n_ctx: int, **kwargs):
    import logging

    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
    return llama_cpp.Llama(str(model), n_ctx=n_ctx, verbose=False, n_threads=os.cpu_count() or 1, **kwargs)


def tokenize(model: Path, text: str) -> list[int]:
    """`text` cut into tokens by llama.cpp as the appliance cuts a prompt (special tokens parsed, no BOS
    added: the chat template writes what the model needs)."""
    llm = _load(model, 256)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    finally:
        llm.close()


def logits(model: Path, tokens: list[int]):
    """llama.cpp's logits at every position of `tokens` (numpy, positions x vocabulary)."""
    import numpy as np

    llm = _load(model, max(256, len(tokens)), n_batch=max(256, len(tokens)), logits_all=True)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def model_metadata(path: Path) -> dict:
    """Architecture, trained context length and parameter count from a GGUF's header."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key):
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    arch = value("general.architecture") or "llama"
    params = sum(int(t.n_elements) for t in reader.tensors)
    return {
        "architecture": arch,
        "context_length": int(value(f"{arch}.context_length") or 2048),
        "parameters": params,
    }
