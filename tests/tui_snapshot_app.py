"""The operator UI for SVG snapshots: an empty home and no background loading, so every run renders
the same screen (no times, paths, memory figures or notifications)."""

import tempfile
from pathlib import Path

from appliance.app import Appliance
from appliance.config import load_settings
from tui.app import OperatorApp


class SnapshotApp(OperatorApp):
    def refresh_all(self) -> None:
        pass


app = SnapshotApp(Appliance(load_settings(home=Path(tempfile.mkdtemp(prefix="tui-snapshot-")))))
