"""Bundles: what a generation is and how it arrives.

`manifest` (generation.json and bundle.json: the contract with the builder), `modelfile` (a GGUF's
structure checked before anything loads it), `generations` (installed generations and the `current`
link), `bundle` (signed USB bundles: TUF verify, staged install, commit, rollback, recovery),
`identity` (this appliance's signing key). Imports nothing above it.
"""
