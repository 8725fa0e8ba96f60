"""Reading documents no model here was trained on: fact questions, multi-part questions, and questions no
document answers, asked through the appliance (retrieval, the prompt, the checks) with greedy decoding.

The material is in bench/reading/<set>/ (docs/ and questions.jsonl). It was written by a helper that saw
neither the code nor the demo corpus; `calibration` is for choosing settings (how many sentences to
show, the answer-kind weight, whether a similarity floor separates anything), `test` only for reporting.

    python -m bench.reading --generation build/demo-generation            # the test set, reported
    python -m bench.reading --generation build/demo-generation --set calibration --calibrate
    python -m bench.reading --generation build/demo-generation --evidence-only   # no model: seconds

Each way of reading is one row: whole chunks as before (top_k 5, the model alone decides to abstain),
whole chunks with the name check (`abstain_unknown_names`), top_k 2, or only the N sentences of the
retrieved chunks the appliance ranks best (`shown_sentences`). Columns:
- facts: the reply holds the fact (any of the key's strings, case-insensitive);
- multi-part: the reply holds every part;
- abstained: of the questions no document answers, replies that say the documents do not cover it;
- refused: of the answerable questions, replies that say so (or the appliance abstained);
- cited right: of the correct replies, those whose citation names a chunk holding the fact;
- wrong / right answers flagged: of the wrong (not abstained) and of the right replies, those the
  appliance marks (`not_given`, `unsupported` or `unverified_codes`): a wrong answer should not look right;
- evidence holds the fact: one of the appliance's own two evidence sentences holds it (whatever the
  model wrote);
- fact in a chunk shown: a chunk the model was shown (whole, or sentences of it) holds it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import frac, row

HERE = Path(__file__).resolve().parent / "reading"
COLLECTION = "heldout"
ABSTAINED_RE = re.compile(
    r"(do(es)? not (cover|know|contain|say|mention|provide|specify|include|state)|"
    r"not (covered|mentioned|specified|stated|provided|given|found|available) in|no information|"
    r"(cannot|can't|could not|couldn't) (find|answer|determine)|don't know|not in the (sources|documents))",
    re.IGNORECASE,
)


@dataclass
class Question:
    question: str
    kind: str  # fact | multi | unanswerable
    answers: list[str]  # any of these (fact); every one (multi); none (unanswerable)
    doc: str | None


def load(name: str) -> tuple[Path, list[Question]]:
    folder = HERE / name
    questions = []
    for line in (folder / "questions.jsonl").read_text().splitlines():
        if line.strip():
            q = json.loads(line)
            questions.append(
                Question(
                    q["question"], q["kind"], q.get("answers_all") or q.get("answers") or [], q.get("doc")
                )
            )
    return folder / "docs", questions


def holds(text: str, answers: list[str], every: bool = False) -> bool:
    low = " ".join(text.lower().split())
    found = [" ".join(a.lower().split()) in low for a in answers]
    return bool(found) and (all(found) if every else any(found))


def home_with(generation: Path, docs: Path, tmp: Path) -> Path:
    """A home with `generation` installed (unsigned, as a development install) and `docs` ingested."""
    from appliance.app import Appliance
    from appliance.bundles.generations import install_unsigned
    from appliance.config import load_settings

    home = tmp / "home"
    install_unsigned(generation, home)
    with Appliance(load_settings(home=home)) as app:
        report = app.ingest(sorted(docs.iterdir()), COLLECTION)
        if report.failed:
            raise SystemExit(f"could not ingest: {report.failed}")
    return home


def base_generation(generation: Path, out: Path, model: str = "smollm2-135m-instruct") -> Path:
    """The base model the demo starts from (models/<model>, fetched into the cache), as a generation
    beside `generation`: the same template and embedder, so the rows differ only in the model."""
    from appliance.bundles.manifest import read_manifest, write_manifest
    from builder.base import fetch, load_manifest

    manifest, path = load_manifest(Path(__file__).resolve().parent.parent / "models" / model / "model.yaml")
    gguf = fetch(manifest, path)
    adapted = read_manifest(generation)
    out.mkdir(parents=True)
    shutil.copy(generation / adapted.chat_template, out / adapted.chat_template)
    shutil.copytree(generation / adapted.embedder.dir, out / adapted.embedder.dir)
    shutil.copy(gguf, out / "model.gguf")
    fields = adapted.model_dump(exclude={"files", "lineage", "format"})
    fields["name"] = f"{model} (base)"
    fields["model"] = dict(fields["model"], name=model, file="model.gguf", quant=gguf.stem.rsplit(".", 1)[-1])
    write_manifest(out, fields)
    return out


def ask_all(home: Path, questions: list[Question], **settings) -> list[dict]:
    """Every question through the appliance with these settings (greedy); one record each."""
    from appliance.app import Appliance
    from appliance.config import load_settings
    from appliance.retrieval.rag import GREEDY

    out = []
    with Appliance(load_settings(home=home, **settings), long_lived=True) as app:
        for q in questions:
            a = app.answer(q.question, collection=COLLECTION, sampling=GREEDY, max_tokens=96)
            cited = {c["n"] for c in a.citations}
            best = (a.evidence or app_ranked(app, a) or [None])[0]
            best = best.score if best else 0.0  # the appliance's own best sentence, ranked once
            out.append(
                {
                    "q": q,
                    "reply": a.answer,
                    "abstained": a.abstained or bool(ABSTAINED_RE.search(a.answer)),
                    "correct": q.kind != "unanswerable" and holds(a.answer, q.answers, q.kind == "multi"),
                    "cited_right": any(holds(a.sources[n - 1].text, q.answers) for n in cited),
                    "evidence_right": any(holds(e.text, q.answers) for e in a.evidence),
                    "retrieved": any(holds(h.text, q.answers) for h in a.sources),
                    "flagged": bool(a.not_given or a.unsupported or a.unverified_codes),
                    "best": best,
                    "seconds": a.timing.get("ttft_ms", 0) / 1000,
                }
            )
    return out


def app_ranked(app, answer) -> list:
    """The best sentence of an answer's sources, as the appliance ranks them (for an answer that
    abstained, which carries no evidence)."""
    from appliance.retrieval import evidence

    shown = [(n, h.chunk_id, h.text) for n, h in enumerate(answer.sources, 1)]
    return evidence.rank(app.embedder, answer.question, shown)[:1]


def evidence_only(home: Path, questions: list[Question], top_k: int = 5) -> dict:
    """The appliance's part alone, without a model: the fact in the retrieved chunks, in the best
    sentence, in the best two; and the best sentence's score of each question (for the floor)."""
    from appliance.app import Appliance
    from appliance.config import load_settings
    from appliance.retrieval import evidence

    out = {"retrieved": 0, "first": 0, "two": 0, "answerable": 0, "scores": []}
    with Appliance(load_settings(home=home), long_lived=True) as app:
        for q in questions:
            hits = app.hits(q.question, k=top_k, collection=COLLECTION)
            ranked = evidence.rank(
                app.embedder, q.question, [(n, h.chunk_id, h.text) for n, h in enumerate(hits, 1)]
            )
            out["scores"].append((q.kind != "unanswerable", ranked[0].score if ranked else 0.0))
            if q.kind == "unanswerable":
                continue
            out["answerable"] += 1
            out["retrieved"] += any(holds(h.text, q.answers) for h in hits)
            out["first"] += bool(ranked) and holds(ranked[0].text, q.answers)
            out["two"] += any(holds(s.text, q.answers) for s in ranked[:2])
    return out


