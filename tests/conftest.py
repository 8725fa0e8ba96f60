"""Session fixtures: one tiny generation built by the real builder, one home with the demo corpus.

The whole suite runs with outbound network connections refused (loopback and Unix sockets allowed):
the appliance must never need the network.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
from pathlib import Path

import pytest

from appliance.app import Appliance
from appliance.bundles.generations import install_unsigned
from appliance.config import load_settings

os.environ["HF_HUB_OFFLINE"] = "1"
CORPUS = Path(__file__).resolve().parent.parent / "builder" / "demo_data" / "corpus"
_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise OSError(f"network access attempted in tests: {address}")
    return _real_connect(self, address)


@pytest.fixture(scope="session", autouse=True)
def no_network():
    socket.socket.connect = _guarded_connect
    yield
    socket.socket.connect = _real_connect


@pytest.fixture(scope="session")
def embedder_dir(tmp_path_factory) -> Path:
    from builder.embedder import export

    out = tmp_path_factory.mktemp("embedder")
    export(out)
    return out


@pytest.fixture(scope="session")
def tiny_generation(tmp_path_factory, embedder_dir) -> Path:
    """A real generation through the whole demo chain, a few steps per stage: pretrain -> two SFTs ->
    DPO -> ties merge -> GGUF Q8_0 and Q4_K_M -> eval -> generation directory."""
    from builder.demo import build

    out = tmp_path_factory.mktemp("gen") / "tiny-generation"
    build(out, quick=True, embedder_dir=embedder_dir)
    return out


def ingest_demo(app: Appliance) -> None:
    for sub in ("reference", "proposals", "rfps"):
        report = app.ingest([CORPUS / sub], sub)
        assert not report.failed, report.failed


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory, tiny_generation) -> Path:
    """A home with the tiny generation installed and the demo corpus ingested; tests only read it."""
    home = tmp_path_factory.mktemp("home")
    install_unsigned(tiny_generation, home)
    with Appliance(load_settings(home=home)) as app:
        ingest_demo(app)
    return home


@pytest.fixture
def home(tmp_path, tiny_generation) -> Path:
    """A fresh home with the tiny generation installed and nothing ingested; tests may change it."""
    home = tmp_path / "home"
    install_unsigned(tiny_generation, home)
    return home


@pytest.fixture
def app(demo_home):
    with Appliance(load_settings(home=demo_home)) as appliance:
        yield appliance


@pytest.fixture
def scanned_pdf(tmp_path) -> Path:
    """A valid one-page PDF with no text layer, as a scanner writes it."""
    from pypdf import PdfWriter

    path = tmp_path / "scanned.pdf"
    writer = PdfWriter()
    writer.add_blank_page(width=612, height=792)
    writer.write(str(path))
    return path


@pytest.fixture
def corpus_copy(tmp_path) -> Path:
    dst = tmp_path / "corpus"
    shutil.copytree(CORPUS, dst)
    return dst
