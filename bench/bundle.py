"""Bundle verify+install throughput on a large target, against `sha256sum` of the same files in the same run.

A generation whose model.gguf is a valid GGUF holding one large f32 tensor (default 1 GB) is signed
into a bundle with fresh keys; the appliance then verifies and installs it (TUF refresh, every target
copied into staging under TUF's length and sha256 check, fsync, the GGUF's structure checked, atomic
switch). The model is not loaded: the health check is a model-load cost, not a throughput. Both
sides read the bundle from the page cache (one warm-up read first), so the ratio compares the
installer's work with hashing alone. Run: python -m bench.bundle [--gb 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from appliance.bundles import bundle as appliance_bundle
from appliance.bundles import trust
from appliance.bundles.manifest import write_manifest
from bench.common import row
from builder import bundle as builder_bundle
from builder import keys as keyring


def _generation(out: Path, gigabytes: float) -> Path:
    import gguf

    out.mkdir(parents=True)
    writer = gguf.GGUFWriter(str(out / "model.gguf"), "llama")
    writer.add_context_length(2048)
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_head_count(1)
    n = int(gigabytes * 1e9) // 4 // 64 * 64
    weights = np.resize(np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32), n)
    writer.add_tensor("token_embd.weight", weights.reshape(n // 64, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    del weights
    writer.close()
    (out / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    (out / "embedder").mkdir()
    (out / "embedder" / "embedder.json").write_text(json.dumps({"name": "bench", "dim": 8}))
    write_manifest(
        out,
        {
            "name": "bench",
            "created": "2026-01-01T00:00:00Z",
            "model": {"name": "bench", "quant": "F32", "context_length": 2048, "parameters": n},
            "embedder": {"name": "bench", "dim": 8},
        },
    )
    return out


def _read_all(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass


def run(gigabytes: float = 1.0) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="bench-bundle-") as tmp:
        tmp = Path(tmp)
        gen = _generation(tmp / "gen", gigabytes)
        keys = tmp / "keys"
        keyring.init(keys)
        stick = tmp / "stick"
        builder_bundle.create(gen, keys, 1, stick, ungated=True)  # never evaluated: a copy benchmark
        files = sorted(p for p in (stick / "targets").rglob("*") if p.is_file())
        total = sum(p.stat().st_size for p in files)
        _read_all(files)

        start = time.perf_counter()
        subprocess.run(["sha256sum", *map(str, files)], check=True, capture_output=True)
        sha = time.perf_counter() - start
        openssl = None
        if shutil.which("openssl"):
            start = time.perf_counter()
            subprocess.run(["openssl", "dgst", "-sha256", *map(str, files)], check=True, capture_output=True)
            openssl = time.perf_counter() - start

        home = tmp / "home"
        trust.trust_init(home, keys / "root.json")
        start = time.perf_counter()
        appliance_bundle.verify(home, stick)
        verify = time.perf_counter() - start
        start = time.perf_counter()
        result = appliance_bundle.install(home, stick, None)
        install = time.perf_counter() - start
        assert result.number == 1

        start = time.perf_counter()
        shutil.copytree(stick / "targets", tmp / "plain-copy")
        subprocess.run(["sync"], check=True)
        copy = time.perf_counter() - start

    def mbs(seconds: float) -> str:
        return f"{total / seconds / 1e6:,.0f}"

    return [
        row("what", "seconds", "MB/s", "vs sha256sum"),
        row("---", "---:", "---:", "---:"),
        row("sha256sum (baseline)", f"{sha:.2f}", mbs(sha), "1.00x"),
        *(
            [
                row(
                    "openssl dgst -sha256 (SHA extensions)",
                    f"{openssl:.2f}",
                    mbs(openssl),
                    f"{sha / openssl:.2f}x",
                )
            ]
            if openssl
            else []
        ),
        row("appliance bundle verify", f"{verify:.2f}", mbs(verify), f"{sha / verify:.2f}x"),
        row("appliance bundle install", f"{install:.2f}", mbs(install), f"{sha / install:.2f}x"),
        row("cp -r + sync (reference)", f"{copy:.2f}", mbs(copy), f"{sha / copy:.2f}x"),
        f"\n{total / 1e9:.2f} GB in {len(files)} files. verify reads and hashes every byte once; install "
        "also writes and fsyncs it once. coreutils sha256sum here does not use the CPU's SHA extensions; "
        "OpenSSL (which Python's hashlib uses) does"
        + (f": install is {openssl / install:.2f}x openssl." if openssl else "."),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="Size of the model target in GB")
    print("\n".join(run(parser.parse_args().gb)))
