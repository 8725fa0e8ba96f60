"""Signed update bundles: each case builds a real bundle with the builder (real ed25519 keys, a real TUF
repository on disk, the tiny generation's real GGUF), then attacks it.

A refused bundle must fail with a specific error, leave the running generation current and intact,
leave no staging behind, and not move what the appliance trusts.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.app import Appliance
from appliance.bundles import bundle as appliance_bundle
from appliance.bundles import commit, staging, trust
from appliance.bundles.generations import current
from appliance.bundles.manifest import read_manifest, verify_generation, write_manifest
from appliance.cli import cli as appliance_cli
from appliance.config import load_settings
from appliance.errors import BundleError, BusyError, ExitCode, ModelError
from appliance.records import audit
from builder import bundle as builder_bundle
from builder import keys as keyring
from builder.cli import cli as builder_cli
from builder.errors import BuilderError

# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def session_keys(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("keys") / "keys"
    keyring.init(out)
    return out


@pytest.fixture
def keys(tmp_path, session_keys) -> Path:
    """A private copy: tests rotate keys and record signed versions."""
    dst = tmp_path / "keys"
    shutil.copytree(session_keys, dst)
    return dst


def _regenerate(src: Path, dst: Path, change) -> Path:
    """A copy of a generation, changed by `change(dir, fields)`, with its manifest rewritten."""
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    fields = read_manifest(dst).model_dump(exclude={"files"})
    (dst / "generation.json").unlink()
    change(dst, fields)
    write_manifest(dst, fields)
    return dst


@pytest.fixture(scope="session")
def variant_generation(tmp_path_factory, tiny_generation) -> Path:
    """The tiny generation with its Q4_K_M model instead of Q8_0: another model, same everything else."""
    q4 = next(tiny_generation.parent.glob(".*.work/stages/export/model-Q4_K_M.gguf"))

    def change(d, fields):
        shutil.copyfile(q4, d / "model.gguf")
        fields["model"]["quant"] = "Q4_K_M"

    return _regenerate(tiny_generation, tmp_path_factory.mktemp("variant") / "gen", change)


def make_bundle(
    tmp_path: Path, generation: Path, keys: Path, version: int, name: str | None = None, **kwargs
) -> Path:
    out = tmp_path / (name or f"stick-v{version}")
    builder_bundle.create(generation, keys, version, out, **kwargs)
    return out


def new_app(home: Path) -> Appliance:
    return Appliance(load_settings(home=home))


@pytest.fixture
def trusted_home(tmp_path, keys) -> Path:
    home = tmp_path / "home"
    with new_app(home) as app:
        app.trust_init(keys / "root.json")
    return home


@pytest.fixture
def installed(tmp_path, trusted_home, keys, tiny_generation) -> Path:
    """A home running bundle version 1."""
    with new_app(trusted_home) as app:
        result = app.install_bundle(make_bundle(tmp_path, tiny_generation, keys, 1))
    assert result.generation == 1
    return trusted_home


def assert_untouched(home: Path, generation: int | None, trusted: int) -> None:
    """The running generation is still current and intact; nothing staged; trust did not move."""
    if generation is None:
        assert not (home / "current").exists()
    else:
        inst = current(home)
        assert inst.number == generation
        verify_generation(inst.path, bundle_files=True)
    gens = home / "generations"
    assert not [p.name for p in gens.iterdir() if p.name.startswith(".")] if gens.exists() else True
    assert not (home / commit.STATE).exists()
    assert trust.trusted_version(home) == trusted


def refused(home: Path, stick: Path, match: str, error=BundleError, **kwargs):
    with new_app(home) as app, pytest.raises(error, match=match) as info:
        app.install_bundle(stick, **kwargs)
    return info.value


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def flip_signature(path: Path) -> None:
    """One character of the first signature changed: still valid JSON and valid hex."""
    text = path.read_text()
    at = text.index('"sig": "') + len('"sig": "') + 10
    path.write_text(text[:at] + ("1" if text[at] == "0" else "0") + text[at + 1 :])


def target_file(stick: Path, name: str) -> Path:
    parent, _, base = name.rpartition("/")
    found = list((stick / "targets" / parent).glob(f"*.{base}"))
    assert len(found) == 1, found
    return found[0]


def resign(stick: Path, keys: Path, edit) -> None:
    """What an attacker holding the keys (or a broken builder) could publish: targets metadata changed by
    `edit`, then targets, snapshot and timestamp signed again with valid keys."""
    from tuf.api.metadata import Metadata, MetaFile

    md = stick / "metadata"
    ts = Metadata.from_file(str(md / "timestamp.json"))
    v = ts.signed.version
    root = keyring.load_root(keys)

    def signed(meta, role):
        meta.signatures.clear()
        for s in keyring.signers_for(keys, role, root):
            meta.sign(s, append=True)
        return meta.to_bytes()

    def metafile(data):
        return MetaFile(version=v, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()})

    targets = Metadata.from_file(str(md / f"{v}.targets.json"))
    edit(targets.signed)
    t = signed(targets, "targets")
    (md / f"{v}.targets.json").write_bytes(t)
    snap = Metadata.from_file(str(md / f"{v}.snapshot.json"))
    snap.signed.meta["targets.json"] = metafile(t)
    s = signed(snap, "snapshot")
    (md / f"{v}.snapshot.json").write_bytes(s)
    ts.signed.snapshot_meta = metafile(s)
    (md / "timestamp.json").write_bytes(signed(ts, "timestamp"))


# -- accepted ---------------------------------------------------------------------------------------


def test_newer_bundle_then_rollback_then_same_bundle_again(
    tmp_path, installed, keys, tiny_generation, variant_generation
):
    home = installed
    v2 = make_bundle(tmp_path, variant_generation, keys, 2)
    with new_app(home) as app:
        result = app.install_bundle(v2)
        assert (result.version, result.generation) == (2, 2)
        assert result.health["canary_tokens"] >= 1 and result.health["embedder_dim"] == 384
        assert (app.status().model["quant"], app.status().version) == ("Q4_K_M", 2)
        answer = app.ask("What is the labor category code for a Database Administrator?", max_tokens=8)
        assert answer.model["generation"] == 2
        rows = appliance_bundle.history(home)
        assert [(r["generation"], r["version"], r["current"], r["previous"]) for r in rows] == [
            (2, 2, True, False),
            (1, 1, False, True),
        ]
        assert app.rollback() == (2, 1)
        assert app.status().model["quant"] == "Q8_0"
        with pytest.raises(BundleError, match="no previous generation"):
            app.rollback()
        # The running version again: nothing to do, though the appliance already trusts version 2;
        # the loaded model stays loaded (a service must not reload it for a no-op).
        engine = app.engine
        again = app.install_bundle(tmp_path / "stick-v1")
        assert again.generation is None and "already the running generation" in again.message
        assert app._engine is engine
        # Version 2 again, on purpose: installed anew (a rollback is not a ban).
        assert app.install_bundle(v2).generation == 3
        actions = [r["action"] for r in audit.rows(app.store.conn) if r["action"] in ("install", "rollback")]
    assert actions == ["install", "install", "rollback", "install"]  # v1, v2, back to v1, v2 again
    assert sorted(p.name for p in (home / "generations").iterdir()) == ["1", "3"]
    assert_untouched(home, 3, trusted=2)


def test_cli_install_list_rollback(tmp_path, trusted_home, keys, tiny_generation, variant_generation):
    runner = CliRunner()
    base = ["--home", str(trusted_home)]
    v1 = make_bundle(tmp_path, tiny_generation, keys, 1)
    r = runner.invoke(appliance_cli, [*base, "bundle", "verify", str(v1), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["bundle"]["version"] == 1
    assert not (trusted_home / "current").exists()  # verify installs nothing
    r = runner.invoke(appliance_cli, [*base, "bundle", "install", str(v1)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(appliance_cli, [*base, "bundle", "install", str(v1)])
    assert r.exit_code == 0 and "nothing to do" in r.stderr
    v2 = make_bundle(tmp_path, variant_generation, keys, 2)
    assert runner.invoke(appliance_cli, [*base, "bundle", "install", str(v2)]).exit_code == 0
    listed = json.loads(runner.invoke(appliance_cli, [*base, "bundle", "list", "--json"]).stdout)
    assert [(g["version"], g["current"]) for g in listed["generations"]] == [(2, True), (1, False)]
    assert listed["trusted_version"] == 2
    r = runner.invoke(appliance_cli, [*base, "bundle", "rollback"])
    assert r.exit_code == 0 and "to generation 1" in r.stderr
    r = runner.invoke(appliance_cli, [*base, "bundle", "install", str(tmp_path / "stick-v1")])
    assert r.exit_code == 0 and "nothing to do" in r.stderr
    flip(target_file(v2, "model.gguf"))
    r = runner.invoke(appliance_cli, [*base, "bundle", "install", str(v2)])
    assert r.exit_code == ExitCode.BUNDLE and "sha256 mismatch" in r.stderr and "fix:" in r.stderr


def test_extra_files_on_the_stick_are_ignored_never_installed(tmp_path, installed, keys, variant_generation):
    v2 = make_bundle(tmp_path, variant_generation, keys, 2)
    (v2 / "targets" / "payload.sh").write_text("#!/bin/sh\nrm -rf /\n")
    (v2 / "targets" / ("0" * 64 + ".payload.sh")).write_text("echo pwned\n")
    (v2 / "metadata" / "2.payload.json").write_text("{}")
    with new_app(installed) as app:
        assert app.install_bundle(v2).generation == 2
    assert not list((installed / "generations" / "2").rglob("*payload*"))


# -- refused: signatures ----------------------------------------------------------------------------


def test_unsigned_bundle(tmp_path, installed, keys, variant_generation):
    stick = make_bundle(
        tmp_path, variant_generation, keys, 2, signers={"targets": [], "snapshot": [], "timestamp": []}
    )
    refused(installed, stick, r"metadata/timestamp.json: signature check failed")
    assert_untouched(installed, 1, trusted=1)


def test_signed_by_an_unknown_key(tmp_path, installed, keys, variant_generation):
    other = tmp_path / "other-keys"
    keyring.init(other)
    root = keyring.load_root(other)
    stick = make_bundle(
        tmp_path,
        variant_generation,
        keys,
        2,
        signers={r: keyring.signers_for(other, r, root) for r in ("targets", "snapshot", "timestamp")},
    )
    refused(installed, stick, "signature check failed")
    assert_untouched(installed, 1, trusted=1)


def test_below_the_signature_threshold(tmp_path, tiny_generation):
    keys = tmp_path / "keys2of2"
    keyring.init(keys, threshold=2)
    home = tmp_path / "home"
    with new_app(home) as app:
        app.trust_init(keys / "root.json")
    root = keyring.load_root(keys)
    one = keyring.signers_for(keys, "targets", root)[:1]
    stick = make_bundle(tmp_path, tiny_generation, keys, 1, signers={"targets": one})
    refused(home, stick, r"targets.json: signature check failed.*1/2")
    assert_untouched(home, None, trusted=0)
    with new_app(home) as app:  # both signatures: accepted
        assert app.install_bundle(make_bundle(tmp_path, tiny_generation, keys, 2)).generation == 1
    next((keys / "private").glob("targets.*")).unlink()
    with pytest.raises(BuilderError, match="targets needs 2 signatures"):  # the builder will not sign it
        make_bundle(tmp_path, tiny_generation, keys, 3)


def test_key_rotation_new_key_accepted_retired_key_refused(
    tmp_path, installed, keys, tiny_generation, variant_generation
):
    report = keyring.rotate(keys, "targets")
    assert report["root_version"] == 2
    v2 = make_bundle(tmp_path, variant_generation, keys, 2)
    with new_app(installed) as app:
        assert app.install_bundle(v2).generation == 2  # walks root 1 -> 2, then trusts the new targets key
    root = keyring.load_root(keys)
    retired = keyring.load_signers(keys, "targets", root, folder="retired")
    assert len(retired) == 1
    v3 = make_bundle(tmp_path, tiny_generation, keys, 3, signers={"targets": retired})
    refused(installed, v3, r"targets.json: signature check failed")
    assert_untouched(installed, 2, trusted=2)


def test_root_rotation_is_followed_and_a_tampered_new_root_refused(
    tmp_path, installed, keys, variant_generation
):
    keyring.rotate(keys, "root")
    keyring.rotate(keys, "timestamp")
    v2 = make_bundle(tmp_path, variant_generation, keys, 2)
    bad = tmp_path / "bad-root"
    shutil.copytree(v2, bad)
    text = (bad / "metadata" / "3.root.json").read_text()
    (bad / "metadata" / "3.root.json").write_text(text.replace('"expires": "20', '"expires": "21', 1))
    refused(installed, bad, r"metadata/3.root.json: signature check failed")
    assert_untouched(installed, 1, trusted=1)
    with new_app(installed) as app:
        assert app.install_bundle(v2).generation == 2
    trusted_root = json.loads((installed / "trust" / "metadata" / "root.json").read_text())
    assert trusted_root["signed"]["version"] == 3


# -- refused: content ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["model.gguf", "embedder/model_int8.onnx", "chat_template.jinja", "bundle.json", "generation.json"],
)
def test_one_flipped_byte_in_a_target(tmp_path, installed, keys, variant_generation, name):
    stick = make_bundle(tmp_path, variant_generation, keys, 2)
    flip(target_file(stick, name))
    refused(installed, stick, f"{name}: sha256 mismatch with the signed metadata")
    assert_untouched(installed, 1, trusted=1)


@pytest.mark.parametrize("role", ["root", "targets", "snapshot", "timestamp"])
def test_one_flipped_byte_in_each_metadata_file(tmp_path, installed, keys, variant_generation, role):
    if role == "root":
        keyring.rotate(keys, "snapshot")  # a root the appliance has not trusted yet: 2.root.json
    stick = make_bundle(tmp_path, variant_generation, keys, 2)
    file = {
        "root": "2.root.json",
        "targets": "2.targets.json",
        "snapshot": "2.snapshot.json",
        "timestamp": "timestamp.json",
    }[role]
    flip_signature(stick / "metadata" / file)
    refused(installed, stick, f"metadata/{file}")
    assert_untouched(installed, 1, trusted=1)


def test_truncated_and_extended_and_missing_targets(tmp_path, installed, keys, variant_generation):
    stick = make_bundle(tmp_path, variant_generation, keys, 2)
    model = target_file(stick, "model.gguf")
    original = model.read_bytes()
    model.write_bytes(original[: len(original) // 2])
    refused(installed, stick, "model.gguf: .* shorter \\(truncated\\)")
    model.write_bytes(original + b"\0" * 4096)
    refused(installed, stick, "model.gguf: .* longer than the .* signed")
    model.write_bytes(original)
    target_file(stick, "embedder/model_int8.onnx").unlink()
    refused(installed, stick, "embedder/model_int8.onnx: missing from the bundle")
    assert_untouched(installed, 1, trusted=1)


def test_a_target_replaced_by_a_symlink_is_refused(tmp_path, installed, keys, variant_generation):
    stick = make_bundle(tmp_path, variant_generation, keys, 2)
    template = target_file(stick, "chat_template.jinja")
    copy = tmp_path / "elsewhere.jinja"
    shutil.copyfile(template, copy)
    template.unlink()
    template.symlink_to(copy)
    refused(installed, stick, "chat_template.jinja: cannot be read")
    assert_untouched(installed, 1, trusted=1)


@pytest.mark.parametrize(
    "bad_name",
    ["../escape.gguf", "/etc/cron.d/job", "model\x00.gguf", "a/./b", "embedder//x", "model.gguf/x"],
)
def test_unsafe_target_names(tmp_path, installed, keys, variant_generation, bad_name):
    from tuf.api.metadata import TargetFile

    stick = make_bundle(tmp_path, variant_generation, keys, 2)

    def add(targets):
        targets.targets[bad_name] = TargetFile(
            length=3, hashes={"sha256": hashlib.sha256(b"abc").hexdigest()}, path=bad_name
        )

    resign(stick, keys, add)
    if bad_name == "model.gguf/x":  # a safe name whose staged path collides with another file's
        (stick / "targets" / "model.gguf").mkdir()
        (stick / "targets" / "model.gguf" / f"{hashlib.sha256(b'abc').hexdigest()}.x").write_bytes(b"abc")
    refused(installed, stick, "is unsafe" if bad_name != "model.gguf/x" else "two signed names collide")
    assert_untouched(installed, 1, trusted=1)
    assert not (tmp_path / "escape.gguf").exists()


def test_mix_and_match_across_versions(tmp_path, installed, keys, tiny_generation, variant_generation):
    v2 = make_bundle(tmp_path, tiny_generation, keys, 2)
    v3 = make_bundle(tmp_path, variant_generation, keys, 3)
    # v3's model under v2's metadata (renamed to the name v2's metadata expects)
    mixed = tmp_path / "mixed-model"
    shutil.copytree(v2, mixed)
    shutil.copyfile(target_file(v3, "model.gguf"), target_file(mixed, "model.gguf"))
    refused(installed, mixed, "model.gguf: .*(sha256 mismatch|than the)")
    # v3's targets metadata beside v2's snapshot and timestamp
    mixed_md = tmp_path / "mixed-metadata"
    shutil.copytree(v2, mixed_md)
    shutil.copyfile(v3 / "metadata" / "3.targets.json", mixed_md / "metadata" / "2.targets.json")
    refused(installed, mixed_md, "metadata/2.targets.json")
    assert_untouched(installed, 1, trusted=1)


def test_replay_of_an_older_version_and_audited_downgrade(
    tmp_path, installed, keys, tiny_generation, variant_generation
):
    make_bundle(tmp_path, variant_generation, keys, 2)
    v3 = make_bundle(tmp_path, tiny_generation, keys, 3)
    with new_app(installed) as app:
        app.install_bundle(v3)
    refused(installed, tmp_path / "stick-v2", "older than version 3.*replayed or downgraded")
    assert_untouched(installed, 2, trusted=3)
    home = installed
    (home / "config.yaml").write_text("security_floor: 3\n")
    refused(home, tmp_path / "stick-v2", "below the security floor 3", allow_downgrade=True)
    (home / "config.yaml").write_text("security_floor: 2\n")
    with new_app(home) as app:
        result = app.install_bundle(tmp_path / "stick-v2", allow_downgrade=True)
        assert result.downgrade and result.version == 2
        row = list(audit.rows(app.store.conn, "install"))[-1]
        assert json.loads(row["detail"])["downgrade"] is True
    assert trust.trusted_version(home) == 3  # a downgrade never lowers what is trusted


def test_expired_metadata(tmp_path, installed, keys, variant_generation):
    stick = make_bundle(tmp_path, variant_generation, keys, 2, expires=datetime.now(UTC) - timedelta(days=1))
    refused(installed, stick, "expired")
    assert_untouched(installed, 1, trusted=1)


def test_corrupt_gguf_header_in_a_correctly_signed_bundle(
    tmp_path, installed, keys, tiny_generation, monkeypatch
):
    def corrupt(d, fields):
        data = bytearray((d / "model.gguf").read_bytes())
        data[8:16] = (2**40).to_bytes(8, "little")  # tensor count far beyond what the file can hold
        (d / "model.gguf").write_bytes(bytes(data))

    bad = _regenerate(tiny_generation, tmp_path / "bad-gen", corrupt)
    with pytest.raises(BuilderError, match="not a readable GGUF"):
        make_bundle(tmp_path, bad, keys, 2)  # the builder reads the header for the memory estimate
    monkeypatch.setattr(builder_bundle, "min_ram_mb", lambda model, embedder_bytes: 500)
    stick = make_bundle(tmp_path, bad, keys, 2, name="signed-anyway", force=True)
    refused(installed, stick, "GGUF header claims", error=ModelError)
    assert_untouched(installed, 1, trusted=1)


def test_not_a_bundle_and_no_trust(tmp_path, installed, keys, tiny_generation):
    refused(installed, tiny_generation, "no metadata/ folder")
    stick = make_bundle(tmp_path, tiny_generation, keys, 2)
    (stick / "metadata" / "timestamp.json").unlink()  # the stick was pulled before the last write
    refused(installed, stick, "timestamp.json is not in the bundle")
    refused(tmp_path / "fresh-home", stick, "no trusted root")


# -- trust ------------------------------------------------------------------------------------------


def test_trust_init_refuses_replacement_without_force_and_tampered_roots(tmp_path, trusted_home, keys):
    other = tmp_path / "other"
    keyring.init(other)
    with new_app(trusted_home) as app:
        with pytest.raises(BundleError, match="already holds a trusted root"):
            app.trust_init(other / "root.json")
        tampered = tmp_path / "root.json"
        tampered.write_text((other / "root.json").read_text().replace('"expires": "20', '"expires": "21', 1))
        with pytest.raises(BundleError, match="not signed by its own root keys"):
            app.trust_init(tampered, force=True)
        report = app.trust_init(other / "root.json", force=True)
        assert report["replaced"]
        rows = [json.loads(r["detail"]) for r in audit.rows(app.store.conn, "trust")]
    assert [r["replaced"] for r in rows] == [False, True]


# -- interrupted installs --------------------------------------------------------------------------


def _install_process(home: Path, stick: Path, pause: str) -> subprocess.Popen:
    env = dict(os.environ, APPLIANCE_HOME=str(home), **{commit.PAUSE_ENV: pause})
    return subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "bundle", "install", str(stick)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_paused(home: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not (home / "install-paused").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the installer never reached its pause"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "step", ["refresh", "copy", "copying", "validate", "health", "commit", "renamed", "switched"]
)
def test_kill_9_at_each_step_then_restart_recovers(tmp_path, installed, keys, variant_generation, step):
    stick = make_bundle(tmp_path, variant_generation, keys, 2)
    proc = _install_process(installed, stick, step)
    _wait_paused(installed, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (installed / "install-paused").unlink()
    assert (installed / commit.STATE).exists()  # the kill left its state behind
    r = CliRunner().invoke(appliance_cli, ["--home", str(installed), "bundle", "list", "--json"])
    assert r.exit_code == 0, r.output
    committed = step in ("commit", "renamed", "switched")
    assert ("completed an interrupted install" if committed else "removed an interrupted install") in r.stderr
    assert_untouched(installed, 2 if committed else 1, trusted=2 if committed else 1)
    with new_app(installed) as app:  # still serving, and the bundle installs (or is current) after it
        assert app.ask("Database Administrator code?", max_tokens=4).model["generation"] == (
            2 if committed else 1
        )
        result = app.install_bundle(stick)
        assert result.version == 2 and (result.generation is None) == committed


def test_stick_removed_mid_copy(tmp_path, installed, keys, variant_generation):
    stick = make_bundle(tmp_path, variant_generation, keys, 2)
    proc = _install_process(installed, stick, "copying")
    _wait_paused(installed, proc)
    shutil.rmtree(stick / "targets")
    (installed / "install-paused").unlink()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.BUNDLE, err
    assert "missing from the bundle" in err
    assert_untouched(installed, 1, trusted=1)


def test_two_installs_at_once(tmp_path, installed, keys, variant_generation):
    stick = make_bundle(tmp_path, variant_generation, keys, 2)
    with commit.locked(installed):
        refused(installed, stick, "another install or rollback is running", error=BusyError)
    r = CliRunner().invoke(appliance_cli, ["--home", str(installed), "bundle", "rollback"])
    assert r.exit_code == ExitCode.BUNDLE  # the lock was released; nothing to roll back to yet
    assert_untouched(installed, 1, trusted=1)


def test_disk_full_before_and_during_staging(tmp_path, installed, keys, variant_generation, monkeypatch):
    stick = make_bundle(tmp_path, variant_generation, keys, 2)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(
        appliance_bundle.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=10_000_000)
    )
    refused(installed, stick, r"the bundle needs \d+ MB and .* has 10 MB free")
    monkeypatch.undo()
    real_open = staging._open_staged

    class FillsUp:
        """The disk fills after 1 MB of staged data."""

        written = 0

        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            FillsUp.written += len(data)
            if FillsUp.written > 1_000_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

    monkeypatch.setattr(staging, "_open_staged", lambda dest: FillsUp(real_open(dest)))
    refused(installed, stick, "no space left on the device while staging")
    assert_untouched(installed, 1, trusted=1)


# -- embedder change: local documents re-embedded, nothing lost --------------------------------------


def test_new_embedder_reembeds_local_documents(tmp_path, keys, tiny_generation, corpus_copy):
    def rename_embedder(d, fields):
        meta = json.loads((d / "embedder" / "embedder.json").read_text())
        meta["name"] = "minilm-retrained"
        (d / "embedder" / "embedder.json").write_text(json.dumps(meta))
        fields["embedder"]["name"] = "minilm-retrained"

    new_embedder = _regenerate(tiny_generation, tmp_path / "gen-new-embedder", rename_embedder)
    home = tmp_path / "home"
    with new_app(home) as app:
        app.trust_init(keys / "root.json")
        app.install_bundle(make_bundle(tmp_path, tiny_generation, keys, 1))
        app.ingest([corpus_copy / "reference"], "reference")
        chunks = app.status().collections[0]["chunks"]
        before = app.search("15-1252", k=1)[0].text
        result = app.install_bundle(make_bundle(tmp_path, new_embedder, keys, 2))
        assert result.health["reembedded_chunks"] == chunks > 0
        status = app.status()
        assert status.embedder["index"] == {"name": "minilm-retrained", "dim": 384, "matches": True}
        assert status.collections[0]["chunks"] == chunks
        assert app.search("15-1252", k=1)[0].text == before


# -- builder side ------------------------------------------------------------------------------------


def test_min_ram_sizes_the_kv_cache_at_the_appliances_default_context(tiny_generation, monkeypatch, tmp_path):
    """The bundle's min_ram_mb holds the KV cache the appliance will really allocate: its default n_ctx
    (capped by the model's own context), not a builder-side guess."""
    from gguf import GGUFReader

    from appliance.config import Settings

    model = tiny_generation / read_manifest(tiny_generation).model.file
    fields = GGUFReader(str(model)).fields
    trained = int(fields["llama.context_length"].contents())
    assert builder_bundle.DEFAULT_N_CTX == Settings(home=tmp_path).n_ctx
    full = builder_bundle.min_ram_mb(model, 0)
    monkeypatch.setattr(builder_bundle, "DEFAULT_N_CTX", builder_bundle.DEFAULT_N_CTX // 2)
    half = builder_bundle.min_ram_mb(model, 0)
    layers = int(fields["llama.block_count"].contents())
    kv_heads = int(fields["llama.attention.head_count_kv"].contents())
    head_dim = int(fields["llama.embedding_length"].contents()) // int(
        fields["llama.attention.head_count"].contents()
    )
    per_token = 2 * layers * kv_heads * head_dim * 2  # K and V, f16
    context = min(trained, Settings(home=tmp_path).n_ctx)
    expected = (context - min(trained, context // 2)) * per_token / 1e6
    assert expected > 0 and abs((full - half) - expected) <= 1, (full, half, expected)


def test_builder_versions_never_go_back_and_bundle_is_content_addressed(
    tmp_path, keys, tiny_generation, variant_generation
):
    v1 = make_bundle(tmp_path, tiny_generation, keys, 1)
    for name, entry in read_manifest(tiny_generation).files.items():
        assert target_file(v1, name).name == f"{entry.sha256}.{Path(name).name}"
    info = json.loads(target_file(v1, "bundle.json").read_text())
    assert info["version"] == 1 and info["min_ram_mb"] > 400 and info["lineage"]["stages"]
    assert info["evaluation"]["gate"] is not None
    with pytest.raises(BuilderError, match="already holds a bundle"):
        make_bundle(tmp_path, tiny_generation, keys, 1)
    # the same generation as the same version again (another stick): allowed, byte-identical targets
    copy = make_bundle(tmp_path, tiny_generation, keys, 1, name="second-stick")
    assert target_file(copy, "bundle.json").read_bytes() == target_file(v1, "bundle.json").read_bytes()
    with pytest.raises(BuilderError, match="already signed .* for another generation"):
        make_bundle(tmp_path, variant_generation, keys, 1, name="other")
    make_bundle(tmp_path, variant_generation, keys, 3)
    with pytest.raises(BuilderError, match="older than version 3"):
        make_bundle(tmp_path, tiny_generation, keys, 2)
    nxt = tmp_path / "next"
    assert builder_bundle.create(tiny_generation, keys, "next", nxt).version == 4


def test_builder_cli_keys_with_passphrase_and_bundle_create(tmp_path, tiny_generation, monkeypatch):
    runner = CliRunner()
    keys = tmp_path / "k"
    monkeypatch.setenv("BUILDER_KEY_PASSPHRASE", "correct horse")
    r = runner.invoke(
        builder_cli, ["keys", "init", "--out", str(keys), "--passphrase", "--threshold", "1", "--keys", "2"]
    )
    assert r.exit_code == 0, r.output
    pems = list((keys / "private").glob("*.pem"))
    assert len(pems) == 6 and all(b"ENCRYPTED" in p.read_bytes() for p in pems)
    assert all(p.stat().st_mode & 0o077 == 0 for p in pems)
    r = runner.invoke(builder_cli, ["keys", "init", "--out", str(keys)])
    assert r.exit_code != 0 and "not empty" in r.output
    stick = tmp_path / "stick"
    args = [
        "bundle",
        "create",
        "--generation",
        str(tiny_generation),
        "--keys",
        str(keys),
        "--version",
        "next",
        "--out",
        str(stick),
    ]
    monkeypatch.setenv("BUILDER_KEY_PASSPHRASE", "wrong")
    r = runner.invoke(builder_cli, args)
    assert r.exit_code != 0 and "check the passphrase" in r.output
    monkeypatch.setenv("BUILDER_KEY_PASSPHRASE", "correct horse")
    r = runner.invoke(builder_cli, args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["version"] == 1
    r = runner.invoke(builder_cli, ["keys", "rotate", "--keys", str(keys), "--role", "timestamp"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["root_version"] == 2
    home = tmp_path / "home"
    r = runner.invoke(appliance_cli, ["--home", str(home), "trust", "init", str(keys / "root.json")])
    assert r.exit_code == 0 and "targets: 1 of 2 keys" in r.stderr
    # provisioned with root version 2: the stick signed by the retired timestamp key is refused
    r = runner.invoke(appliance_cli, ["--home", str(home), "bundle", "install", str(stick)])
    assert r.exit_code == ExitCode.BUNDLE and "timestamp.json: signature check failed" in r.stderr
    r = runner.invoke(builder_cli, [*args[:-1], str(tmp_path / "stick2")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(appliance_cli, ["--home", str(home), "bundle", "install", str(tmp_path / "stick2")])
    assert r.exit_code == 0, r.output


def test_signed_files_and_the_generation_manifest_must_agree(tmp_path, installed, keys, variant_generation):
    stick = make_bundle(tmp_path, variant_generation, keys, 2)
    resign(stick, keys, lambda targets: targets.targets.pop("eval.json"))
    refused(
        installed, stick, r"signed files and the generation's manifest differ .*listed only: \['eval.json'\]"
    )
    assert_untouched(installed, 1, trusted=1)


def test_reference_db_is_shipped_checked_and_a_corrupt_one_refused(
    tmp_path, installed, keys, variant_generation, demo_home
):
    db = tmp_path / "reference.db"
    shutil.copyfile(demo_home / "appliance.db", db)  # a real index the appliance wrote
    stick = make_bundle(tmp_path, variant_generation, keys, 2, reference_db=db)
    assert json.loads(target_file(stick, "bundle.json").read_text())["reference_db"] is True
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    refused(
        installed,
        make_bundle(tmp_path, variant_generation, keys, 3, name="bad-ref", reference_db=bad),
        "reference.db: (not a readable SQLite database|integrity check failed)",
    )
    assert_untouched(installed, 1, trusted=1)
    with new_app(installed) as app:
        assert app.install_bundle(stick).generation == 2  # the refused v3 moved no trust: v2 is no downgrade
    installed_db = installed / "generations" / "2" / "reference.db"
    assert installed_db.read_bytes() == db.read_bytes()


def test_an_install_finds_and_records_the_interrupted_one(tmp_path, installed, keys, variant_generation):
    """The service and the UI install without running `recover` first: the install does it, audited."""
    stick = make_bundle(tmp_path, variant_generation, keys, 2)
    proc = _install_process(installed, stick, "copying")
    _wait_paused(installed, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (installed / "install-paused").unlink()
    with new_app(installed) as app:
        result = app.install_bundle(stick)
        assert result.generation == 2 and "removed an interrupted install" in result.recovered
        recovered = list(audit.rows(app.store.conn, "recover"))
    assert len(recovered) == 1 and "interrupted" in json.loads(recovered[0]["detail"])["message"]
    assert_untouched(installed, 2, trusted=2)


# -- signed, but hostile or broken content (a compromised or buggy builder) -------------------------


@pytest.mark.parametrize(
    "template, match",
    [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "looped more than",
        ),
        (
            "{% if messages|length > 1 %}{{ 'x' * 2000000000 }}{% endif %}{% for m in messages %}{{ m['content'] }}"
            "{% endfor %}",
            "past the render budget",
        ),  # passes the one-message canary, not the others
        (
            "{% for m in messages %}{% for a in m['content'] %}{% for b in m['content'] %}{% endfor %}{% endfor %}"
            "{% endfor %}",
            "longer than",
        ),  # only the long question's shape runs away
        ("{{ ''.__class__.__mro__ }}", "health check: chat template failed to render"),
        (
            "{% if messages|length > 6 %}{{ 'x' * 2000000000 }}{% endif %}{% for m in messages %}{{ m['content'] }}"
            "{% endfor %}",
            "past the render budget",
        ),  # only a follow-up with two earlier turns or more runs away
    ],
)
def test_a_signed_template_that_runs_away_is_refused_within_its_budget(
    tmp_path, installed, keys, tiny_generation, template, match
):
    def change(d, fields):
        (d / fields["chat_template"]).write_text(template)

    bad = _regenerate(tiny_generation, tmp_path / "bad-template", change)
    stick = make_bundle(tmp_path, bad, keys, 2)
    start = time.monotonic()
    result = CliRunner().invoke(appliance_cli, ["--home", str(installed), "bundle", "install", str(stick)])
    assert result.exit_code == ExitCode.BUNDLE and match in result.output, (
        result.output
    )  # a refused bundle: 10
    assert time.monotonic() - start < 60
    assert_untouched(installed, 1, trusted=1)
    with new_app(installed) as app:  # the lock was let go and the running generation still answers
        assert app.ask("Say OK.", use_rag=False, max_tokens=2).timing["tokens"] >= 1


def test_signed_metadata_past_its_size_cap_is_refused_before_it_is_read(
    tmp_path, installed, keys, variant_generation
):
    stick = make_bundle(tmp_path, variant_generation, keys, 2)
    resign(stick, keys, lambda signed: signed.unrecognized_fields.update(padding="x" * 12_000_000))
    assert (stick / "metadata" / "2.targets.json").stat().st_size > 12_000_000
    error = refused(installed, stick, "2.targets.json is 12.")
    assert "signed or not" in error.message
    assert_untouched(installed, 1, trusted=1)


def test_a_gguf_with_a_million_string_metadata_array_is_refused_cheaply(tmp_path):
    import struct
    import tracemalloc

    from appliance.bundles.modelfile import MAX_ARRAY, validate

    path = tmp_path / "arrays.gguf"
    key = b"tokenizer.ggml.tokens"
    items = b"".join(struct.pack("<Q", 1) + b"a" for _ in range(1_000_000))
    path.write_bytes(
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, 1)
        + struct.pack("<Q", len(key))
        + key
        + struct.pack("<IIQ", 9, 8, 1_000_000)
        + items
    )
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ModelError, match=f"an array of 1000000 items \\(at most {MAX_ARRAY}\\)"):
        validate(path)
    assert time.perf_counter() - start < 1 and tracemalloc.get_traced_memory()[1] < 5_000_000
    tracemalloc.stop()


def test_an_unsigned_install_is_refused_once_a_root_is_trusted(tmp_path, installed, variant_generation):
    run = CliRunner().invoke(
        appliance_cli, ["--home", str(installed), "install-generation", "--unsigned", str(variant_generation)]
    )
    assert run.exit_code == ExitCode.BUNDLE and "installs signed bundles only" in run.output
    assert_untouched(installed, 1, trusted=1)
    forced = CliRunner().invoke(
        appliance_cli,
        [
            "--home",
            str(installed),
            "install-generation",
            "--unsigned",
            "--force-unsigned",
            str(variant_generation),
        ],
    )
    assert forced.exit_code == 0, forced.output
    with new_app(installed) as app:
        actions = [r for r in app.audit_rows(limit=5) if r["action"] in ("install", "install_refused")]
        assert actions[0]["detail"]["forced"] is True and actions[0]["detail"]["health"]["canary_tokens"] >= 1
        assert actions[1]["action"] == "install_refused" and actions[1]["detail"]["signed"] is False


def test_the_services_own_user_installs_a_bundle_not_only_root(tmp_path, keys, tiny_generation):
    """systemd and the container run the appliance as its own user, not root: install and a second
    install (keeping the first) as uid 65534 on a home that user owns. Found by running the image: a
    read-only generation could not be moved out of staging without root."""
    import tempfile

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to act as another user")
    top = Path(tempfile.mkdtemp(prefix="appliance-owner-"))
    try:
        top.chmod(0o755)
        home = top / "home"
        home.mkdir()
        os.chown(home, 65534, 65534)
        sticks = [make_bundle(top, tiny_generation, keys, v) for v in (1, 2)]
        for p in [top, *top.rglob("*")]:
            if p != home:
                p.chmod(p.stat().st_mode | 0o444 | (0o111 if p.is_dir() else 0))
        shutil.copy(keys / "root.json", top / "root.json")
        (top / "root.json").chmod(0o644)

        def run(*args):
            return subprocess.run(
                [
                    "setpriv",
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    sys.executable,
                    "-m",
                    "appliance.cli",
                    "--local",
                    "--home",
                    str(home),
                    *args,
                ],
                capture_output=True,
                text=True,
                timeout=300,
                cwd="/",
            )

        assert (out := run("trust", "init", str(top / "root.json"))).returncode == 0, out.stderr
        for n, stick in enumerate(sticks, start=1):
            out = run("bundle", "install", str(stick))
            assert out.returncode == 0 and f"as generation {n}" in out.stderr, out.stderr[-2000:]
        final = home / "generations" / "2"
        assert final.is_dir() and not final.stat().st_mode & 0o222  # read-only again after the move
        assert run("bundle", "rollback").returncode == 0
    finally:
        for p in [top, *top.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(p.stat().st_mode | 0o700)
        shutil.rmtree(top)


def _gate_failed(d: Path, fields: dict) -> None:
    report = json.loads((d / "eval.json").read_text())
    report["gate"] |= {
        "passed": False,
        "failures": ["Q8_0: 55% of lcat_code questions with retrieval (needs >= 80%)"],
    }
    (d / "eval.json").write_text(json.dumps(report))


def test_bundle_create_signs_only_a_model_that_passed_its_gate(tmp_path, tiny_generation, keys):
    """The next cycle's guard: a retrained model that failed its release gate, or was never evaluated,
    is not signed unless the builder says --ungated; the appliance then says so before installing."""
    failed = _regenerate(tiny_generation, tmp_path / "failed", _gate_failed)
    never = _regenerate(tiny_generation, tmp_path / "never", lambda d, fields: (d / "eval.json").unlink())
    with pytest.raises(BuilderError, match=r"did not pass its release gate: Q8_0: 55% of lcat_code") as e:
        make_bundle(tmp_path, failed, keys, 1)
    assert "--ungated" in e.value.fix
    with pytest.raises(BuilderError, match="never evaluated"):
        make_bundle(tmp_path, never, keys, 1)
    assert not (tmp_path / "stick-v1" / "metadata").exists()  # nothing half-written
    args = ["bundle", "create", "--generation", str(failed), "--keys", str(keys), "--version", "next"]
    r = CliRunner().invoke(builder_cli, [*args, "--out", str(tmp_path / "refused")])
    assert r.exit_code != 0 and "--ungated" in r.output
    r = CliRunner().invoke(builder_cli, [*args, "--out", str(tmp_path / "forced"), "--ungated"])
    assert r.exit_code == 0, r.output
    assert "warning: signing it although the model did not pass its release gate" in r.stderr
    home = tmp_path / "home"
    r = CliRunner().invoke(appliance_cli, ["--home", str(home), "trust", "init", str(keys / "root.json")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(appliance_cli, ["--home", str(home), "bundle", "verify", str(tmp_path / "forced")])
    assert r.exit_code == 0, r.output
    assert "note: its model did not pass its release gate" in r.stderr
    r = CliRunner().invoke(
        appliance_cli, ["--home", str(home), "bundle", "install", str(tmp_path / "forced")]
    )
    assert r.exit_code == 0 and "note: its model did not pass its release gate" in r.stderr, r.output
    forced = make_bundle(tmp_path, never, keys, 2, ungated=True)
    r = CliRunner().invoke(appliance_cli, ["--home", str(home), "bundle", "verify", str(forced)])
    assert r.exit_code == 0 and "note: its model was never evaluated" in r.stderr
    r = CliRunner().invoke(
        appliance_cli,
        ["--home", str(home), "bundle", "verify", str(make_bundle(tmp_path, tiny_generation, keys, 3))],
    )
    assert r.exit_code == 0 and "release gate" not in r.stderr  # a passed gate needs no note
