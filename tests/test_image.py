"""The container image, built and run: `make image`, then a container with no network provisioned as a
host would be (trust init, a signed bundle installed from a mounted stick, documents ingested) and
asked through its mounted socket with the real `openai` SDK. Runs where a Docker daemon answers
(`dockerd` started); skipped otherwise. The first build makes the base images from Debian packages
(mmdebstrap) and installs the appliance's dependencies from the package index: minutes."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "builder" / "demo_data" / "corpus"
IMAGE = "slm-appliance:test"
DOCKER = shutil.which("docker")


def _daemon_answers() -> bool:
    if DOCKER is None:
        return False
    try:
        return subprocess.run([DOCKER, "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _daemon_answers(), reason="no Docker daemon answers (start dockerd)"),
]


def docker(*args, timeout=600, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"docker {' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def image() -> str:
    proc = subprocess.run(
        ["make", "image", f"IMAGE={IMAGE}", f"DOCKER={DOCKER}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return IMAGE


@pytest.fixture
def stick(tmp_path, tiny_generation) -> Path:
    """A signed bundle and its root of trust, as the builder writes them to a USB stick."""
    from builder import bundle, keys

    keys.init(tmp_path / "keys")
    out = tmp_path / "stick"
    bundle.create(tiny_generation, tmp_path / "keys", 1, out)
    shutil.copy(tmp_path / "keys" / "root.json", out / "root.json")
    for p in [out, *out.rglob("*")]:  # the container's user reads the stick
        p.chmod(p.stat().st_mode | 0o444 | (0o111 if p.is_dir() else 0))
    return out


def test_the_image_serves_cited_answers_with_no_network(image, stick, tmp_path):
    import httpx
    from openai import OpenAI

    name = f"appliance-test-{uuid.uuid4().hex[:8]}"
    volume = f"{name}-home"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    uid = int(docker("run", "--rm", "--entrypoint", "id", image, "-u").stdout)
    os.chown(run_dir, uid, uid)  # the socket's directory belongs to the service's user, as under systemd
    run_dir.chmod(0o755)
    base = ["run", "--rm", "--network", "none", "-v", f"{volume}:/var/lib/appliance"]
    try:
        docker(*base, "-v", f"{stick}:/bundle:ro", image, "trust", "init", "/bundle/root.json")
        installed = docker(
            *base, "-v", f"{stick}:/bundle:ro", image, "bundle", "install", "/bundle", timeout=900
        )
        assert "generation 1" in installed.stdout + installed.stderr
        docker(
            *base,
            "-v",
            f"{CORPUS}:/corpus:ro",
            image,
            "ingest",
            "/corpus/reference",
            "--collection",
            "reference",
        )
        docker(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "none",
            "-v",
            f"{volume}:/var/lib/appliance",
            "-v",
            f"{run_dir}:/run/appliance",
            image,
        )
        sock = run_dir / "api.sock"
        deadline = time.monotonic() + 300
        while not sock.exists():
            logs = docker("logs", name, check=False)
            assert time.monotonic() < deadline, logs.stdout + logs.stderr
            assert docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip() == "true", logs.stderr
            time.sleep(1)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), timeout=300) as http:
            client = OpenAI(base_url="http://appliance/v1", api_key="local", http_client=http)
            done = client.chat.completions.create(
                model="any",
                max_tokens=24,
                temperature=0.0,
                messages=[
                    {
                        "role": "user",
                        "content": "What is the code for the Database Administrator labor category?",
                    }
                ],
            )
        extra = done.model_extra
        assert done.choices[0].message.content and done.usage.completion_tokens > 0
        assert any("labor_categories" in s["source"] and "15-1242.00" in s["text"] for s in extra["sources"])
        assert isinstance(extra["citations"], list) and extra["audit_id"] > 0
        assert extra["appliance"]["generation"] == 1
        # nothing reaches out: the container has no interface but loopback
        links = docker(
            "exec", name, "python3", "-c", "import socket; print(sorted(n for _, n in socket.if_nameindex()))"
        )
        assert links.stdout.strip() == "['lo']"
    finally:
        docker("rm", "-f", name, check=False)
        docker("volume", "rm", "-f", volume, check=False)