def summary(records: list[dict]) -> dict:
    facts = [r for r in records if r["q"].kind == "fact"]
    multi = [r for r in records if r["q"].kind == "multi"]
    answerable = facts + multi
    none = [r for r in records if r["q"].kind == "unanswerable"]
    correct = [r for r in answerable if r["correct"]]
    wrong = [r for r in answerable if not r["correct"] and not r["abstained"]]
    return {
        "facts": (sum(r["correct"] for r in facts), len(facts)),
        "multi": (sum(r["correct"] for r in multi), len(multi)),
        "abstained": (sum(r["abstained"] for r in none), len(none)),
        "refused": (sum(r["abstained"] for r in answerable), len(answerable)),
        "cited": (sum(r["cited_right"] for r in correct), len(correct)),
        "evidence": (sum(r["evidence_right"] for r in answerable), len(answerable)),
        "retrieved": (sum(r["retrieved"] for r in answerable), len(answerable)),
        "flagged wrong": (sum(r["flagged"] for r in wrong), len(wrong)),
        "flagged right": (sum(r["flagged"] for r in correct), len(correct)),
    }


def floor_from(records: list[dict], refuse_at_most: float = 0.05) -> float:
    """The highest floor on the best sentence's score that refuses at most `refuse_at_most` of the
    answerable questions (abstaining on as many unanswerable ones as that allows)."""
    answerable = sorted(r["best"] for r in records if r["q"].kind != "unanswerable")
    allowed = int(refuse_at_most * len(answerable))
    return round(answerable[allowed] - 0.005, 3) if answerable else 0.0


VARIANTS = (
    ("before: whole chunks (top_k 5), no name check", {"shown_sentences": 0, "abstain_unknown_names": False}),
    ("whole chunks (top_k 5)", {"shown_sentences": 0}),
    ("whole chunks (top_k 2)", {"shown_sentences": 0, "top_k": 2}),
    ("best 2 sentences", {"shown_sentences": 2}),
    ("best 3 sentences", {"shown_sentences": 3}),
)


BASE_VARIANTS = (VARIANTS[0], VARIANTS[4])  # before, and the appliance's default now


