"""Regenerate docs/tui-chat.svg: the operator UI at 120x40 answering one question over a home set up
by `make setup` (or APPLIANCE_HOME). Run: .venv/bin/python docs/screenshot.py ["question"]"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from appliance.app import Appliance
from appliance.config import load_settings
from tui.app import make_app

QUESTION = "What labor category code should we bid for a Deputy Program Manager?"


async def main(question: str) -> None:
    app = make_app(Appliance(load_settings(), long_lived=True))
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause(1)
        await pilot.press(*question, "enter")
        while app.last_answer is None or app.busy:
            await pilot.pause(0.2)
        for field in app.query("Input"):
            field.cursor_blink = False
        await pilot.pause(0.5)
        out = Path(__file__).parent / "tui-chat.svg"
        out.write_text(app.export_screenshot(title="appliance"))
        print(f"wrote {out}: {app.last_answer.answer}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else QUESTION))
