"""Retrieval: documents in, cited sources out.

`store` (the one SQLite file: documents, chunks, FTS5, vectors, reference rows, conversations;
`migrations` its schema), `ingest` (files into chunks and vectors, with their audit rows), `embed`
(the ONNX embedder), `rag` (hybrid search, the prompt's sources, and an answer's citations and code
checks), `lookup` and `titles` (reference rows by code, prefix or title). Imports `documents`,
`engine.prompt` and `bundles.manifest`; never the service, drafting or the records.
"""
