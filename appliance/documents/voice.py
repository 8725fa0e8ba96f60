"""Who speaks in a document: the only place that tells a solicitation (an RFP, RFQ, PWS ...) from a
proposal answering one, by its voice.

A solicitation tells contractors and offerors what they shall do and what the Government will; a
proposal says what we (or the company) will do, and quotes the solicitation only in passing. The
builder's data preparation sorts a customer's folders with it, and drafting keeps RFPs out of the
evidence for a response: another RFP's requirements are not our past work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

RFP_MARKERS = re.compile(  # what only a solicitation says: a past proposal cites a "statement of work" too
    r"request for (?:proposals?|quotations?)|instructions,? conditions,? and notices|instructions to offerors"
    r"|evaluation factors|basis (?:for|of) award|\bsection [lm]\b|\bofferors? (?:shall|must)\b"
    r"|proposals? (?:are|is|shall be) due|solicitation (?:number|no\.)",
    re.IGNORECASE,
)
BUYER_VOICE = re.compile(
    r"\bthe (?:contractor|offeror|vendor|quoter|bidder|respondent)s? (?:shall|must|should|is required)\b"
    r"|\b(?:offerors|quoters|bidders|respondents|vendors|interested (?:parties|firms|vendors))"
    r" (?:shall|must|should|are|may)\b"
    r"|\bthe government (?:will|intends|anticipates|is seeking|seeks|reserves|may)\b"
    r"|\b(?:proposals|quotes|quotations|bids|responses|questions) (?:are|is|shall be|must be) (?:due|submitted)\b",
    re.IGNORECASE,
)
SELLER_VOICE = re.compile(r"\b(?:we|our|ours|us)\b", re.IGNORECASE)
READ_CHARS = 200_000  # the voice is clear long before this; a huge file is not read whole for it


@dataclass(frozen=True)
class Voice:
    asks: int  # the buyer's phrases, and twice each distinct solicitation marker
    offers: int  # the seller's "we", "our"

    @property
    def solicitation(self) -> bool:
        return self.asks > self.offers


def voice(text: str) -> Voice:
    text = text[:READ_CHARS]
    return Voice(
        asks=len(BUYER_VOICE.findall(text))
        + 2 * len({m.group(0).lower() for m in RFP_MARKERS.finditer(text)}),
        offers=len(SELLER_VOICE.findall(text)),
    )
