"""Reference-table titles named in a text: the only module that finds them.

`TitleIndex` is the reference table's rows by lower-case title (what `Store.ref_titles` returns) with a
trie of each title's words beside it. Finding the titles a text names is one pass over the text's words:
from each word, one walk down the trie (at most MAX_TITLE_WORDS deep) collects the titles that start
there, checked as exact whole-word substrings; a longer title wins over one inside it ("Cloud Architect"
over "Architect"). The time is linear in the text, whatever the table holds: a table of one- and
two-letter titles once made a 64 KB question take 39 s. The candidates considered are capped too.
"""

from __future__ import annotations

import re

_WORD_RE = re.compile(r"\w+")
MAX_TITLE_WORDS = 16  # a title of more words is never matched (a sentence in a title column)
MAX_CANDIDATES = 2_000  # title occurrences considered in one text


def _is_word(ch: str) -> bool:
    return bool(_WORD_RE.match(ch))


class TitleIndex(dict):
    """{lower-case title: [rows]} with the trie that finds titles in text."""

    def __init__(self, rows_by_title: dict[str, list[dict]] | None = None):
        super().__init__(rows_by_title or {})
        self._trie: dict = {}
        for title in self:
            words = _WORD_RE.findall(title)
            if not words or len(words) > MAX_TITLE_WORDS:
                continue
            node = self._trie
            for word in words:
                node = node.setdefault(word, {})
            # where the title's first word starts inside it ("(ISC)2 Auditor" starts with punctuation)
            node.setdefault(None, []).append((title, _WORD_RE.search(title).start()))

    def mentioned(self, text: str) -> list[tuple[int, int, str]]:
        """(start, end, title) of the titles `text` names, whole words, in order of position."""
        lowered = text.lower()
        words = [(m.start(), m.group()) for m in _WORD_RE.finditer(lowered)]
        candidates: list[
            tuple[int, int, int, int, str]
        ] = []  # (-length, start, first word, last word, title)
        for i, (start, word) in enumerate(words):
            node = self._trie.get(word)
            j = i
            while node is not None and len(candidates) < MAX_CANDIDATES:
                for title, offset in node.get(None, ()):
                    begin, end = start - offset, start - offset + len(title)
                    if (
                        begin >= 0
                        and lowered.startswith(title, begin)
                        and (begin == 0 or not _is_word(lowered[begin - 1]))
                        and (end == len(lowered) or not _is_word(lowered[end]))
                    ):
                        candidates.append((-len(title), begin, i, j, title))
                j += 1
                node = node.get(words[j][1]) if j < len(words) and j - i < MAX_TITLE_WORDS else None
            if len(candidates) >= MAX_CANDIDATES:
                break
        taken = bytearray(len(words))
        found = []
        for _, begin, first, last, title in sorted(candidates):  # longest first, then leftmost
            if not any(taken[first : last + 1]):
                taken[first : last + 1] = b"\x01" * (last + 1 - first)
                found.append((begin, begin + len(title), title))
        return sorted(found)
