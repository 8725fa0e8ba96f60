"""Documents: every file is hostile until parsed.

`readers` (txt, md, pdf, docx, csv, xlsx to text and table rows, every size bounded), `chunking`
(prose along headings and paragraphs, tables by row), `sandbox` (the child process that parses an
upload with memory and time limits). Imports nothing of the appliance but its errors and `terminal`.
"""
