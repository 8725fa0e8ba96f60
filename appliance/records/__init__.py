"""Records: what happened, provably.

`audit` (the hash-chained, signed audit log and its checkpoints), `feedback` (operators' judgements of
answers, exported signed for the builder). Imports `bundles` (the identity key) and `engine.prompt`.
"""
