"""The operator UI's entry point: `appliance-tui`, `python -m tui`, or `appliance tui` (which runs this).
Through the running service for the home when there is one, else on an in-process Appliance."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from appliance.errors import ApplianceError


def backend_for(home: Path | None, local: bool):
    """The running service for `home` unless `local`, else an Appliance opened here (kept open)."""
    from appliance.client import running_service

    client = None if local else running_service(home)
    if client is not None:
        return client
    from appliance.app import Appliance
    from appliance.config import load_settings

    app = Appliance(load_settings(home=home))
    recovered = app.recover()
    if recovered:
        click.echo(f"note: {recovered}", err=True)
    app.long_lived = True
    return app


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(path_type=Path),
    envvar="APPLIANCE_HOME",
    help="Appliance home (default: $APPLIANCE_HOME or ~/.local/share/appliance).",
)
@click.option("--local", is_flag=True, help="Work in-process even when `appliance serve` is running.")
def main(home: Path | None, local: bool) -> None:
    """The operator UI: chat with cited sources, documents, lookup and drafting, model and bundles,
    audit log, feedback (F1 inside: help)."""
    try:
        from tui.app import run
    except ImportError as exc:  # textual is the [tui] extra
        click.echo(f"error: the operator UI needs textual ({exc.name} is not installed)", err=True)
        click.echo("  fix: pip install 'slm-appliance[tui]'", err=True)
        sys.exit(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        run(backend_for(home, local))
    except ApplianceError as exc:
        click.echo(f"error: {exc.message}", err=True)
        if exc.fix:
            click.echo(f"  fix: {exc.fix}", err=True)
        sys.exit(int(exc.exit_code))


if __name__ == "__main__":
    main()