def run(
    generation: Path, name: str = "test", calibrate: bool = False, base: bool = False, each: int | None = None
) -> list[str]:
    """The table: `generation` read each way (VARIANTS); with `base`, the base model it was adapted from
    beside it (BASE_VARIANTS); `each`: only that many questions of each kind (the tests)."""
    docs, questions = load(name)
    if each is not None:
        kinds = ("fact", "multi", "unanswerable")
        questions = [q for kind in kinds for q in [x for x in questions if x.kind == kind][:each]]
    lines = [
        f"{len(questions)} questions ({sum(q.kind == 'fact' for q in questions)} facts, "
        f"{sum(q.kind == 'multi' for q in questions)} multi-part, "
        f"{sum(q.kind == 'unanswerable' for q in questions)} that no document answers) on "
        f"{len(list(docs.iterdir()))} documents of bench/reading/{name}, written apart from the code and "
        "never trained on; greedy, 96 tokens at most:",
        "",
        row(
            "model",
            "reading",
            "facts",
            "multi-part",
            "abstained (no answer)",
            "refused (answerable)",
            "cited right",
            "wrong answers flagged",
            "right answers flagged",
            "evidence holds the fact",
            "fact in a chunk shown",
            "s/question",
        ),
        row(*["---"] * 12),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        models = [(read_name(generation), generation, VARIANTS)]
        if base:
            base_gen = base_generation(generation, Path(tmp) / "base-gen")
            models.append((read_name(base_gen), base_gen, BASE_VARIANTS))
        for k, (model, gen, variants) in enumerate(models):
            home = home_with(gen, docs, Path(tmp) / f"m{k}")
            for label, settings in variants:
                start = time.perf_counter()
                records = ask_all(home, questions, **settings)
                s = summary(records)
                lines.append(
                    row(
                        model,
                        label,
                        frac(*s["facts"]),
                        frac(*s["multi"]),
                        frac(*s["abstained"]),
                        frac(*s["refused"]),
                        frac(*s["cited"]),
                        frac(*s["flagged wrong"]),
                        frac(*s["flagged right"]),
                        frac(*s["evidence"]),
                        frac(*s["retrieved"]),
                        f"{(time.perf_counter() - start) / len(records):.1f}",
                    )
                )
                print(lines[-1], file=sys.stderr, flush=True)
                if calibrate and settings == VARIANTS[1][1]:
                    lines += ["", scores_line(records), ""]
                for r in records if "--verbose" in sys.argv else []:
                    print(
                        f"  [{r['q'].kind}] {r['q'].question} -> {r['reply'][:160]!r} "
                        f"{'OK' if r['correct'] else ''}{' ABST' if r['abstained'] else ''} best={r['best']:.3f}",
                        file=sys.stderr,
                    )
    return lines


def read_name(generation: Path) -> str:
    from appliance.bundles.manifest import read_manifest

    m = read_manifest(generation).model
    return f"{m.name} {m.quant}"


def scores_line(records: list[dict]) -> str:
    """Whether a floor on the best sentence's score separates answerable from unanswerable questions."""
    chosen = floor_from(records)
    ans = [r["best"] for r in records if r["q"].kind != "unanswerable"]
    none = [r["best"] for r in records if r["q"].kind == "unanswerable"]
    return (
        f"best sentence score: answerable median {statistics.median(ans):.3f} (min {min(ans):.3f}), "
        f"unanswerable median {statistics.median(none):.3f} (max {max(none):.3f}); "
        f"floor refusing at most 5% of answerable: {chosen} "
        f"(abstains on {sum(b < chosen for b in none)}/{len(none)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--generation", type=Path, required=True, help="a generation directory (builder's output)"
    )
    parser.add_argument("--set", default="test", choices=("test", "calibration"))
    parser.add_argument("--calibrate", action="store_true", help="print the floor these questions give")
    parser.add_argument(
        "--evidence-only", action="store_true", help="the appliance's ranking alone, no model"
    )
    parser.add_argument("--base", action="store_true", help="the base model beside it (models/smollm2-...)")
    parser.add_argument(
        "--record", action="store_true", help="write bench/results/reading.md (the README's table)"
    )
    parser.add_argument("--verbose", action="store_true", help="print every reply")
    args = parser.parse_args()
    if args.evidence_only:
        docs, questions = load(args.set)
        with tempfile.TemporaryDirectory() as tmp:
            r = evidence_only(home_with(args.generation, docs, Path(tmp)), questions)
        n = r["answerable"]
        print(
            f"fact in the top-5 chunks {r['retrieved']}/{n}, in the best sentence {r['first']}/{n}, "
            f"in the best two {r['two']}/{n}"
        )
        yes = sorted(s for a, s in r["scores"] if a)
        no = sorted(s for a, s in r["scores"] if not a)
        print("answerable best scores:", " ".join(f"{s:.3f}" for s in yes))
        print("unanswerable best scores:", " ".join(f"{s:.3f}" for s in no))
        return
    lines = run(args.generation, args.set, args.calibrate, args.base)
    print("\n".join(lines))
    if args.record:
        from bench import report

        command = f"python -m bench.reading --generation {args.generation} --set {args.set}" + (
            " --base" if args.base else ""
        )
        print(f"(written to {report.record('reading', lines, command)})", file=sys.stderr)


if __name__ == "__main__":
    main()
