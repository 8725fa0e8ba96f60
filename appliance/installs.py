"""Changing what the appliance runs: the unsigned development install, signed bundles (verify, install,
roll back, finish or undo a killed install), provisioning the root of trust, and the history of installed
generations. Each change passes the health check (appliance.health), lets go of the loaded model and is
audited, refused or done. The Appliance's methods of the same names are these functions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import health
from appliance.bundles import bundle, commit, generations, trust
from appliance.errors import ApplianceError, BundleError
from appliance.schemas import BundleCheck, Generations, Installed

if TYPE_CHECKING:
    from appliance.app import Appliance


def install_generation(
    app: Appliance, directory: Path, force: bool = False, user: str | None = None
) -> generations.Installed:
    """The unsigned development install, with the signed install's health check; the model and
    embedder of the old generation are let go. Once a root of trust is provisioned, only signed
    bundles install unless `force` (audited)."""
    if trust.has_trusted_root(app.settings.home):
        if not force:
            app.audit(
                "install_refused",
                {
                    "source": str(directory.resolve()),
                    "signed": False,
                    "error": "unsigned install on an appliance with a trusted root",
                },
                with_model=app.has_generation(),
                user=user,
            )
            raise BundleError(
                "this appliance has a trusted root: it installs signed bundles only",
                "install the bundle with `appliance bundle install`, or pass --force-unsigned "
                "(audited) for a development build",
            )
    health_report: dict = {}
    installed = generations.install_unsigned(
        directory,
        app.settings.home,
        check=lambda staged, manifest: health_report.update(health.check(app, staged, manifest)),
    )
    app.let_go()
    app.audit(
        "install",
        {
            "source": str(directory.resolve()),
            "generation": installed.number,
            "signed": False,
            "forced": force,
            "name": installed.manifest.name,
            "health": health_report,
        },
        user=user,
    )
    return installed


def recover(app: Appliance) -> str | None:
    """Finish or undo an install that was killed; audited when something was done."""
    message = commit.recover(app.settings.home)
    if message:
        app.let_go()
        app.audit("recover", {"message": message}, with_model=app.has_generation())
    return message


def trust_init(app: Appliance, root_json: Path, force: bool = False) -> dict:
    """Provisioning: the trusted root, and the appliance's own signing key if it has none."""
    report = trust.trust_init(app.settings.home, root_json, force)
    app.audit("trust", dict(report, source=str(root_json.resolve())), with_model=app.has_generation())
    report["appliance_key_id"] = app.identity().key_id
    return report


def verify_bundle(app: Appliance, directory: Path, progress: Callable | None = None) -> BundleCheck:
    return bundle.verify(app.settings.home, directory, progress).report()


def install_bundle(
    app: Appliance,
    directory: Path,
    allow_downgrade: bool = False,
    progress: Callable | None = None,
    reembed_progress: Callable | None = None,
    user: str | None = None,
) -> Installed:
    """Verify and install a signed bundle (see appliance.bundles.bundle.install); audited either way."""
    try:
        result = bundle.install(
            app.settings.home,
            directory,
            lambda staged, m, i: health.check(app, staged, m, reembed_progress),
            allow_downgrade=allow_downgrade,
            security_floor=app.settings.security_floor,
            progress=progress,
        )
    except ApplianceError as exc:
        app.audit(
            "install_refused",
            {"source": str(directory.resolve()), "error": exc.message},
            with_model=app.has_generation(),
            user=user,
        )
        raise
    if result.recovered:  # found under the install lock (the service and UI do not run `recover` first)
        app.audit("recover", {"message": result.recovered}, with_model=app.has_generation(), user=user)
    if result.number is not None:  # a no-op keeps the loaded model
        app.let_go()
        app.audit(
            "install",
            {
                "source": str(directory.resolve()),
                "generation": result.number,
                "signed": True,
                "version": result.version,
                "name": result.info.name if result.info else None,
                "downgrade": result.downgrade,
                "health": result.health,
            },
            user=user,
        )
    return result.report()


def rollback(app: Appliance, user: str | None = None) -> tuple[int, int]:
    left, now = bundle.rollback(app.settings.home)
    app.let_go()
    app.audit("rollback", {"from": left, "to": now}, user=user)
    return left, now


def history(app: Appliance) -> Generations:
    """Every installed generation and the version the trusted metadata last vouched for."""
    return Generations(
        generations=bundle.history(app.settings.home),
        trusted_version=trust.trusted_version(app.settings.home),
    )
