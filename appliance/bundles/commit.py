"""The install's state on disk: the install lock, `install-state.json` (the step reached), the commit
(rename into `generations/<n>/`, switch the trusted metadata, switch `current`) and `recover`, which
removes an install killed before commit and completes one killed during it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from appliance.bundles import generations
from appliance.bundles.trust import trust_dir
from appliance.errors import BusyError

STATE = "install-state.json"


LOCK = ".install.lock"


PAUSE_ENV = "APPLIANCE_INSTALL_PAUSE"  # tests only: stop at this step until the pause file is removed


COMMIT_STEPS = ("commit", "renamed", "switched")


@contextlib.contextmanager
def locked(home: Path) -> Iterator[None]:
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise BusyError(
                f"another install or rollback is running ({holder})", "wait for it to finish, then try again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock; so does the kernel when the process is killed


def write_state(home: Path, state: dict) -> None:
    tmp = home / f".{STATE}.tmp"
    with open(tmp, "w") as fh:
        json.dump(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, home / STATE)
    generations.fsync_dir(home)


def step(home: Path, state: dict, step: str) -> None:
    state["step"] = step
    write_state(home, state)
    if os.environ.get(PAUSE_ENV) == step:  # tests: hold here so the installer can be killed at this step
        marker = home / "install-paused"
        marker.write_text(step)
        deadline = time.monotonic() + 600
        while marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def link_number(link: Path) -> int | None:
    if not link.is_symlink():
        return None
    name = Path(os.readlink(link)).name
    return int(name) if name.isdigit() else None


def commit(home: Path, state: dict) -> None:
    """Idempotent: safe to run again after a kill at any point inside it."""
    gens = home / "generations"
    staging = Path(state["staging"])
    number = state["number"]
    final = gens / str(number)
    if (staging / "generation").is_dir() and not final.exists():
        # moving a directory to another parent rewrites its "..": the service's user (not root) needs
        # write permission on it for that moment, then it is read-only again
        moved = staging / "generation"
        moved.chmod(moved.stat().st_mode | stat.S_IWUSR)
        os.rename(moved, final)
        generations.fsync_dir(gens)
    if final.is_dir() and final.stat().st_mode & stat.S_IWUSR:  # also after a kill between the two
        final.chmod(final.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    step(home, state, "renamed")
    if state.get("trust"):
        trust = trust_dir(home)
        md = trust / f"md-{number}"
        if not md.exists() and (staging / "tuf").is_dir():
            os.rename(staging / "tuf", md)
        if md.exists():
            generations.switch_link(trust / "metadata", md.name)
            for old in trust.glob("md-*"):
                if old != md:
                    shutil.rmtree(old)
    previous = state.get("previous")
    if link_number(home / "current") != number:
        if previous is not None:
            generations.switch_link(home / "previous", f"generations/{previous}")
        generations.switch_current(home, number)
    step(home, state, "switched")
    keep = {number, previous}
    for other in generations.list_generations(gens):
        if other not in keep:
            generations.remove_tree(gens / str(other))
    generations.remove_tree(staging)
    (home / STATE).unlink()
    generations.fsync_dir(home)


def recover(home: Path) -> str | None:
    """Finish or undo an install that was killed; returns what was done (None when nothing was)."""
    if not (home / STATE).exists() and not any((home / "generations").glob(".staging-*")):
        return None
    try:
        with locked(home):
            return recover_locked(home)
    except BusyError:
        return None  # an install is running now; it owns the state


def recover_locked(home: Path) -> str | None:
    message = None
    path = home / STATE
    if path.exists():
        try:
            state = json.loads(path.read_text())
        except ValueError:
            state = {}
        staged = Path(state.get("staging", "/nonexistent")) / "generation"
        final = home / "generations" / str(state.get("number"))
        if state.get("step") in COMMIT_STEPS and (staged.is_dir() or final.is_dir()):
            commit(home, state)
            message = (
                f"completed an interrupted install of version {state.get('version')} "
                f"(generation {state.get('number')})"
            )
        else:
            message = (
                f"removed an interrupted install of version {state.get('version', '?')} "
                f"(stopped at '{state.get('step', 'start')}'); the running generation was not touched"
            )
            path.unlink()
    for stale in (home / "generations").glob(".staging-*"):
        generations.remove_tree(stale)
    return message


def abandon(home: Path, staging: Path) -> None:
    generations.remove_tree(staging)
    with contextlib.suppress(FileNotFoundError):
        (home / STATE).unlink()
