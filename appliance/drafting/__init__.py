"""Drafting: proposal drafts from RFPs.

`draft` (requirements from the RFP's statements, a cited response each, the staffing table from the
reference rows, markdown and DOCX). Imports `retrieval`, `documents` and `engine.prompt`.
"""
