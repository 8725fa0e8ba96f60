"""Installing a generation directory: verified, copied, switched atomically, nothing half-installed."""

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.bundles.generations import current, install_unsigned
from appliance.bundles.manifest import verify_generation
from appliance.cli import cli
from appliance.errors import ExitCode, GenerationError

CORPUS = Path(__file__).resolve().parent.parent / "builder" / "demo_data" / "corpus"


def _staging_left(home):
    return [p.name for p in (home / "generations").iterdir() if p.name.startswith(".staging")]


def test_generation_lists_every_file_with_hash_and_lineage(tiny_generation):
    manifest = verify_generation(tiny_generation)
    assert {
        "model.gguf",
        "chat_template.jinja",
        "embedder/embedder.json",
        "embedder/tokenizer.json",
        "embedder/model_int8.onnx",
    } <= set(manifest.files)
    assert manifest.model.quant == "Q8_0"
    assert manifest.embedder.dim == 384
    pretrain = manifest.lineage["stages"]["pretrain"]
    assert pretrain["stage"] == "pretrain" and pretrain["config"]["steps"] == 3
    corpus = {p.split("/corpus/", 1)[1] for p in pretrain["inputs"] if "/corpus/" in p}
    # every proposal but the held-out one, and the RFPs as a directory; each with its sha256
    assert corpus == {
        f"proposals/{p.name}"
        for p in (CORPUS / "proposals").iterdir()
        if p.name != "2023-GSA-data-analytics.pdf"
    } | {"rfps"}, corpus
    assert all(len(h) == 64 for h in pretrain["inputs"].values())
    assert "eval.json" in manifest.files
    assert (tiny_generation / "model.gguf").read_bytes()[:4] == b"GGUF"


def test_install_twice_switches_current_and_keeps_previous(tmp_path, tiny_generation):
    home = tmp_path / "home"
    first = install_unsigned(tiny_generation, home)
    second = install_unsigned(tiny_generation, home)
    assert (first.number, second.number) == (1, 2)
    assert os.readlink(home / "current") == "generations/2"
    assert current(home).number == 2
    assert (home / "generations" / "1" / "model.gguf").is_file()
    for path in [home / "generations" / "2", *(home / "generations" / "2").rglob("*")]:
        assert path.stat().st_mode & 0o222 == 0, f"{path} is writable"  # installed generations are read-only


@pytest.mark.parametrize(
    "damage", ["flip_model_byte", "truncate_template", "extra_file", "missing_embedder", "unsafe_name"]
)
def test_damaged_generation_is_refused_and_current_untouched(tmp_path, tiny_generation, damage):
    home = tmp_path / "home"
    install_unsigned(tiny_generation, home)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_generation, bad)
    if damage == "flip_model_byte":
        data = bytearray((bad / "model.gguf").read_bytes())
        data[len(data) // 2] ^= 0x01
        (bad / "model.gguf").write_bytes(bytes(data))
        expected = "model.gguf: sha256 mismatch"
    elif damage == "truncate_template":
        (bad / "chat_template.jinja").write_text("{{")
        expected = "chat_template.jinja: sha256 mismatch"
    elif damage == "extra_file":
        (bad / "payload.sh").write_text("echo hi")
        expected = "files not in the manifest: payload.sh"
    elif damage == "missing_embedder":
        (bad / "embedder" / "model_int8.onnx").unlink()
        expected = "missing embedder/model_int8.onnx"
    else:
        manifest = json.loads((bad / "generation.json").read_text())
        manifest["files"]["../escape"] = manifest["files"]["model.gguf"]
        (bad / "generation.json").write_text(json.dumps(manifest))
        expected = "unsafe file name"
    with pytest.raises(GenerationError, match=expected):
        install_unsigned(bad, home)
    assert current(home).number == 1
    assert sorted(p.name for p in (home / "generations").iterdir()) == ["1"]


def test_cli_requires_unsigned_flag_and_reports_damage(tmp_path, tiny_generation):
    runner = CliRunner()
    home = tmp_path / "home"
    result = runner.invoke(cli, ["--home", str(home), "install-generation", str(tiny_generation)])
    assert result.exit_code == ExitCode.USAGE
    assert "--unsigned" in result.output
    bad = tmp_path / "bad"
    shutil.copytree(tiny_generation, bad)
    (bad / "generation.json").unlink()
    result = runner.invoke(cli, ["--home", str(home), "install-generation", "--unsigned", str(bad)])
    assert result.exit_code == ExitCode.GENERATION
    assert "not a generation directory" in result.output
    result = runner.invoke(
        cli, ["--home", str(home), "install-generation", "--unsigned", str(tiny_generation)]
    )
    assert result.exit_code == 0, result.output
    assert "installed generation 1" in result.output


def test_interrupted_install_leftovers_are_cleared(tmp_path, tiny_generation):
    home = tmp_path / "home"
    install_unsigned(tiny_generation, home)
    stale = home / "generations" / ".staging-2"
    shutil.copytree(tiny_generation, stale)  # as if killed mid-copy
    installed = install_unsigned(tiny_generation, home)
    assert installed.number == 2
    assert _staging_left(home) == []


def test_a_long_lived_appliance_moves_to_the_new_generation(tmp_path, tiny_generation):
    from appliance.app import Appliance
    from appliance.config import load_settings

    home = tmp_path / "home"
    install_unsigned(tiny_generation, home)
    with Appliance(load_settings(home=home), long_lived=True) as app:
        assert app.ask("hello", use_rag=False, max_tokens=2).model["generation"] == 1  # model loaded
        app.install_generation(tiny_generation)
        assert app.ask("hello", use_rag=False, max_tokens=2).model["generation"] == 2
        assert app.engine.llm is not None
