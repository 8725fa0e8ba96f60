"""The appliance's own reading of the sources: the sentence that supports an answer, figures and names no
source holds, what the model is shown, and abstaining when nothing answers. The retrieval, the embedder
and the store are real (the demo corpus); a scripted generator stands in for the model where a test is
about what happens to its words."""

import json

import test_ask
from click.testing import CliRunner

from appliance.app import Appliance
from appliance.cli import cli
from appliance.config import load_settings
from appliance.retrieval import evidence
from appliance.retrieval.rag import GREEDY, Reading, answer

QUESTION = "How quickly are critical vulnerabilities remediated at DOE?"
FACT = "within 15 days"


class ScriptedGenerator(test_ask.ScriptedGenerator):
    """Stands in for the model only: its reply's {n} is the number of the source holding FACT."""

    def stream(self, messages, max_tokens, sampling):
        blocks = messages[-1]["content"].split("<source n=")[1:]
        n = next((i for i, b in enumerate(blocks, 1) if FACT in b), 1)
        self.reply = self.reply.format(n=n)
        yield from super().stream(messages, max_tokens, sampling)


def ask(app, reply, question=QUESTION, **reading):
    hits = app.hits(question, collection="proposals")
    gen = ScriptedGenerator(reply)
    result = answer(
        gen,
        question,
        hits,
        {"name": "x"},
        n_ctx=4096,
        max_tokens=64,
        sampling=GREEDY,
        reading=Reading(app.embedder, **reading),
    )
    return gen, result


def test_sentences_split_at_ends_not_at_abbreviations_or_initials():
    text = (
        "The U.S. Army paid $4.7 million to Dr. Lee in March 2022. J. Smith led 37 staff!\n"
        "| 15-1252.00 | Software Developer |\nShort."
    )
    assert [text[s:e] for s, e in evidence.split(text)] == [
        "The U.S. Army paid $4.7 million to Dr. Lee in March 2022.",
        "J. Smith led 37 staff!",
        "| 15-1252.00 | Software Developer |",
    ]


def test_figures_and_names_no_source_holds_are_flagged():
    source = "Meridian cut over 212 sites in 14 months for the Office of Grants, led by Dana Whitfield."
    said = "Dana Whitfield [1] cut over 212 sites in 14 months; NASA paid $3,200,000 to Pat Quinn in 2019."
    assert evidence.unsupported(said, [source]) == ["NASA", "$3,200,000", "Pat Quinn", "2019"]
    # a figure written with its separators either way, citations and codes are not flagged
    assert evidence.unsupported("It served 1,250 users [2] under 15-1252.00.", ["1250 users"]) == []
    # a capitalized word that starts a sentence is not a name
    assert evidence.unsupported("Unfortunately, I cannot find that. Each site moved [1].", ["x"]) == []
    # a premise the question brings is not support: no source mentions NASA
    assert evidence.unsupported("The NASA contract ran 3 years.", ["It ran 3 years."]) == ["NASA"]


def test_an_answer_that_restates_the_question_is_flagged(app):
    assert evidence.not_given("How many sites moved?", "The sites were moved [1].") == ["count"]
    assert evidence.not_given("How many sites moved?", "Twelve sites moved [1].") == []
    assert evidence.not_given("Who led it and when?", "It was led well [2].") == ["name", "date"]
    assert evidence.not_given("Summarize the approach.", "We use agile [1].") == []
    assert evidence.not_given("What is the hourly rate?", "It is $145.00 per hour [1].") == []
    assert evidence.not_given("How many hours?", "Forty hours [1].") == []
    assert evidence.not_given("How many sites?", "The documents do not cover this question.") == []
    _, result = ask(app, "Critical vulnerabilities are remediated [{n}] .")
    assert result.not_given == ["duration"] and result.report().not_given == ["duration"]
    _, result = ask(app, "Critical vulnerabilities are remediated within 15 days [{n}] .")
    assert result.not_given == []


def test_answer_names_its_supporting_sentence_and_flags_what_no_source_holds(app):
    gen, result = ask(
        app, "Critical vulnerabilities are remediated within 15 days [{n}] , per Dana Scully in 2031 ."
    )
    assert result.citations, "the scripted answer cites the source holding the fact"
    assert 1 <= len(result.evidence) <= 2, "the appliance's best sentences, whatever the model wrote"
    holding = [e for e in result.evidence if FACT in e.text]
    assert holding, [e.text for e in result.evidence]
    source = result.sources[holding[0].n - 1]
    assert source.text[holding[0].start : holding[0].end] == holding[0].text
    assert result.unsupported == ["Dana Scully", "2031"] and not result.abstained
    report = result.report()
    assert report.evidence[0]["text"] == result.evidence[0].text and report.unsupported == [
        "Dana Scully",
        "2031",
    ]


def test_the_model_can_be_shown_only_the_best_sentences(app):
    whole, _ = ask(app, "ok")
    gen, result = ask(app, "Within 15 days [{n}] .", shown_sentences=2)
    shown = gen.messages[-1]["content"]
    assert len(shown) < len(whole.messages[-1]["content"]) / 2
    assert FACT in shown, "the sentence holding the fact is among the two best"
    assert shown.count("<source n=") == len(result.sources) <= 2
    assert [f'<source n="{i}"' in shown for i in range(1, len(result.sources) + 1)] == [True] * len(
        result.sources
    )
    assert result.citations and FACT in result.sources[result.citations[0]["n"] - 1].text
    assert result.unsupported == []


