"""`appliance`: the command line. stdout carries data (`--json` on read commands); stderr carries logs
and progress. Errors are translated to exit codes here and nowhere else (see errors.ExitCode)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from appliance import __version__
from appliance.errors import ApplianceError, ExitCode
from appliance.terminal import clean_text

if TYPE_CHECKING:
    from appliance.schemas import AnswerReport


def _echo_json(data) -> None:
    """`data`: JSON, or one of the contract's models (appliance.schemas), printed as its JSON."""
    if hasattr(data, "model_dump"):
        data = data.model_dump(mode="json", by_alias=True)
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _err(message: str) -> None:
    click.echo(message, err=True)


def _named(hit) -> str:
    """A source as an operator should read it: its file name and who added it (an upload's name is only
    what its sender called it: another user's path proves nothing)."""
    owner = getattr(hit, "owner", None)
    return _line(Path(hit.source).name) + (f", added by {_line(owner)}" if owner else "")


def _line(text) -> str:
    """A document-derived string (a file name, a title, an error naming a file) made safe to print on
    one line: no escape sequences or control characters, newlines shown as \\n (a name cannot clear
    the screen or forge a line of its own)."""
    return clean_text(str(text)).replace("\n", "\\n").replace("\t", " ")


def json_option(help: str = "Print JSON."):
    """`--json` (into the `as_json` argument): data on stdout as JSON, for scripts."""
    return click.option("--json", "as_json", is_flag=True, help=help)


class _Progress:
    """Progress of long work on stderr: a rich progress bar when stderr is a terminal; one line per step
    otherwise, so a log (journald, CI) still shows where the work stands. `in_bytes`: done and total
    are bytes, shown in MB."""

    def __init__(self, label: str, in_bytes: bool = False):
        self.label, self.in_bytes = label, in_bytes
        self.bar = self.task = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn(label),
                BarColumn(),
                DownloadColumn() if in_bytes else MofNCompleteColumn(),
                TextColumn("{task.description}"),
                console=Console(stderr=True),
            )

    def __call__(self, item, done: int, total: int | None = None) -> None:
        if total is None:  # (done, total) form
            item, done, total = "", item, done
        if total == 0:
            return
        name = _line(Path(item).name) if item else ""
        if self.bar is not None:
            if self.task is None:
                self.bar.start()
                self.task = self.bar.add_task("", total=total)
            self.bar.update(self.task, completed=done, total=total, description=name[:60])
            if done >= total:
                self.bar.stop()
                self.task = None
        elif self.in_bytes:
            _err(
                f"{self.label} {done / 1e6:.1f}/{total / 1e6:.1f} MB ({100 * done / max(total, 1):.0f}%) {name}"
            )
        elif item:
            _err(f"{self.label} {done}/{total} {name}")


def _app(ctx: click.Context, **settings):
    """The appliance in process; `settings`: given on the command line (None: not given)."""
    from appliance.app import Appliance
    from appliance.config import load_settings

    app = Appliance(load_settings(home=ctx.obj.get("home"), **settings))
    ctx.call_on_close(app.close)
    recovered = app.recover()
    if recovered:
        _err(f"note: {recovered}")
    return app


def _service(ctx: click.Context):
    """A client of the running service for this home, or None (then the command works in-process)."""
    if ctx.obj.get("local"):
        return None
    from appliance.client import running_service

    client = running_service(ctx.obj.get("home"))
    if client is not None:
        ctx.call_on_close(client.close)
    return client


def _backend(ctx: click.Context):
    """The running service for this home (see appliance.client), else the appliance in-process."""
    return _service(ctx) or _app(ctx)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ApplianceError as exc:
            _err(f"error: {exc.message}")
            if exc.fix:
                _err(f"  fix: {exc.fix}")
            ctx.exit(int(exc.exit_code))
        except KeyboardInterrupt:
            _err("\ninterrupted; nothing half-written is kept (each file is ingested in one transaction)")
            ctx.exit(130)
        except PermissionError as exc:  # in-process on a home this user may not read or write
            _err(f"error: {_line(exc.filename or 'the appliance home')}: permission denied")
            _err(
                "  fix: run it as the appliance's user, or through the running service (`appliance serve`), "
                "which needs no access to its home"
            )
            ctx.exit(int(ExitCode.CONFIG))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="appliance")
