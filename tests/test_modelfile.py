"""Malformed GGUF files are refused in Python, before llama.cpp parses them."""

import json
import shutil
import struct

import pytest

from appliance.bundles.generations import current, install_unsigned
from appliance.bundles.manifest import write_manifest
from appliance.bundles.modelfile import validate
from appliance.errors import ModelError


@pytest.fixture
def model(tiny_generation, tmp_path):
    path = tmp_path / "model.gguf"
    shutil.copyfile(tiny_generation / "model.gguf", path)
    return path


def test_the_builders_gguf_passes(model, tiny_generation):
    import gguf

    summary = validate(model)
    assert summary["architecture"] == "llama" and summary["tensors"] > 10
    # The appliance renders prompts with the generation's chat_template.jinja and ignores the GGUF's copy;
    # the builder embeds the same text, so llama.cpp's own tools run the file as the appliance does.
    assert summary["embedded_chat_template_ignored"] is True
    field = gguf.GGUFReader(model).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == (tiny_generation / "chat_template.jinja").read_text()


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "defect, expected",
    [
        ("bad_magic", "bad magic"),
        ("huge_tensor_count", "more than a"),
        ("huge_key_count", "more than a"),
        ("future_version", "version 99"),
        ("truncated_header", "malformed GGUF|more than a"),
        ("truncated_data", "past the end of the file|malformed GGUF"),
        ("empty", "bad magic"),
    ],
)
def test_malformed_gguf_is_refused(model, defect, expected):
    raw = model.read_bytes()
    if defect == "bad_magic":
        _patch(model, 0, b"GGML")
    elif defect == "huge_tensor_count":
        _patch(model, 8, struct.pack("<Q", 2**40))
    elif defect == "huge_key_count":
        _patch(model, 16, struct.pack("<Q", 2**40))
    elif defect == "future_version":
        _patch(model, 4, struct.pack("<I", 99))
    elif defect == "truncated_header":
        model.write_bytes(raw[:2000])
    elif defect == "truncated_data":
        model.write_bytes(raw[: len(raw) - 64])
    else:
        model.write_bytes(b"")
    with pytest.raises(ModelError, match=expected):
        validate(model)


def test_install_refuses_a_consistent_generation_with_a_truncated_model(tmp_path, tiny_generation):
    """Hashes match (the builder wrote a bad file): the structure check still stops it."""
    home = tmp_path / "home"
    install_unsigned(tiny_generation, home)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_generation, bad)
    raw = (bad / "model.gguf").read_bytes()
    (bad / "model.gguf").write_bytes(raw[: len(raw) // 2])
    manifest = json.loads((bad / "generation.json").read_text())
    (bad / "generation.json").unlink()
    del manifest["files"]
    write_manifest(bad, manifest)
    with pytest.raises(ModelError, match="model.gguf"):
        install_unsigned(bad, home)
    assert current(home).number == 1
    assert sorted(p.name for p in (home / "generations").iterdir()) == ["1"]
