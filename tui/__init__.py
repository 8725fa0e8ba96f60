"""The Textual operator UI (`appliance tui`): a client of the appliance; see tui/app.py."""
