"""systemd: the USB import script, its udev rule and unit, and the service unit.

The script runs for real on an ext4 image holding a real bundle: mounted read-only in a private mount
namespace (`unshare -m`), copied, unmounted, installed from the copy. That needs root and loop devices;
where they are missing those tests are skipped with the reason.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.bundles import trust
from appliance.bundles.generations import current
from builder import bundle as builder_bundle
from builder import keys as keyring

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
SCRIPT = SYSTEMD / "usb-import"


def _can_mount(tmp: Path) -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount)"
    if not shutil.which("mkfs.ext4") or not shutil.which("unshare"):
        return "needs mkfs.ext4 and unshare"
    img, mnt = tmp / "probe.img", tmp / "probe"
    mnt.mkdir()
    made = subprocess.run(["mkfs.ext4", "-q", str(img), "4M"], capture_output=True)
    if made.returncode:
        return "mkfs.ext4 failed"
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "mount", "-o", "ro", str(img), str(mnt)],
        capture_output=True,
        text=True,
    )
    return f"cannot loop-mount here ({probe.stderr.strip()})" if probe.returncode else None


@pytest.fixture(scope="module")
def stick_env(tmp_path_factory, tiny_generation):
    tmp = tmp_path_factory.mktemp("usb")
    reason = _can_mount(tmp)
    if reason:
        pytest.skip(reason)
    keys = tmp / "keys"
    keyring.init(keys)
    bundle = tmp / "bundle"
    builder_bundle.create(tiny_generation, keys, 1, bundle)
    return {"tmp": tmp, "keys": keys, "bundle": bundle}


def _image(tmp: Path, content: Path, name: str) -> Path:
    img = tmp / f"{name}.img"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(content), str(img), "64M"], check=True)
    return img


def _run(img: Path, home: Path, lock: Path, stderr) -> subprocess.Popen:
    env = dict(
        os.environ,
        APPLIANCE_HOME=str(home),
        APPLIANCE_USER=subprocess.check_output(["id", "-un"], text=True).strip(),
        APPLIANCE_BIN=str(Path(sys.executable).parent / "appliance"),
        APPLIANCE_IMPORT_LOCK=str(lock),
        TMPDIR=str(home.parent),
    )
    return subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", str(SCRIPT), str(img)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def _home(tmp: Path, keys: Path) -> Path:
    from appliance.app import Appliance
    from appliance.config import load_settings

    home = tmp / "home"
    with Appliance(load_settings(home=home)) as app:
        app.trust_init(keys / "root.json")
    return home


def test_import_from_a_stick_waits_for_another_import_then_installs_from_its_copy(tmp_path, stick_env):
    home = _home(tmp_path, stick_env["keys"])
    img = _image(tmp_path, stick_env["bundle"], "stick")
    lock = tmp_path / "import.lock"
    log = tmp_path / "stderr.log"
    with open(lock, "w") as held:  # another stick's import is running
        fcntl.flock(held, fcntl.LOCK_EX)
        with open(log, "w") as err:
            proc = _run(img, home, lock, err)
            deadline = time.monotonic() + 60
            while "waits its turn" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            assert not (home / "current").exists()
        fcntl.flock(held, fcntl.LOCK_UN)
        proc.wait(timeout=180)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert text.index("copied; the stick can be removed") < text.index("installed version 1")
    assert current(home).number == 1 and trust.trusted_version(home) == 1
    assert list((home / "import").iterdir()) == []  # the copy is gone
    assert not list(tmp_path.glob("appliance-usb.*"))  # so is the mount point


def test_import_refuses_links_on_the_stick_and_ignores_sticks_without_a_bundle(tmp_path, stick_env):
    home = _home(tmp_path, stick_env["keys"])
    evil = tmp_path / "evil"
    shutil.copytree(stick_env["bundle"], evil)
    model = next((evil / "targets").glob("*.model.gguf"))
    model.unlink()
    model.symlink_to("/etc/shadow")
    proc = _run(_image(tmp_path, evil, "evil"), home, tmp_path / "lock", subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 10 and "holds a link or special file" in err
    plain = tmp_path / "photos"
    plain.mkdir()
    (plain / "holiday.jpg").write_bytes(b"\xff\xd8")
    proc = _run(_image(tmp_path, plain, "photos"), home, tmp_path / "lock", subprocess.PIPE)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "no update bundle on this stick" in err
    assert not (home / "current").exists()


def test_udev_rule_only_tags_and_the_unit_mounts_nothing_itself():
    rule = (SYSTEMD / "90-appliance-usb.rules").read_text()
    active = " ".join(line for line in rule.splitlines() if not line.startswith("#"))
    assert 'ENV{SYSTEMD_WANTS}+="appliance-usb-import@%k.service"' in active
    assert "RUN" not in active and "mount" not in active.lower()
    script = SCRIPT.read_text()
    assert "-o ro,nosuid,nodev,noexec" in script
    assert script.index('umount "$mnt"\n') < script.index('bundle install "$copy"')  # installs from the copy
    unit = (SYSTEMD / "appliance-usb-import@.service").read_text()
    assert "PrivateMounts=yes" in unit and "PrivateNetwork=yes" in unit


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze")
@pytest.mark.parametrize("unit", ["appliance.service", "appliance-usb-import@.service"])
def test_unit_exposure_at_most_2(unit):
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(SYSTEMD / unit)], capture_output=True, text=True
    )
    line = next(ln for ln in out.stdout.splitlines() if "Overall exposure level" in ln)
    score = float(line.split(":")[1].split()[0])
    assert score <= 2.0, line


def test_dockerfile_runtime_stage_has_no_compiler_and_no_builder_extra():
    text = (ROOT / "Dockerfile").read_text()
    stages = text.split("\nFROM ")
    assert len(stages) == 3, "a build stage and a runtime stage"
    runtime = stages[2]
    assert (
        "build-essential" not in runtime
        and "cmake" not in runtime
        and "[builder]" not in text.replace("no [builder] extra", "")
    )
    assert 'ENTRYPOINT ["appliance"]' in runtime and '"serve"' in runtime
    assert "USER appliance" in runtime and 'VOLUME ["/var/lib/appliance"]' in runtime
    assert "-DGGML_NATIVE=OFF" in stages[1]
