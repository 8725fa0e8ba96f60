"""The Textual operator UI: a client of the appliance. It arrives with issue 5; until then `make demo`
runs the interactive `appliance ask` loop."""