@click.option(
    "--home",
    type=click.Path(path_type=Path),
    envvar="APPLIANCE_HOME",
    help="Appliance home (default $APPLIANCE_HOME or ~/.local/share/appliance).",
)
@click.option(
    "--local",
    is_flag=True,
    help="Work in-process even when `appliance serve` is running "
    "(ask, search and status use the service otherwise).",
)
@click.pass_context
def cli(ctx: click.Context, home: Path | None, local: bool) -> None:
    """Air-gapped language-model appliance: cited answers from your documents, on CPU, offline.

    \b
    Examples:
      appliance status
      appliance ingest ~/rfps --collection rfps
      appliance search "15-1252.00"
      appliance ask "Which labor category covers database administration?"
      appliance tui                          # the operator UI
      appliance bundle install /media/usb    # a signed update from a USB stick
    """
    ctx.ensure_object(dict)
    ctx.obj["home"] = home
    ctx.obj["local"] = local


@cli.command("install-generation")
@click.argument("directory", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--unsigned", is_flag=True, help="Required: acknowledges that no signature is checked.")
@click.option(
    "--force-unsigned",
    is_flag=True,
    help="On an appliance with a trusted root (which otherwise installs signed bundles only): install "
    "anyway (audited).",
)
@click.pass_context
def install_generation(ctx, directory: Path, unsigned: bool, force_unsigned: bool) -> None:
    """Install a generation directory written by the builder (development path, no signature).

    The directory is checked against its own generation.json (every file's sha256), copied into
    $APPLIANCE_HOME/generations/<n>/, health-checked like a signed bundle (the model answers a canary,
    the chat template renders every prompt shape within its budget, the embedder's dimension) and made
    current with one atomic switch. Refused once `appliance trust init` has provisioned a root, unless
    --force-unsigned.

    \b
    Example:
      appliance install-generation --unsigned build/demo-generation
    """
    if not unsigned:
        raise click.UsageError("this path checks no signature; pass --unsigned to confirm that you mean it")
    app = _app(ctx)
    installed = app.install_generation(directory, force=force_unsigned)
    _err(
        f"installed generation {installed.number} ({installed.manifest.model.name}, "
        f"{installed.manifest.model.quant}) into {app.settings.home}"
    )


@cli.group()
def trust() -> None:
    """The root of trust that signed bundles are checked against."""


@trust.command("init")
@click.argument("root_json", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing trusted root (audited).")
@json_option("Print what is now trusted as JSON.")
@click.pass_context
def trust_init(ctx, root_json: Path, force: bool, as_json: bool) -> None:
    """Provision the trusted root (root.json from `builder keys init`), once per appliance.

    The file must be TUF root metadata signed by its own threshold of root keys. Replacing a root
    that is already there needs --force: whoever controls the root decides what the appliance runs.

    \b
    Example:
      appliance trust init /media/keys/root.json
    """
    report = _app(ctx).trust_init(root_json, force)
    if as_json:
        _echo_json(report)
        return
    _err(
        f"trusted root version {report['root_version']} (expires {report['expires'][:10]}); "
        + ", ".join(
            f"{role}: {report['thresholds'][role]} of {len(ids)} keys"
            for role, ids in report["keyids"].items()
        )
        + (" - replaced the previous root" if report["replaced"] else "")
    )


@cli.group("bundle")
def bundle_group() -> None:
    """Verify, install, list and roll back signed update bundles (USB sticks)."""


@bundle_group.command("verify")
@click.argument("directory", type=click.Path(path_type=Path, exists=True, file_okay=False))
@json_option("Print the bundle's description as JSON.")
@click.pass_context
def bundle_verify(ctx, directory: Path, as_json: bool) -> None:
    """Check a bundle completely without installing it: signatures against the trusted root, expiry,
    every file's length and sha256, the generation's manifest and the model's GGUF structure.

    \b
    Example:
      appliance bundle verify /media/usb
    """
    verified = _backend(ctx).verify_bundle(directory, _Progress("verifying", in_bytes=True))
    info = verified.bundle
    if as_json:
        _echo_json(verified.model_dump(mode="json", exclude={"targets"}))
        return
    click.echo(
        f"bundle {info.name} version {info.version}: {verified.files} files, "
        f"{verified.bytes / 1e6:.1f} MB, signatures and hashes OK"
    )
    click.echo(
        f"model {info.model['name']} {info.model['quant']}, embedder {info.embedder['name']} "
        f"({info.embedder['dim']}-d), needs {info.min_ram_mb} MB of memory"
    )
    for note in verified.notes:
        _err(f"note: {note}")


@bundle_group.command("install")
@click.argument("directory", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--allow-downgrade",
    is_flag=True,
    help="Install an older version than the one trusted (audited; never below security_floor).",
)
@json_option("Print the result as JSON.")
@click.pass_context
def bundle_install(ctx, directory: Path, allow_downgrade: bool, as_json: bool) -> None:
    """Verify a signed bundle and install it as the new current generation.

    Every file is checked against the signed metadata while it is copied into staging; the model's
    structure is checked before llama.cpp loads it; the model must answer a canary prompt; local
    documents are re-embedded if the embedder changed. Only then does `current` switch, in one
    atomic step. The previous generation is kept for `appliance bundle rollback`. Installing the
    running version again does nothing. Exits 10 when the bundle is refused, 11 when another
    install is running.

    \b
    Example:
      appliance bundle install /media/usb
    """
    result = _backend(ctx).install_bundle(
        directory,
        allow_downgrade,
        progress=_Progress("installing", in_bytes=True),
        reembed_progress=_Progress("re-embedding"),
    )
    if as_json:
        _echo_json(result.model_dump(mode="json", exclude={"bundle"}))
        return
    if result.generation is None or result.bundle is None:
        _err(result.message)
        return
    _err(
        f"{result.message} ({result.bundle.name}, {result.bundle.model['quant']}); "
        f"health check {result.health.get('seconds', 0):.1f} s"
        + (
            f", re-embedded {result.health['reembedded_chunks']} chunks"
            if result.health.get("reembedded_chunks")
            else ""
        )
        + ("; DOWNGRADE" if result.downgrade else "")
    )
    if note := result.bundle.gate_note():
        _err(f"note: {note}")


@bundle_group.command("rollback")
@click.pass_context
def bundle_rollback(ctx) -> None:
    """Return to the generation that was current before the last install (audited)."""
    left, now = _backend(ctx).rollback()
    _err(f"rolled back from generation {left} to generation {now}")


@bundle_group.command("list")
@json_option()
@click.pass_context
def bundle_list(ctx, as_json: bool) -> None:
    """Installed generations, newest first: version, model, which is current and which is kept for rollback."""
    data = _backend(ctx).generations()
    rows = data.generations
    if as_json:
        _echo_json(data)
        return
    if not rows:
        _err("no generation installed")
    for r in rows:
        mark = "current " if r["current"] else "previous" if r["previous"] else ""
        version = f"v{r['version']}" if r["version"] is not None else "unsigned"
        click.echo(
            f"{r['generation']:>4}  {mark:<8}  {version:<9} {r.get('name') or '-':<28} "
            f"{r.get('quant') or '-':<8} installed {r['installed']}"
        )


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--collection", "-c", default="default", show_default=True, help="Collection to add to.")
@json_option("Print the report as JSON.")
@click.pass_context
def ingest(ctx, paths: tuple[Path, ...], collection: str, as_json: bool) -> None:
    """Add files or directories (recursively): txt, md, pdf, docx, csv, xlsx.

    Unchanged files are skipped by content hash; a file that cannot be read is reported and the rest
    go on. Exits 7 when any file failed.

    \b
    Example:
      appliance ingest proposals/ labor_categories.csv --collection reference
    """
    backend = _service(ctx)
    if backend is not None:  # the service re-embeds when it must; the files are sent to it
        _err(f"ingesting through the service at {backend.path}")
    else:
        backend = _app(ctx)
        if reindexed := backend.ready_index(_Progress("re-embedding")):
            _err(f"re-embedded {reindexed} chunks for embedder {backend.embedder.name}")
    report = backend.ingest(list(paths), collection, progress=_Progress("ingesting"))
    if as_json:
        _echo_json(report.to_json())
    else:
        for item in report.added:
            click.echo(f"added     {_line(item['source'])}  ({item['chunks']} chunks)")
            if item.get("note"):
                _err(
                    f"note: {_line(item['source'])}: {item['note']} (--collection "
                    "reference makes it one; administrators only)"
                )
        for source in report.unchanged:
            click.echo(f"unchanged {_line(source)}")
        for item in report.duplicates:
            click.echo(
                f"duplicate {_line(item['source'])}: the same text as {_line(item['same_as'])}, kept once"
                + (" (its earlier version removed)" if item["removed"] else "")
            )
        for item in report.failed:
            click.echo(f"FAILED    {_line(item['error'])}")
        for item in report.skipped:
            click.echo(f"skipped   {_line(item['source'])}: {_line(item['reason'])}")
    _err(
        f"{len(report.added)} added, {len(report.unchanged)} unchanged, {len(report.duplicates)} duplicates, "
        f"{len(report.failed)} failed, {len(report.skipped)} skipped "
        f"(collection '{collection}')"
    )
    if report.failed:
        ctx.exit(int(ExitCode.INGEST))


@cli.group()
def docs() -> None:
    """List and remove ingested documents."""


@docs.command("list")
@click.option("--collection", "-c", help="Only this collection.")
@json_option()
@click.pass_context
def docs_list(ctx, collection: str | None, as_json: bool) -> None:
    """List documents with their collection, chunk count and sha256."""
    rows = _backend(ctx).documents(collection)
    if as_json:
        _echo_json({"documents": [vars(r) for r in rows]})
        return
    for r in rows:
        click.echo(
            f"{r.id:>5}  {_line(r.collection):<12} {r.chunks:>5} chunks  {r.sha256[:12]}  {_line(r.source)}"
        )


@docs.command("remove")
@click.argument("doc_id", type=int)
@click.pass_context
def docs_remove(ctx, doc_id: int) -> None:
    """Remove a document, its chunks and vectors (ids from `appliance docs list`)."""
    row = _backend(ctx).remove_document(doc_id)
    _err(f"removed document {row.id}: {_line(row.source)}")


@cli.command()
@click.argument("query")
@click.option("-k", "k", default=5, show_default=True, type=click.IntRange(1, 100), help="How many results.")
@click.option("--collection", "-c", help="Only this collection.")
@json_option()
@click.pass_context
def search(ctx, query: str, k: int, collection: str | None, as_json: bool) -> None:
    """Hybrid keyword + vector search; exact codes come first.

    \b
    Examples:
      appliance search "15-1252.00"
      appliance search "cloud migration past performance" -k 10 --json
    """
    hits = _backend(ctx).search(query, k, collection)
    if as_json:
        _echo_json({"results": [h.to_json() for h in hits]})
        return
    if not hits:
        _err("no results")
    for i, h in enumerate(hits, start=1):
        snippet = _line(" ".join(h.text.split())[:160])
        click.echo(
            f"[{i}] {_line(h.title)} ({_named(h)}, chunk {h.position})"
            f"{' exact' if h.exact else ''}\n    {snippet}"
        )


@cli.command()
@click.argument("query")
@click.option("--collection", "-c", help="Only tables in this collection.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000), help="Rows at most.")
@json_option()
@click.pass_context
def lookup(ctx, query: str, collection: str | None, limit: int, as_json: bool) -> None:
    """Look up reference-table rows by exact code, code prefix or title words (no model).

    \b
    Examples:
      appliance lookup 15-1252.00          # that labor category
      appliance lookup 15-12               # every code that begins 15-12
      appliance lookup "database administrator"
    """
    rows = _backend(ctx).lookup(query, collection, limit)
    if as_json:
        _echo_json({"query": query, "rows": rows})
        return
    if not rows:
        _err(f"no reference row matches '{query}'")
        ctx.exit(int(ExitCode.NOT_FOUND))
    for r in rows:
        click.echo(
            f"{_line(r['code'] or '-'):<12} {_line(r['title'] or '-'):<40} {r['match']:<18} "
            f"{_line(Path(r['source']).name)}"
        )


@cli.command()
@click.argument("rfp_file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option(
    "--out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="Markdown file to write."
)
@click.option(
    "--collection", "-c", "collections", multiple=True, help="Retrieve from this collection (repeatable)."
)
@click.option("--docx", "as_docx", is_flag=True, help="Also write a Word document next to --out.")
@click.option("--max-tokens", type=click.IntRange(1, 4096), help="Cap on each response paragraph.")
@json_option("Print the summary as JSON.")
@click.pass_context
def draft(
    ctx,
    rfp_file: Path,
    out: Path,
    collections: tuple[str, ...],
    as_docx: bool,
    max_tokens: int | None,
    as_json: bool,
) -> None:
    """Draft a proposal from an RFP (pdf, docx, md, txt): compliance matrix, cited responses, staffing.

    The RFP is shredded into a compliance matrix: every obligation of the contractor or offeror
    (C.4.2, C.4.2(a), PRS-2, A003, L.5.2 ...; the Government's own are left out), section M's
    evaluation factors and the page limits, each with its section, page and the factor that
    evaluates it. Each obligation gets a cited paragraph; the staffing table's codes and
    qualifications come from the reference tables. Codes the model writes that the tables lack are
    flagged; a requirement left unanswered is a gap; a response that cites nothing, restates its
    requirement or repeats another is marked "needs writing", never "Drafted".

    \b
    Example:
      appliance draft rfp.pdf --out draft.md --collection proposals --collection reference --docx
    """
    from appliance.drafting.draft import write_docx

    progress = _Progress("drafting")
    result = _backend(ctx).draft(
        rfp_file,
        list(collections) or None,
        max_tokens,
        progress=lambda item, i, n: progress(f"requirement {item}" if item else "", i, n),
    )
    out.write_text(result.markdown)
    if as_docx:
        write_docx(result.markdown, out.with_suffix(".docx"), result.format)
    if as_json:
        _echo_json(result.model_dump(mode="json", exclude={"markdown"}))
    _err(f"wrote {out}{' and ' + str(out.with_suffix('.docx')) if as_docx else ''}: {result.summary()}")
    for warning in result.warnings():
        _err(f"warning: {warning}")


def _print_answer(result: AnswerReport, streamed: bool) -> None:
    if not streamed:
        click.echo(clean_text(result.answer))
    if result.sources:
        click.echo("\nSources:")
        cited = {c["n"] for c in result.citations}
        for i, h in enumerate(result.sources, start=1):
            mark = "*" if i in cited else " "
            snippet = _line(" ".join(h.text.split())[:90])
            click.echo(f" {mark}[{i}] {_named(h)}, chunk {h.position}: {snippet}")
    for e in result.evidence:
        click.echo(f"Evidence [{e['n']}]: {_line(e['text'])}")
    if result.abstained:
        _err("(no retrieved passage answers this question; the model was not asked)")
    if result.not_given:
        _err(
            f"warning: the question asks for {' or '.join(result.not_given)} and the answer gives none; "
            "read the evidence"
        )
    if result.unsupported:
        _err(
            "warning: in no source the answer was given (check before relying on them): "
            + ", ".join(_line(u) for u in result.unsupported)
        )
    if result.unknown_citations:
        _err(f"warning: the answer cites sources that do not exist: {result.unknown_citations}")
    if result.unverified_codes:
        _err(
            f"warning: codes in the answer that no source contains (do not rely on them): "
            f"{', '.join(result.unverified_codes)}; check with `appliance search CODE`"
        )
    for c in result.conflicting_codes:
        _err(
            f"warning: {c['code']} contradicts the reference table, which gives {_line(c['title'])} the code "
            f"{c['table_code']} ({_line(Path(c['table_source']).name)})"
        )
    for m in result.miscited_codes:
        _err(
            f"warning: {m['code']} is not in the cited source{'s' if len(m['cited']) > 1 else ''} "
            f"{', '.join(f'[{n}]' for n in m['cited'])}; it is in {', '.join(f'[{n}]' for n in m['found_in'])}"
        )
    t = result.timing
    _err(
        f"(retrieval {t['retrieval_ms']:.0f} ms, reading {t['reading_ms']:.0f} ms, "
        f"first token {t['ttft_ms']:.0f} ms, "
        f"{t['tokens_per_s'] or 0:.1f} tokens/s; audit id {result.audit_id}: "
        f"`appliance feedback add {result.audit_id} --good` or `--correct TEXT`)"
    )


@cli.command()
@click.argument("question", required=False)
@click.option("--collection", "-c", help="Retrieve only from this collection.")
@click.option(
    "--rag/--no-rag",
    "use_rag",
    default=True,
    show_default=True,
    help="Retrieve sources for the answer (--no-rag: answer from the model alone).",
)
@click.option("--max-tokens", type=click.IntRange(1, 4096), help="Cap on generated tokens.")
@click.option("--temperature", type=click.FloatRange(0.0, 2.0), help="Sampling temperature.")
@json_option("Print JSON (no streaming).")
@click.pass_context
def ask(
    ctx,
    question: str | None,
    collection: str | None,
    use_rag: bool,
    max_tokens: int | None,
    temperature: float | None,
    as_json: bool,
) -> None:
    """Answer a question from the documents, citing sources as [n].

    Without QUESTION, reads questions from the terminal until an empty line or Ctrl-D.

    \b
    Examples:
      appliance ask "What is the code for a Database Administrator?"
      appliance ask "Summarise the transition plan" --collection proposals --json
    """
    if question is not None and not question.strip():
        raise click.UsageError("the question is empty; give one, or none for the interactive loop")
    app = _backend(ctx)
    # Kept as a conversation: the interactive loop's follow-ups carry their context, and feedback on
    # any answer finds its text (`appliance feedback add AUDIT_ID ...`).
    conversation = app.new_conversation()

    def one(q: str) -> None:
        if as_json:
            _echo_json(
                app.ask(
                    q,
                    collection=collection,
                    use_rag=use_rag,
                    max_tokens=max_tokens,
                    temperature=temperature,
                    conversation=conversation,
                )
            )
            return
        # Model output is text for a terminal: escape sequences and control characters never pass.
        result = app.ask(
            q,
            collection=collection,
            use_rag=use_rag,
            max_tokens=max_tokens,
            temperature=temperature,
            conversation=conversation,
            on_text=lambda piece: click.echo(clean_text(piece), nl=False),
        )
        click.echo()
        _print_answer(result, streamed=True)

    if question:
        one(question)
        return
    status = app.status()
    _err(
        f"appliance: generation {status.generation}, model {status.model['name']}, "
        f"{sum(c['chunks'] for c in status.collections)} chunks in "
        f"{len(status.collections)} collections. Empty line or Ctrl-D to quit."
    )
    while True:
        try:
            q = click.prompt("\nquestion", default="", show_default=False, err=True)
        except (EOFError, click.Abort):
            break
        if not q.strip():
            break
        one(q)


@cli.command()
@json_option()
@click.pass_context
def status(ctx, as_json: bool) -> None:
    """The installed generation, model, embedder and collections."""
    data = _backend(ctx).status().model_dump(mode="json")
    if as_json:
        _echo_json(data)
        return
    m, e = data["model"], data["embedder"]
    click.echo(f"home        {data['home']}")
    version = f"signed bundle v{data['version']}" if data["version"] is not None else "unsigned"
    click.echo(
        f"generation  {data['generation']}, {version} (installed: {', '.join(map(str, data['generations']))})"
    )
    click.echo(
        f"model       {m['name']} {m['quant']} {m['parameters']:,} parameters, sha256 {m['sha256'][:16]}"
    )
    click.echo(f"embedder    {e['name']} ({e['dim']}-d)")
    if engine := data.get("engine"):  # only through a service whose llama-server generates
        click.echo(
            f"engine      llama-server on {engine['slots']} slots, {engine['busy']} request(s) generating"
            f"{'' if engine['running'] else ', not running (the next answer starts it)'}, "
            f"started {engine['starts']} time(s)"
        )
    key = data.get("appliance_key")
    click.echo(
        f"signing key {key['key_id']} (ed25519; public key: {data['home']}/identity/appliance.pub)"
        if key
        else "signing key none yet (made by `appliance trust init` or the first feedback export)"
    )
    for c in data["collections"] or [{"name": "(none)", "documents": 0, "chunks": 0}]:
        click.echo(f"collection  {c['name']:<14} {c['documents']:>4} documents {c['chunks']:>6} chunks")


@cli.command()
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Unix socket to listen on (default $XDG_RUNTIME_DIR/appliance.sock, else run/appliance.sock "
    "under the home; /run/appliance/api.sock under systemd). Its directory must be writable by "
    "its owner alone [setting socket].",
)
@click.option(
    "--queue",
    "queue_size",
    type=click.IntRange(0, 256),
    help="Requests that may wait for the worker; the next one gets 503 with Retry-After "
    "[setting queue, default 4].",
)
@click.option(
    "--tcp",
    metavar="HOST:PORT",
    help="Also listen on TCP (off by default); every request there needs "
    "a bearer token from --token-file [setting tcp].",
)
@click.option(
    "--token-file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Lines 'NAME TOKEN [admin]' (mode 0600); NAME is recorded as the user in the audit log "
    "[setting token_file].",
)
@click.option(
    "--slots",
    type=click.IntRange(1, 64),
    help="Answers decoded together by the engine server [setting slots, default 4].",
)
@click.pass_context
def serve(
    ctx,
    socket_path: Path | None,
    queue_size: int | None,
    tcp: str | None,
    token_file: Path | None,
    slots: int | None,
) -> None:
    """Serve the OpenAI-compatible API and the appliance routes on a Unix socket.

    The one process that writes the database while it runs; llama.cpp's server, its child, decodes up
    to `slots` answers together (setting engine: auto, server or inprocess), so searches, document
    lists and the audit view never wait behind an answer. Every flag is also a setting (config.yaml,
    APPLIANCE_SOCKET, APPLIANCE_QUEUE, APPLIANCE_TCP, APPLIANCE_TOKEN_FILE, APPLIANCE_SLOTS) for
    systemd's EnvironmentFile; a flag wins over both. The caller's OS user (from the socket's peer credentials) is recorded in the
    audit log.

    \b
    Examples:
      appliance serve
      curl --unix-socket $XDG_RUNTIME_DIR/appliance.sock http://appliance/v1/models
      OpenAI(base_url="http://appliance/v1", api_key="local",
             http_client=httpx.Client(transport=httpx.HTTPTransport(uds=SOCKET)))
    """
    from appliance import service

    # the flags are settings given on the command line: over config.yaml and the environment
    app = _app(ctx, socket=socket_path, queue=queue_size, tcp=tcp, token_file=token_file, slots=slots)
    app.long_lived = True
    settings = app.settings
    path, tcp, token_file = settings.socket_path, settings.tcp, settings.token_file
    address = None
    if tcp:
        host, _, port = tcp.rpartition(":")
        if not host or not port.isdigit():
            raise click.UsageError(f"--tcp {tcp!r}: give HOST:PORT, e.g. 127.0.0.1:8080")
        address = (host.strip("[]"), int(port))
    tokens = service.load_tokens(token_file) if token_file else None
    service.serve(
        app,
        path,
        settings.queue,
        tcp=address,
        tokens=tokens,
        on_ready=lambda: _err(
            f"appliance: serving on {path}"
            + (f" and tcp {tcp} (bearer tokens)" if tcp else "")
            + f" (generation {app.installed.number})"
        ),
    )


@cli.command()
@click.pass_context
def tui(ctx) -> None:
    """The operator UI: chat with cited sources, documents, lookup and drafting, model and bundles,
    audit log (F1: help). Works through the running service when there is one, in-process otherwise.
    The same as `appliance-tui` (or `python -m tui`): the UI is its own program, with the [tui] extra."""
    args = [sys.executable, "-m", "tui"]
    if ctx.obj.get("home"):
        args += ["--home", str(ctx.obj["home"])]
    if ctx.obj.get("local"):
        args.append("--local")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, args)


@cli.group("audit")
def audit_group() -> None:
    """The tamper-evident log of answers, ingests, removals and installs."""


@audit_group.command("list")
@click.option(
    "--action",
    help="Only this action (ask, draft, ingest, remove, install, install_refused, "
    "rollback, trust, recover, export).",
)
@click.option("--user", help="Only this OS user.")
@click.option("--limit", type=click.IntRange(1), default=50, show_default=True, help="Newest rows at most.")
@json_option()
@click.pass_context
def audit_list(ctx, action: str | None, user: str | None, limit: int, as_json: bool) -> None:
    """The newest audit rows, newest first."""
    entries = _backend(ctx).audit_rows(action, user, limit)
    if as_json:
        _echo_json({"rows": entries})
        return
    for e in entries:
        detail = json.dumps(e["detail"], separators=(",", ":"))
        click.echo(
            f"{e['id']:>6}  {e['time']}  {e['user']:<10} {e['action']:<8} gen {e['generation'] or '-'}  "
            f"{e['row_hash'][:12]}  {detail[:80]}"
        )


@audit_group.command("verify")
@click.option(
    "--against",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="An earlier `audit export`: its rows must still be the log's first rows, ending at its head.",
)
@json_option()
@click.pass_context
def audit_verify(ctx, against: Path | None, as_json: bool) -> None:
    """Recompute the hash chain and check it against the signed checkpoints kept outside the database
    (`<home>/audit/checkpoints`): rows cut from the end, a chain rebuilt after an edit and an older copy
    of the database put back are each named. Exit 1 when anything is wrong."""
    lines = against.read_text().splitlines() if against else None
    result = _backend(ctx).audit_verify(lines).model_dump(mode="json")
    if as_json:
        _echo_json(result)
    else:
        if result["first_bad_row"] is not None:
            _err(
                f"audit chain broken at row {result['first_bad_row']} (of {result['rows']} checked): that row or "
                "the one before it was altered, inserted or deleted - compare with the last export"
            )
        for problem in result["problems"] + (result.get("against") or {}).get("problems", []):
            _err(f"audit: {problem}")
        if result["intact"]:
            unanchored = result["rows"] - result["anchored_rows"]
            click.echo(
                f"audit chain intact: {result['rows']} rows, {result['checkpoints']} signed checkpoints, "
                f"head {(result['head'] or '-')[:16]}"
                + (f"; {unanchored} rows after the last checkpoint" if unanchored > 0 else "")
            )
            if against:
                click.echo(
                    f"matches the export {against} ({result['against']['rows']} rows, head "
                    f"{(result['against']['head'] or '-')[:16]})"
                )
    if not result["intact"]:
        ctx.exit(int(ExitCode.FAILURE))


@audit_group.command("export")
@click.option(
    "--out", type=click.Path(path_type=Path, dir_okay=False), required=True, help="JSON lines file."
)
@click.pass_context
def audit_export(ctx, out: Path) -> None:
    """Write every row with its chain, then the signed checkpoints, as JSON lines (checkable by the
    README's short script; `audit verify --against FILE` checks the log against it later)."""
    from appliance.records import audit

    app = _app(ctx)
    n = audit.export(app.store.conn, out, app.checkpoint_lines() or [])
    app.audit("export", {"out": str(out.resolve()), "rows": n}, with_model=False)
    _err(
        f"exported {n} audit rows to {out}; its head: {json.loads(out.read_text().splitlines()[n - 1])['row_hash']}"
        if n
        else f"exported 0 audit rows to {out}"
    )


@cli.group("feedback")
def feedback_group() -> None:
    """Operator feedback on answers, and the signed export that carries it to the builder."""


@feedback_group.command("add")
@click.argument("audit_id", type=int)
@click.option("--good", is_flag=True, help="The answer was right.")
@click.option("--bad", is_flag=True, help="The answer was wrong (say how with --correct).")
@click.option("--correct", "correction", metavar="TEXT", help="What the answer should have been.")
@click.option(
    "--irrelevant", "source", type=click.IntRange(1), metavar="N", help="Source [N] did not belong."
)
@click.option(
    "--missing",
    "chunk_id",
    type=click.IntRange(1),
    metavar="CHUNK_ID",
    help="This chunk should have been found (chunk_id from `appliance search --json`).",
)
@click.option("--note", help="A remark kept with the feedback.")
@click.option("--question", help="Only for answers kept nowhere else: the question, exactly as asked.")
@click.option("--answer", help="Only for answers kept nowhere else: the answer, exactly as returned.")
@json_option("Print the stored feedback as JSON.")
@click.pass_context
def feedback_add(
    ctx,
    audit_id: int,
    good: bool,
    bad: bool,
    correction: str | None,
    source: int | None,
    chunk_id: int | None,
    note: str | None,
    question: str | None,
    answer: str | None,
    as_json: bool,
) -> None:
    """Judge the answer of audit row AUDIT_ID (printed with every answer; `appliance audit list --action ask`).

    Exactly one of --good, --bad, --correct, --irrelevant, --missing. The feedback is tied to the
    answer's audit row (model, generation, sources) and is itself audited.

    \b
    Examples:
      appliance feedback add 42 --correct "The Database Administrator code is 15-1242.00 [1]."
      appliance feedback add 42 --irrelevant 3
      appliance feedback add 42 --missing 117
    """
    chosen = [
        k
        for k, v in (
            ("good", good),
            ("bad", bad),
            ("correction", correction),
            ("irrelevant_source", source),
            ("missing_source", chunk_id),
        )
        if v
    ]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --good, --bad, --correct, --irrelevant, --missing")
    result = _backend(ctx).feedback(
        audit_id,
        chosen[0],
        correction=correction,
        source=source,
        chunk_id=chunk_id,
        note=note,
        question=question,
        answer=answer,
    )
    if as_json:
        _echo_json(result)
        return
    _err(f"feedback {result.id} ({result.kind}) on answer {audit_id} recorded; audit row {result.audit_id}")


@feedback_group.command("list")
@click.option("--pending", is_flag=True, help="Only feedback not exported yet.")
@click.option("--since", metavar="DATE", help="Only feedback from this date (YYYY-MM-DD) on.")
@json_option()
@click.pass_context
def feedback_list(ctx, pending: bool, since: str | None, as_json: bool) -> None:
    """Feedback recorded on this appliance, oldest first, with whether it was exported."""
    rows = _backend(ctx).feedback_items(pending, since)
    if as_json:
        _echo_json({"items": rows})
        return
    if not rows:
        _err("no feedback" + (" pending" if pending else ""))
    for r in rows:
        what = {
            "correction": f"-> {r['correction']}",
            "irrelevant_source": f"source [{r['source_n']}]",
            "missing_source": f"chunk {(r['chunk'] or {}).get('chunk_id')}",
        }.get(r["kind"], "")
        state = "exported" if r["export_id"] else "pending"
        click.echo(
            clean_text(
                f"{r['id']:>5}  {r['time'][:10]}  {r['user']:<10} {r['kind']:<17} answer {r['answer_audit_id']:<5} "
                f"{state:<8}  {r['question'][:40]!r} {what[:60]}"
            )
        )


@feedback_group.command("export")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="New (or empty) directory to write the export to, e.g. on a USB stick.",
)
@click.option(
    "--since",
    metavar="DATE",
    help="Everything from this date (YYYY-MM-DD) on, exported before or not (default: only what is pending).",
)
@json_option("Print the result as JSON.")
@click.pass_context
def feedback_export(ctx, out: Path, since: str | None, as_json: bool) -> None:
    """Write the feedback as datasets for the builder, signed with this appliance's key (audited).

    sft.jsonl (approved and corrected answers), dpo.jsonl (correction chosen, the model's answer
    rejected), retrieval.jsonl (sources judged irrelevant or missing), ratings.jsonl, and a manifest
    with every file's sha256, signed (manifest.sig). Only the questions, answers and the sources
    shown with the judged answers leave; no other document text. The builder checks it with
    `builder feedback import DIR --trust appliance.pub` (the public key: `appliance status`).

    \b
    Example:
      appliance feedback export --out /media/usb/feedback-2026-11
    """
    result = _backend(ctx).feedback_export(out, since)
    if as_json:
        _echo_json(result)
        return
    counts = ", ".join(f"{n} {name.removesuffix('.jsonl')}" for name, n in result.counts.items())
    _err(f"exported {result.items} feedback items to {out} ({counts}); export {result.export_id}")


def main() -> None:
    cli(prog_name="appliance")


if __name__ == "__main__":
    main()
