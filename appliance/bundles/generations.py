"""Installed generations under `$APPLIANCE_HOME/generations/<n>/` and the `current` symlink.

`install_unsigned` is the development path (`appliance install-generation --unsigned`): it checks the
directory against its own manifest, copies it into a staging directory on the same filesystem,
checks the copy again and validates the GGUF's structure, makes it read-only, renames it into place
and switches `current` with one atomic `rename`. A failure at any step leaves `current` pointing
where it pointed before and removes the staging copy.
"""

from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from appliance.bundles import modelfile
from appliance.bundles.manifest import GenerationManifest, read_bundle, read_manifest, verify_generation
from appliance.errors import GenerationError, NotFoundError


@dataclass(frozen=True)
class Installed:
    number: int
    path: Path
    manifest: GenerationManifest

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest.model.file

    @property
    def template_path(self) -> Path:
        return self.path / self.manifest.chat_template

    @property
    def embedder_path(self) -> Path:
        return self.path / self.manifest.embedder.dir

    @property
    def version(self) -> int | None:
        """The signed bundle's version; None for a generation installed unsigned."""
        info = read_bundle(self.path)
        return info.version if info else None


def list_generations(generations_dir: Path) -> list[int]:
    if not generations_dir.is_dir():
        return []
    return sorted(int(p.name) for p in generations_dir.iterdir() if p.name.isdigit() and p.is_dir())


def current(home: Path) -> Installed:
    link = home / "current"
    if not link.is_symlink():
        raise NotFoundError(
            f"no generation installed in {home}",
            "install a signed bundle with `appliance bundle install DIR` (or run `make setup` for the demo)",
        )
    target = (home / os.readlink(link)).resolve()
    if not target.is_dir():
        raise GenerationError(f"{link} points at {target}, which is missing", "reinstall the generation")
    return Installed(number=int(target.name), path=target, manifest=read_manifest(target))


def make_read_only(root: Path) -> None:
    for path in root.rglob("*"):
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    root.chmod(root.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _make_writable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def remove_tree(root: Path) -> None:
    if root.exists():
        _make_writable(root)
        shutil.rmtree(root)


def switch_current(home: Path, number: int) -> None:
    """Point `current` at generations/<number> atomically (symlink then rename over the old one)."""
    switch_link(home / "current", f"generations/{number}")


def switch_link(link: Path, target: str | None) -> None:
    """Point the symlink `link` at `target` atomically, or remove it (target None)."""
    if target is None:
        if link.is_symlink():
            link.unlink()
        return
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install_unsigned(source: Path, home: Path, check=None) -> Installed:
    """Copy a verified generation directory into the home and make it current; `check(staged, manifest)`
    runs on the copy before it becomes current (the health check) and refuses it by raising."""
    source = source.resolve()
    if not source.is_dir():
        raise NotFoundError(f"{source}: not a directory", "give the path of a generation directory")
    manifest = verify_generation(source)
    generations = home / "generations"
    generations.mkdir(parents=True, exist_ok=True)
    # Leftovers of an interrupted install are never current; clear them first.
    for stale in generations.glob(".staging-*"):
        remove_tree(stale)
    number = (list_generations(generations) or [0])[-1] + 1
    staging = generations / f".staging-{number}"
    try:
        shutil.copytree(source, staging, symlinks=False)
        verify_generation(staging)  # what was copied, not what we were shown
        modelfile.validate(staging / manifest.model.file)  # before llama.cpp ever parses it
        if check:
            check(staging, manifest)
        make_read_only(staging)
        os.rename(staging, generations / str(number))
        fsync_dir(generations)
        switch_current(home, number)
    except BaseException:
        remove_tree(staging)
        raise
    return Installed(number=number, path=generations / str(number), manifest=manifest)
