"""`builder eval CONFIG`: is this generation good enough to ship, and better than its base?

Measures, for the F16 GGUF and every quant of an export: perplexity on held-out domain text (llama.cpp,
the runtime the appliance uses), and task accuracy on a held-out question set with retrieval and
without, through the appliance's own ingest, hybrid search and answer code in-process (so what is
measured is what the operator will get). With `baseline` (an export of the base model), the base is
measured the same way beside it. Writes `eval.json`; the release gate (largest perplexity increase of
a quant over F16, least accuracy with retrieval, most without, beating the base with retrieval, and,
with `previous` (the eval.json of the release this one replaces), no drop beyond `max_regression` on
the questions both were asked) fails the command with the numbers when it is not met, and
`builder run` keeps failing until it is.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from builder.errors import BuilderError, GateFailed


class GateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_ppl_increase: float | None = Field(
        0.10, ge=0, description="Most a quant's perplexity may exceed F16's, as a fraction (0.10 = 10%)"
    )
    min_accuracy_with_retrieval: float | None = Field(
        None, ge=0, le=1, description="Least share of questions answered exactly with retrieval"
    )
    max_accuracy_without_retrieval: float | None = Field(
        None, ge=0, le=1, description="Most share answered without retrieval (above it, the model memorised)"
    )
    beat_baseline: bool = Field(
        False,
        description="Fail unless the model answers more of the questions with "
        "retrieval than the baseline (the base model) does",
    )
    max_regression: float | None = Field(
        0.05,
        ge=0,
        le=1,
        description="With `previous`: most the share answered exactly with retrieval may fall below the "
        "previous release's, on the questions both were asked (0.05 = 5 points)",
    )
    kind: str | None = Field(None, description="Apply the accuracy limits to questions of this kind only")
    quant: str | None = Field(
        None, description="Apply the limits to this quant only, the one that ships (default: every quant)"
    )


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out: Path = Field(description="Directory for eval.json")
    export: Path = Field(description="An export directory (model-F16.gguf and model-<TYPE>.gguf files)")
    baseline: Path | None = Field(
        None,
        description="An export of the base model, measured the same way beside it "
        "(its own chat template; the quants both exports have)",
    )
    heldout: list[Path] = Field([], description="Held-out domain documents for perplexity")
    ppl_ctx: int = Field(512, ge=32, description="Context length for perplexity")
    ppl_max_tokens: int = Field(16384, ge=64, description="Held-out tokens scored at most")
    questions: Path | None = Field(None, description="JSONL of {id, question, must_contain: [...], kind?}")
    corpus: list[Path] = Field([], description="Documents the retrieval index is built from")
    embedder: Path | None = Field(None, description="Embedder directory (builder embedder export)")
    chat_template: Path | None = Field(
        None, description="The template the generation ships (default: the export's chat_template.jinja)"
    )
    top_k: int = Field(5, ge=1, le=50, description="Sources per question (the appliance's default)")
    shown_sentences: int = Field(
        3,
        ge=0,
        le=50,
        description="Sentences of the sources the model is shown, as the appliance's setting of that name "
        "(its default; 0: whole chunks)",
    )
    abstain_unknown_names: bool = Field(
        True,
        description="Answer 'not covered' without the model when a question names what no document "
        "holds, as the appliance's setting of that name",
    )
    n_ctx: int = Field(2048, ge=256, description="Context window for answers")
    max_tokens: int = Field(96, ge=1, description="Answer length cap")
    task_quants: list[str] | None = Field(
        None, description="Quants that answer the questions (default: all but F16)"
    )
    gate: GateSettings = Field(default_factory=GateSettings, description="Release gate")
    previous: Path | None = Field(
        None,
        description="The release this one replaces: its eval.json, or its generation directory (the next "
        "cycle fails on a regression beyond gate.max_regression)",
    )

    def previous_report(self) -> dict | None:
        if self.previous is None:
            return None
        path = self.previous / "eval.json" if self.previous.is_dir() else self.previous
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BuilderError(
                f"{path}: not a readable eval.json ({type(exc).__name__})",
                "set previous to the last release's eval.json or its generation directory",
            ) from exc
        if not _answered(report):
            raise BuilderError(
                f"{path}: no answered questions (tasks) to compare with",
                "give an eval.json `builder eval` wrote",
            )
        return report

    def inputs(self) -> list[Path]:
        return [
            p
            for p in [
                self.export,
                self.baseline,
                self.previous,
                *self.heldout,
                self.questions,
                *self.corpus,
                self.embedder,
                self.chat_template,
            ]
            if p is not None
        ]


def _answered(report) -> bool:
    """Does this look like an eval.json's answers: tasks -> quant -> answers, each with its question and
    whether it was exact with and without retrieval?"""

    def row(a) -> bool:
        return (
            isinstance(a, dict)
            and isinstance(a.get("question"), str)
            and isinstance(a.get("retrieved_answer_source"), bool)
            and all(
                isinstance(a.get(k), dict) and isinstance(a[k].get("exact"), bool)
                for k in ("with_retrieval", "without_retrieval")
            )
        )

    tasks = report.get("tasks") if isinstance(report, dict) else None
    return isinstance(tasks, dict) and all(
        isinstance(t, dict) and isinstance(t.get("answers"), list) and all(map(row, t["answers"]))
        for t in tasks.values()
    )


def ggufs(export: Path) -> dict[str, Path]:
    found = {p.stem.removeprefix("model-").upper(): p for p in sorted(export.glob("model-*.gguf"))}
    if "F16" not in found:
        raise BuilderError(f"{export}: no model-F16.gguf", "point export at a `builder export` output")
    return found


def template_for(config: EvalConfig, export: Path | None = None) -> str:
    from builder.training import DEFAULT_TEMPLATE

    own = config.chat_template if export is None else None  # a baseline keeps its own template
    for path in (own, (export or config.export) / "chat_template.jinja", DEFAULT_TEMPLATE):
        if path is not None and path.is_file():
            return path.read_text()
    raise BuilderError("no chat template found", "set chat_template in the eval config")


class AnswerLog:
    """The answers an interrupted run of the same eval (same config, same inputs by sha256) already gave,
    in <out>.checkpoints/answers.jsonl beside the stages' own checkpoints: a rerun asks only the rest.
    Removed when the eval's output lands."""

    def __init__(self, out: Path, key: str):
        self.path = out.with_name(out.name + ".checkpoints") / "answers.jsonl"
        self.done: dict[tuple[str, str, str], dict] = {}
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        if lines and _json_line(lines[0]).get("key") == key:
            for line in lines[1:]:
                row = _json_line(line)
                if not {"label", "quant", "question", "answer"} <= set(row):
                    break  # the line the interruption cut short, and anything after it
                self.done[(row["label"], row["quant"], row["question"])] = row["answer"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [self._line(*k, answer) for k, answer in self.done.items()]
        self.path.write_text("".join([json.dumps({"key": key}) + "\n", *kept]))  # every whole line kept

    def get(self, label: str, quant: str, question: str) -> dict | None:
        return self.done.get((label, quant, question))

    def add(self, label: str, quant: str, question: str, answer: dict) -> None:
        self.done[(label, quant, question)] = answer
        with self.path.open("a") as fh:
            fh.write(self._line(label, quant, question, answer))

    @staticmethod
    def _line(label: str, quant: str, question: str, answer: dict) -> str:
        return json.dumps({"label": label, "quant": quant, "question": question, "answer": answer}) + "\n"


def _json_line(line: str) -> dict:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def correct(answer: str, must_contain: list[str]) -> bool:
    text = answer.casefold()
    return all(m.casefold() in text for m in must_contain)


def ask_all(
    model: Path,
    template: str,
    questions: list[dict],
    store,
    embedder,
    config: EvalConfig,
    log: AnswerLog | None = None,
    label: str = "eval",
    quant: str = "",
) -> list[dict]:
    """Each question with retrieval and without; the answers, whether exact, and what was retrieved.
    `log`: answers an interrupted run gave (kept, not asked again) and where each new one is written;
    a line per question on stderr says how far it is."""
    from appliance.engine.llama import LlamaEngine
    from appliance.retrieval import evidence
    from appliance.retrieval.rag import GREEDY, Reading, answer, named_in, search
    from builder.llamacpp import model_metadata

    results = []
    # Never beyond what the model was trained on, as the appliance does.
    n_ctx = min(config.n_ctx, model_metadata(model)["context_length"])
    with LlamaEngine(model, template, n_ctx=n_ctx) as engine:
        info = {"name": model.name}
        kept = [log.get(label, quant, q["question"]) for q in questions] if log else [None] * len(questions)
        if any(kept):
            print(
                f"{label}: {quant} {sum(map(bool, kept))} of {len(questions)} answers kept from an "
                "interrupted run",
                file=sys.stderr,
            )
        for i, (q, row) in enumerate(zip(questions, kept, strict=True), start=1):
            if row is not None:
                results.append(row)
                continue
            start = time.perf_counter()
            hits = search(store, embedder, q["question"], config.top_k)
            unknown = (
                evidence.unknown_terms(q["question"], store.term_document_counts, named_in(hits))
                if config.abstain_unknown_names
                else []
            )
            with_rag = answer(  # read as the appliance reads (appliance.asking.prepare)
                engine,
                q["question"],
                hits,
                info,
                n_ctx=n_ctx,
                max_tokens=config.max_tokens,
                sampling=GREEDY,
                reading=Reading(embedder, config.shown_sentences, unknown=tuple(unknown)),
            )
            without = answer(
                engine,
                q["question"],
                [],
                info,
                n_ctx=n_ctx,
                max_tokens=config.max_tokens,
                sampling=GREEDY,
                use_rag=False,
            )
            row = {
                "id": q.get("id"),
                "kind": q.get("kind"),
                "question": q["question"],
                "must_contain": q["must_contain"],
                "retrieved_answer_source": any(correct(h.text, q["must_contain"]) for h in hits),
                "with_retrieval": {
                    "answer": with_rag.answer,
                    "exact": correct(with_rag.answer, q["must_contain"]),
                    "unverified_codes": with_rag.unverified_codes,
                    "abstained": with_rag.abstained,
                },
                "without_retrieval": {
                    "answer": without.answer,
                    "exact": correct(without.answer, q["must_contain"]),
                },
            }
            results.append(row)
            if log is not None:
                log.add(label, quant, q["question"], row)
            print(
                f"{label}: {quant} question {i}/{len(questions)} "
                f"{'exact' if row['with_retrieval']['exact'] else 'missed'} with retrieval "
                f"({time.perf_counter() - start:.1f} s)",
                file=sys.stderr,
            )
    return results


def accuracy(rows: list[dict], kind: str | None = None) -> dict:
    rows = [r for r in rows if kind is None or r["kind"] == kind]
    if not rows:
        return {"questions": 0}
    return {
        "questions": len(rows),
        "with_retrieval": round(sum(r["with_retrieval"]["exact"] for r in rows) / len(rows), 4),
        "without_retrieval": round(sum(r["without_retrieval"]["exact"] for r in rows) / len(rows), 4),
        "retrieval_found_answer": round(sum(r["retrieved_answer_source"] for r in rows) / len(rows), 4),
    }


def gate_failures(report: dict, gate: GateSettings) -> list[str]:
    failures = []
    ppl = report.get("perplexity", {})
    if gate.max_ppl_increase is not None and "F16" in ppl:
        base = ppl["F16"]["perplexity"]
        for quant, row in ppl.items():
            increase = row["perplexity"] / base - 1
            if gate.quant and quant != gate.quant.upper():
                continue  # the limits are for what ships; the other quants are reported
            if quant != "F16" and increase > gate.max_ppl_increase:
                failures.append(
                    f"{quant} perplexity {row['perplexity']:.3f} is {increase:.1%} above F16's "
                    f"{base:.3f} (limit {gate.max_ppl_increase:.0%})"
                )
    baseline_tasks = (report.get("baseline") or {}).get("tasks", {})
    for quant, task in report.get("tasks", {}).items():
        if gate.quant and quant != gate.quant.upper():
            continue
        acc = _gated(task, gate)
        if not acc.get("questions"):
            if (
                gate.min_accuracy_with_retrieval is not None
                or gate.max_accuracy_without_retrieval is not None
                or gate.beat_baseline
            ):
                failures.append(f"{quant}: no questions of kind {gate.kind!r} to gate on")
            continue
        label = f"{quant}" + (f" on {gate.kind} questions" if gate.kind else "")
        if (
            gate.min_accuracy_with_retrieval is not None
            and acc["with_retrieval"] < gate.min_accuracy_with_retrieval
        ):
            failures.append(
                f"{label}: {acc['with_retrieval']:.0%} exact with retrieval "
                f"(needs >= {gate.min_accuracy_with_retrieval:.0%})"
            )
        if (
            gate.max_accuracy_without_retrieval is not None
            and acc["without_retrieval"] > gate.max_accuracy_without_retrieval
        ):
            failures.append(
                f"{label}: {acc['without_retrieval']:.0%} exact without retrieval "
                f"(allowed <= {gate.max_accuracy_without_retrieval:.0%})"
            )
        if gate.beat_baseline:
            if quant not in baseline_tasks:
                failures.append(f"{label}: the base model was not measured at {quant} (set baseline)")
            elif acc["with_retrieval"] <= (base_acc := _gated(baseline_tasks[quant], gate))["with_retrieval"]:
                failures.append(
                    f"{label}: {acc['with_retrieval']:.0%} exact with retrieval, no better than the "
                    f"base model's {base_acc['with_retrieval']:.0%}"
                )
    return failures + _regressions(report, gate)


def _regressions(report: dict, gate: GateSettings) -> list[str]:
    """The release gate against the previous release (report["previous"], `against_previous`)."""
    failures: list[str] = []
    compared = (report.get("previous") or {}).get("tasks")
    if compared is None or gate.max_regression is None:
        return failures
    quants = [q for q in compared if not gate.quant or q == gate.quant.upper()]
    if not quants:
        return [f"the previous release was not measured at {gate.quant or 'any quant measured now'}"]
    for quant in quants:
        now, before = _gated(compared[quant]["now"], gate), _gated(compared[quant]["previous"], gate)
        label = f"{quant}" + (f" on {gate.kind} questions" if gate.kind else "")
        if not now.get("questions"):
            failures.append(
                f"{label}: none of the previous release's questions was asked again, so no regression "
                "can be ruled out (keep its held-out questions, or compare with another release)"
            )
        elif now["with_retrieval"] < before["with_retrieval"] - gate.max_regression:
            failures.append(
                f"{label}: {now['with_retrieval']:.0%} exact with retrieval on the {now['questions']} "
                f"question{'s' * (now['questions'] != 1)} the previous release was also asked, against its "
                f"{before['with_retrieval']:.0%} "
                f"(allowed drop {gate.max_regression:.0%})"
            )
    return failures


def against_previous(report: dict, previous: dict) -> dict:
    """Each quant measured now and in the previous release: both answers' accuracy on the questions both
    were asked (matched by their text), overall and per kind."""
    table = {}
    for quant, task in report.get("tasks", {}).items():
        before = {a["question"]: a for a in (previous["tasks"].get(quant) or {}).get("answers", [])}
        if not before:
            continue
        now = [a for a in task["answers"] if a["question"] in before]
        then = [before[a["question"]] for a in now]
        kinds = sorted({a["kind"] for a in now if a.get("kind")})
        table[quant] = {
            who: {"overall": accuracy(rows), "by_kind": {k: accuracy(rows, k) for k in kinds}}
            for who, rows in (("now", now), ("previous", then))
        }
    return {"tasks": table}


def _gated(task: dict, gate: GateSettings) -> dict:
    return task["by_kind"].get(gate.kind, {}) if gate.kind else task["overall"]


def comparison(report: dict) -> dict:
    """Base and adapted side by side, per question kind, at each quant both answered at; and the
    held-out perplexity of both (F16)."""
    table = {}
    for quant, base_task in (report.get("baseline") or {}).get("tasks", {}).items():
        ours = report.get("tasks", {}).get(quant)
        if ours is None:
            continue
        pairs = {"all": (base_task["overall"], ours["overall"])}
        pairs |= {
            k: (base_task["by_kind"][k], acc)
            for k, acc in ours["by_kind"].items()
            if k in base_task["by_kind"]
        }
        table[quant] = {
            kind: {
                "questions": mine["questions"],
                **{
                    who: {k: acc.get(k) for k in ("with_retrieval", "without_retrieval")}
                    for who, acc in (("base", theirs), ("adapted", mine))
                },
            }
            for kind, (theirs, mine) in pairs.items()
        }
    perplexity = {
        who: ((src or {}).get("perplexity") or {}).get("F16", {}).get("perplexity")
        for who, src in (("base", report.get("baseline")), ("adapted", report))
    }
    return {"tasks": table, "heldout_perplexity_f16": perplexity}


def measure(
    export: Path,
    config: EvalConfig,
    quants: list[str] | None,
    template: str,
    text: str | None,
    store=None,
    embedder=None,
    label: str = "eval",
    log: AnswerLog | None = None,
) -> dict:
    """Perplexity of every GGUF of an export on `text`, and the questions answered by `quants`
    (default: every quant but F16); `log`: see ask_all."""
    from builder import llamacpp
    from builder.training import read_jsonl

    models = ggufs(export)
    report: dict = {}
    if text is not None:
        report["perplexity"] = {}
        for quant, path in models.items():
            start = time.perf_counter()
            report["perplexity"][quant] = llamacpp.perplexity(
                path, text, ctx=config.ppl_ctx, max_tokens=config.ppl_max_tokens
            )
            print(
                f"{label}: {quant} perplexity {report['perplexity'][quant]['perplexity']:.3f} "
                f"({time.perf_counter() - start:.1f} s)",
                file=sys.stderr,
            )
    if store is not None:
        questions = read_jsonl(config.questions, ("question", "must_contain"))
        report["tasks"] = {}
        for quant in quants or [q for q in models if q != "F16"] or ["F16"]:
            if quant not in models:
                raise BuilderError(
                    f"no model-{quant}.gguf in {export}", f"choose task_quants among {', '.join(models)}"
                )
            start = time.perf_counter()
            rows = ask_all(models[quant], template, questions, store, embedder, config, log, label, quant)
            kinds = sorted({r["kind"] for r in rows if r["kind"]})
            report["tasks"][quant] = {
                "overall": accuracy(rows),
                "by_kind": {k: accuracy(rows, k) for k in kinds},
                "seconds": round(time.perf_counter() - start, 1),
                "answers": rows,
            }
            o = report["tasks"][quant]["overall"]
            print(
                f"{label}: {quant} exact {o['with_retrieval']:.0%} with retrieval, "
                f"{o['without_retrieval']:.0%} without ({len(rows)} questions)",
                file=sys.stderr,
            )
    return report


def run(config: EvalConfig) -> Path:
    from builder import lineage
    from builder.pretrain import read_texts

    ggufs(config.export)
    if config.baseline is not None:
        ggufs(config.baseline)
    previous = config.previous_report()  # refused now, not after an hour of answering
    # what an interrupted run of this same eval answered is kept, not asked again
    log = (
        AnswerLog(config.out, lineage.stage_key("eval", config, lineage.input_hashes(config.inputs())))
        if config.questions
        else None
    )
    if config.questions and (not config.corpus or config.embedder is None):
        raise BuilderError("questions need corpus and embedder for retrieval", "add both to the config")
    with (
        lineage.staged_output("eval", config, config.inputs()) as (out, report),
        contextlib.ExitStack() as stack,
    ):
        text = "\n\n".join(read_texts(config.heldout)) if config.heldout else None
        quants = [q.upper() for q in config.task_quants] if config.task_quants else None
        store = embedder = None
        if config.questions:
            from appliance.retrieval.embed import OnnxEmbedder
            from appliance.retrieval.ingest import ingest
            from appliance.retrieval.store import Store

            embedder = OnnxEmbedder(config.embedder)
            store = stack.enter_context(
                Store(
                    Path(stack.enter_context(tempfile.TemporaryDirectory())) / "index.db", reference=("eval",)
                )
            )  # every table of the eval corpus
            ingest(store, embedder, config.corpus, "eval", max_bytes=200_000_000, chunk_chars=1200)
        report.update(
            measure(config.export, config, quants, template_for(config), text, store, embedder, log=log)
        )
        if config.baseline is not None:
            # The base model the same way: the same text, questions, retrieval, and the quants it has.
            available = set(ggufs(config.baseline))
            asked = [q for q in report.get("tasks", {}) if q in available] or None
            report["baseline"] = {
                "export": str(config.baseline),
                **measure(
                    config.baseline,
                    config,
                    asked,
                    template_for(config, config.baseline),
                    text,
                    store,
                    embedder,
                    label="eval (base)",
                    log=log,
                ),
            }
            report["comparison"] = comparison(report)
        if previous is not None:
            report["previous"] = {"eval": str(config.previous), **against_previous(report, previous)}
            for quant, both in report["previous"]["tasks"].items():
                now, then = both["now"]["overall"], both["previous"]["overall"]
                if now["questions"]:
                    print(
                        f"eval: {quant} against the previous release on {now['questions']} shared "
                        f"questions: {now['with_retrieval']:.0%} exact with retrieval, was "
                        f"{then['with_retrieval']:.0%}",
                        file=sys.stderr,
                    )
        failures = gate_failures(report, config.gate)
        report["gate"] = {"passed": not failures, "failures": failures, **config.gate.model_dump()}
        (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    check_gate(config.out)
    return config.out


def check_gate(out: Path) -> None:
    """Raise GateFailed with the numbers when an eval output did not pass its gate."""
    gate = json.loads((out / "eval.json").read_text())["gate"]
    if not gate["passed"]:
        raise GateFailed(
            "release gate not met:\n  " + "\n  ".join(gate["failures"]),
            f"see {out / 'eval.json'}; improve the model or change the gate deliberately",
        )