def test_a_code_question_shows_the_reference_row_whole(app):
    hits = app.hits("What is the code for a Cloud Architect?")
    gen = ScriptedGenerator("15-1241.01 [1] .")
    result = answer(
        gen,
        "What is the code for a Cloud Architect?",
        hits,
        {},
        n_ctx=4096,
        max_tokens=64,
        sampling=GREEDY,
        reading=Reading(app.embedder, shown_sentences=1, abstain_below=0.99),
    )
    assert not result.abstained, "an exact reference row answers; the floor does not apply"
    assert result.sources[0].exact and result.sources[0].text in gen.messages[-1]["content"]
    assert result.unverified_codes == []


def test_a_question_naming_what_no_document_holds_is_answered_by_the_appliance(app):
    counts = app.store.term_document_counts
    assert evidence.named_terms("What was the value of our NASA contract in 2031, per Labor's CO?") == [
        "NASA",
        "Labor",
        "CO",
    ]
    # a sentence's first word, a question typed in capitals, and numbers (limits as often as names) name nothing
    assert evidence.named_terms("Thanks. Could you list what Dana Whitfield led?") == ["Dana", "Whitfield"]
    assert evidence.named_terms("WHAT DID NASA PAY?") == []
    assert evidence.named_terms("Does it exceed 250 hours?") == []
    assert len(evidence.named_terms(" ".join(f"Zq{i:04d}x" for i in range(5000)).replace("0", "a"))) <= 20
    assert evidence.unknown_terms("What did NASA pay in 2097?", counts, []) == ["NASA"]
    # as the index holds words: accents dropped, a plural held by its singular
    assert evidence.index_words("José Müller foo_bar") == ["jose", "muller", "foo", "bar"]
    assert evidence.unknown_terms("Which Proposals name Zero Trust?", counts, []) == []
    assert evidence.unknown_terms("How fast does DOE remediate critical vulnerabilities?", counts, []) == []
    # a term a retrieved source's file name or title holds is held: the RFP whose text says "Request for
    # Proposals" (a question about the USDA RFP was answered "No document mentions RFP")
    usda = "RFP-2025-USDA-application-modernization.md USDA modernization  The page limit is 30."
    none = lambda ws: dict.fromkeys(ws, 0)  # noqa: E731
    assert evidence.unknown_terms("What is the USDA RFP's page limit?", none, [usda]) == []
    assert evidence.unknown_terms("What is the NASA RFP's page limit?", none, [usda]) == ["NASA"]
    assert evidence.unknown_terms("What did USDAX pay?", none, [usda]) == ["USDAX"]  # a whole word only
    # an acronym spelled out in what was retrieved is held
    assert (
        evidence.unknown_terms(
            "What is the SOC's shift pattern?",
            lambda ws: dict.fromkeys(ws, 0),
            ["a security operations center"],
        )
        == []
    )
    result = app.answer("What was the value of our NASA contract?", sampling=GREEDY, max_tokens=16)
    assert result.abstained and result.answer == evidence.not_covered(["NASA"])
    assert "No document mentions NASA." in result.answer
    assert result.citations == [] and result.evidence == [] and result.timing["tokens"] == 0
    # the same question with the check off goes to the model
    with Appliance(app.settings.model_copy(update={"abstain_unknown_names": False})) as other:
        assert not other.answer(
            "What was the value of our NASA contract?", sampling=GREEDY, max_tokens=4
        ).abstained


def test_below_the_floor_the_appliance_answers_itself(app):
    question = "What was the value of our contract?"
    gen, result = ask(app, "It has value [1] .", question, abstain_below=0.99)
    assert gen.messages is None, "the model was not asked"
    assert result.abstained and result.answer == evidence.NOT_COVERED
    assert result.citations == [] and result.evidence == [] and result.unsupported == []
    gen, result = ask(app, "It has value [1] .", question, abstain_below=0.01)
    assert gen.messages is not None and not result.abstained


def test_abstaining_through_the_cli_is_audited(demo_home):
    result = CliRunner().invoke(
        cli, ["--home", str(demo_home), "ask", "What was the value of our NASA contract?", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["abstained"] is True and "No document mentions NASA" in data["answer"]
    with Appliance(load_settings(home=demo_home)) as app:
        row = app.audit_rows(action="ask", limit=1)[0]
    assert row["detail"]["abstained"] is True


def test_a_hostile_source_cannot_make_ranking_unbounded(app):
    flood = "Word. " * 50_000
    ranked = evidence.rank(app.embedder, "anything", [(1, 1, flood)])
    assert len(ranked) == 0, "sentences shorter than a sentence are not evidence"
    flood = "A sentence that is long enough. " * 50_000
    ranked = evidence.rank(app.embedder, "anything", [(1, 1, flood), (2, 2, flood)])
    assert len(ranked) == evidence.MAX_SENTENCES


def test_a_question_is_embedded_once_for_its_search_and_its_evidence(app, monkeypatch):
    """The real embedder: the evidence ranking finds the question's vector where its search left it."""
    embedder = app.embedder
    seen: list[str] = []
    batch = embedder._embed_batch

    def spy(texts):
        seen.extend(texts)
        return batch(texts)

    monkeypatch.setattr(embedder, "_embed_batch", spy)
    question = "What was the value of the SBA loan portal contract?"
    prepared = app.prepare_ask(question, max_tokens=8)
    assert prepared.prep.ranked, "the evidence was ranked"
    assert seen.count(question) == 1, seen[:3]
    assert len(seen) > 1  # its sentences were embedded
