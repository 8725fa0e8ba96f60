"""The appliance as one object: settings, the installed generation, the database, the embedder and the
model, each opened on first use and closed together. The CLI uses it in-process; the service and the
operator UI will hold one for their lifetime.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from appliance import asking, health
from appliance.bundles import generations
from appliance.bundles.manifest import context_tokens, sha256_file
from appliance.config import Settings
from appliance.errors import ApplianceError, FeedbackError, IngestError
from appliance.protocols import Sampling
from appliance.records import audit
from appliance.retrieval import rag
from appliance.retrieval.ingest import ingest
from appliance.retrieval.store import Store, make_private
from appliance.schemas import (
    AnswerReport,
    AuditVerdict,
    BundleCheck,
    DocumentRow,
    DraftReport,
    ExportWritten,
    FeedbackRecorded,
    Generations,
    IngestReport,
    Installed,
    Source,
    Status,
)


def resident_mb() -> float | None:
    """This process's resident memory (the one holding the model)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


class Appliance:
    def __init__(self, settings: Settings, long_lived: bool = False):
        """`long_lived`: a process that will search many times (service, UI, benchmark) keeps the
        vectors in memory; a one-shot command does not pay to load them."""
        self.settings = settings
        self.long_lived = long_lived
        self._store: Store | None = None
        self._embedder = None
        self._engine = None
        self._installed: generations.Installed | None = None
        self._identity = None
        self._sandboxes: dict = {}
        self.turns = rag.TurnMemory()

    def __enter__(self) -> Appliance:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for sandbox in self._sandboxes.values():
            sandbox.close()
        self._sandboxes.clear()
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._store is not None:
            self._store.close()
            self._store = None

    @property
    def installed(self) -> generations.Installed:
        if self._installed is None:
            self._installed = generations.current(self.settings.home)
        return self._installed

    @property
    def store(self) -> Store:
        if self._store is None:
            # The home holds the database, the identity key, uploads and the engine's socket: its owner's alone.
            self.settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
            repaired = [done for done in [make_private(self.settings.home, 0o700)] if done]
            self._store = Store(
                self.settings.db_path,
                cache_vectors=self.long_lived,
                reference=self.settings.reference_collections,
            )
            for what in repaired + self._store.repaired:  # said once a process, on stderr (journald)
                logging.getLogger("appliance").warning("made private: %s", what)
        return self._store

    @property
    def embedder(self):
        if self._embedder is None:
            from appliance.retrieval.embed import OnnxEmbedder

            self._embedder = OnnxEmbedder(
                self.installed.embedder_path,
                threads=self.settings.embed_threads,
                batch_size=self.settings.embed_batch,
            )
        return self._embedder

    @property
    def engine(self):
        if self._engine is None:
            from appliance.engine.llama import LlamaEngine

            inst = self.installed
            self._engine = LlamaEngine(
                inst.model_path,
                inst.template_path.read_text(),
                n_ctx=self.context_tokens(),
                threads=self.settings.threads,
                name=inst.manifest.model.name,
                mmap=self.settings.mmap,
            )
        return self._engine

    def context_tokens(self) -> int:
        """The context the installed model runs with (manifest.context_tokens)."""
        return context_tokens(self.settings.n_ctx, self.installed.manifest.model)

    def model_info(self) -> dict:
        inst = self.installed
        return {
            "name": inst.manifest.model.name,
            "sha256": inst.manifest.files[inst.manifest.model.file].sha256,
            "quant": inst.manifest.model.quant,
            "generation": inst.number,
        }

    def ready_index(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Re-embed every chunk if the installed embedder differs from the index's; returns how many."""
        return self.store.ensure_embedder(
            self.embedder.name, self.embedder.dim, self.embedder.embed, progress
        )

    def audit(
        self,
        action: str,
        detail: dict,
        with_model: bool = True,
        user: str | None = None,
        model: dict | None = None,
    ) -> dict:
        """`user`: the OS user a request came from (the service knows it from the socket); default: ours.
        Inside a transaction (an ingest's document and its row) the row is anchored by the caller once
        the transaction commits (`anchor`); otherwise at once."""
        info = model or (self.model_info() if with_model else {})  # `model`: the one that did the work
        signer = self.identity()  # first: a key made now is audited before the row it anchors
        row = audit.append(
            self.store.conn,
            action,
            detail,
            model_sha256=info.get("sha256"),
            generation=info.get("generation"),
            user=user,
            signer=signer,
            home=self.settings.home,
        )
        if not self.store.conn.in_transaction:
            audit.checkpoint(self.settings.home, signer, row["id"], row["row_hash"])
        return row

    def audit_ready(self) -> None:
        """StoreError unless work can be audited: the table is there and its head is ours (audit.ready)."""
        audit.ready(self.store.conn, self.identity(), self.settings.home)

    def anchor(self) -> None:
        """A signed checkpoint of the audit log's head (after rows written inside transactions)."""
        if last := audit.head(self.store.conn):
            audit.checkpoint(self.settings.home, self.identity(), last[0], last[1])

    def _let_go(self) -> None:
        """Forget the loaded generation (after an install or rollback switched `current`)."""
        if self._engine is not None:
            self._engine.close()
        self._engine = self._embedder = self._installed = None

    def follow_current(self) -> None:
        """Let go of the loaded generation if `current` was switched by another process (the USB
        import installs through the CLI while the service runs); the next use loads the new one."""
        if self._installed is None:
            return
        link = self.settings.home / "current"
        if link.is_symlink() and Path(os.readlink(link)).name != str(self._installed.number):
            self._let_go()

    def _has_generation(self) -> bool:
        try:
            return self.installed is not None
        except ApplianceError:
            return False

    def install_generation(
        self, directory: Path, force: bool = False, user: str | None = None
    ) -> generations.Installed:
        """The unsigned development install, with the signed install's health check; the model and
        embedder of the old generation are let go. Once a root of trust is provisioned, only signed
        bundles install unless `force` (audited)."""
        from appliance.bundles import trust
        from appliance.errors import BundleError

        if trust.has_trusted_root(self.settings.home):
            if not force:
                self.audit(
                    "install_refused",
                    {
                        "source": str(directory.resolve()),
                        "signed": False,
                        "error": "unsigned install on an appliance with a trusted root",
                    },
                    with_model=self._has_generation(),
                    user=user,
                )
                raise BundleError(
                    "this appliance has a trusted root: it installs signed bundles only",
                    "install the bundle with `appliance bundle install`, or pass --force-unsigned "
                    "(audited) for a development build",
                )
        health_report: dict = {}
        installed = generations.install_unsigned(
            directory,
            self.settings.home,
            check=lambda staged, manifest: health_report.update(health.check(self, staged, manifest)),
        )
        self._let_go()
        self.audit(
            "install",
            {
                "source": str(directory.resolve()),
                "generation": installed.number,
                "signed": False,
                "forced": force,
                "name": installed.manifest.name,
                "health": health_report,
            },
            user=user,
        )
        return installed

    # -- signed bundles (appliance.bundles.bundle) ------------------------------------------------------
    def recover(self) -> str | None:
        """Finish or undo an install that was killed; audited when something was done."""
        from appliance.bundles import commit

        message = commit.recover(self.settings.home)
        if message:
            self._let_go()
            self.audit("recover", {"message": message}, with_model=self._has_generation())
        return message

    def trust_init(self, root_json: Path, force: bool = False) -> dict:
        """Provisioning: the trusted root, and the appliance's own signing key if it has none."""
        from appliance.bundles import trust

        report = trust.trust_init(self.settings.home, root_json, force)
        self.audit("trust", dict(report, source=str(root_json.resolve())), with_model=self._has_generation())
        report["appliance_key_id"] = self.identity().key_id
        return report

    def identity(self):
        """The appliance's signing key (appliance.bundles.identity), created and audited on first need."""
        from appliance.bundles import identity

        if self._identity is None:
            self._identity, created = identity.ensure(self.settings.home)
            if created:
                self.audit(
                    "identity",
                    {"key_id": self._identity.key_id, "public_key": self._identity.public_pem},
                    with_model=self._has_generation(),
                )
        return self._identity

    def verify_bundle(self, directory: Path, progress: Callable | None = None) -> BundleCheck:
        from appliance.bundles import bundle

        return bundle.verify(self.settings.home, directory, progress).report()

    def install_bundle(
        self,
        directory: Path,
        allow_downgrade: bool = False,
        progress: Callable | None = None,
        reembed_progress: Callable | None = None,
        user: str | None = None,
    ) -> Installed:
        """Verify and install a signed bundle (see appliance.bundles.bundle.install); audited either way."""
        from appliance.bundles import bundle

        try:
            result = bundle.install(
                self.settings.home,
                directory,
                lambda staged, m, i: health.check(self, staged, m, reembed_progress),
                allow_downgrade=allow_downgrade,
                security_floor=self.settings.security_floor,
                progress=progress,
            )
        except ApplianceError as exc:
            self.audit(
                "install_refused",
                {"source": str(directory.resolve()), "error": exc.message},
                with_model=self._has_generation(),
                user=user,
            )
            raise
        if result.recovered:  # found under the install lock (the service and UI do not run `recover` first)
            self.audit("recover", {"message": result.recovered}, with_model=self._has_generation(), user=user)
        if result.number is not None:  # a no-op keeps the loaded model
            self._let_go()
            self.audit(
                "install",
                {
                    "source": str(directory.resolve()),
                    "generation": result.number,
                    "signed": True,
                    "version": result.version,
                    "name": result.info.name if result.info else None,
                    "downgrade": result.downgrade,
                    "health": result.health,
                },
                user=user,
            )
        return result.report()

    def rollback(self, user: str | None = None) -> tuple[int, int]:
        from appliance.bundles import bundle

        left, now = bundle.rollback(self.settings.home)
        self._let_go()
        self.audit("rollback", {"from": left, "to": now}, user=user)
        return left, now

    @contextlib.contextmanager
    def sandbox(self, lane: str = "ingest"):
        """Where files are parsed: a long-lived process (the service) keeps a child for each lane
        (uploads, which parse beside the worker, and drafts, which parse on it, never wait for each
        other); a one-shot command starts one for its batch."""
        from appliance.documents.sandbox import Sandbox

        if self.long_lived:
            if lane not in self._sandboxes:
                self._sandboxes[lane] = Sandbox(self.settings.parse_memory_mb, self.settings.parse_timeout_s)
            yield self._sandboxes[lane]
            return
        with Sandbox(self.settings.parse_memory_mb, self.settings.parse_timeout_s) as sandbox:
            yield sandbox

    def ingest(
        self,
        paths: list[Path],
        collection: str,
        progress: Callable[[str, int, int], None] | None = None,
        user: str | None = None,
        source_name: Callable[[Path], str] | None = None,
        admin: bool = True,
        aside: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> IngestReport:
        """`user`'s documents (default: ours); `admin`: may also replace documents from before owners
        were recorded. Each document commits with its audit row, and the head is anchored after it.
        `aside`: held while a file is parsed and embedded (appliance.retrieval.ingest)."""
        owner = user or audit.os_user()
        self.audit_ready()
        try:
            with self.sandbox() as sandbox:
                report = ingest(
                    self.store,
                    self.embedder,
                    paths,
                    collection,
                    max_bytes=int(self.settings.max_file_mb * 1_000_000),
                    chunk_chars=self.settings.chunk_chars,
                    progress=progress,
                    source_name=source_name,
                    owner=owner,
                    admin=admin,
                    sandbox=sandbox,
                    committed=self.anchor,
                    aside=aside,
                    record=lambda action, detail: self.audit(action, detail, user=owner),
                )
        finally:
            self.anchor()
        if report.failed:  # what was refused is on record too, one row a batch
            self.audit(
                "ingest_refused",
                {
                    "collection": collection,
                    "files": len(report.failed),
                    "failed": [
                        {"source": f["source"][:300], "error": f["error"][:300]} for f in report.failed[:50]
                    ],
                },
                with_model=False,
                user=owner,
            )
        return report

    def clean_uploads(self) -> list[str]:
        """Remove upload directories a killed service left in the home (the service calls this at start,
        when no upload of its own can be under way); what was removed."""
        import shutil

        gone = []
        for stale in self.settings.home.glob(".upload-*"):
            shutil.rmtree(stale, ignore_errors=True)
            gone.append(f"removed {stale}")
        return gone

    @contextlib.contextmanager
    def _uploaded(self, name: str, data: bytes):
        """An uploaded file under the home (private, removed afterwards), named like the original so its
        type is recognised."""
        base = Path(name.replace("\\", "/")).name
        if not base or base in (".", "..") or "\0" in base or len(base) > 255:
            raise IngestError(f"upload name {name!r} is not a file name", "send the file's path as `name`")
        with tempfile.TemporaryDirectory(dir=self.settings.home, prefix=".upload-") as tmp:
            path = Path(tmp) / base
            path.write_bytes(data)
            yield path

    def ingest_upload(
        self,
        name: str,
        data: bytes,
        collection: str,
        user: str | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        admin: bool = False,
        aside: Callable[[], contextlib.AbstractContextManager] | None = None,
    ) -> IngestReport:
        """Ingest a file the caller read and sent (the service's upload route), recorded as `name` and
        keyed by its user: one user's upload never replaces another's."""
        with self._uploaded(name, data) as path:
            return self.ingest(
                [path],
                collection,
                progress=progress,
                user=user,
                source_name=lambda _: name,
                admin=admin,
                aside=aside,
            )

    def draft_upload(
        self,
        name: str,
        data: bytes,
        collections: list[str] | None = None,
        max_tokens: int | None = None,
        progress=None,
        user: str | None = None,
        generator=None,
        model_info: dict | None = None,
    ) -> DraftReport:
        with self._uploaded(name, data) as path:
            try:
                return self.draft(
                    path,
                    collections,
                    max_tokens,
                    progress=progress,
                    user=user,
                    source=name,
                    generator=generator,
                    model_info=model_info,
                )
            except (
                ApplianceError
            ) as exc:  # named as the caller knows the file, not by the service's private path
                for private, public in ((str(path), name), (str(path.parent), "(upload)")):
                    exc.message = exc.message.replace(private, public)
                    exc.fix = exc.fix and exc.fix.replace(private, public)
                raise

    # -- feedback (appliance.records.feedback) ---------------------------------------------------------------
    def feedback(
        self,
        answer_audit_id: int,
        kind: str,
        *,
        correction: str | None = None,
        source: int | None = None,
        chunk_id: int | None = None,
        note: str | None = None,
        question: str | None = None,
        answer: str | None = None,
        user: str | None = None,
        admin: bool = True,
    ) -> FeedbackRecorded:
        """Record feedback on an answer (appliance.records.feedback.record), audited; the service audits
        a refusal."""
        from appliance.records import feedback

        return feedback.record(
            self.store,
            answer_audit_id,
            kind,
            correction=correction,
            source=source,
            chunk_id=chunk_id,
            note=note,
            question=question,
            answer=answer,
            user=user,
            admin=admin,
            write_audit=lambda detail: self.audit("feedback", detail, user=user)["id"],
        )

    def feedback_items(
        self, pending_only: bool = False, since: str | None = None, limit: int | None = None
    ) -> list[dict]:
        from appliance.records import feedback

        return [i.to_json() for i in feedback.items(self.store.conn, pending_only, since, limit)]

    def feedback_export_build(self, since: str | None = None):
        """A signed export of the pending feedback (or all since `since`); nothing is marked yet."""
        from appliance.records import feedback

        chosen = feedback.items(self.store.conn, pending_only=since is None, since=since)
        if not chosen:
            raise FeedbackError(
                "no feedback to export" + (f" since {since}" if since else " (all exported already)"),
                "give --since DATE to export earlier feedback again",
            )
        return feedback.build(chosen, self.identity(), since)

    def feedback_export_done(self, export, out: str, user: str | None = None) -> ExportWritten:
        """After the export was written: its items are marked exported and the export is audited."""
        from appliance.records import feedback

        feedback.mark_exported(self.store.conn, export.feedback_ids, export.export_id)
        self.audit(
            "feedback_export",
            {
                "export_id": export.export_id,
                "out": out,
                "counts": export.counts,
                "feedback_ids": export.feedback_ids,
                "manifest_sha256": hashlib.sha256(export.manifest).hexdigest(),
            },
            with_model=False,
            user=user,
        )
        return ExportWritten(
            export_id=export.export_id, out=out, counts=export.counts, items=len(export.feedback_ids)
        )

    def feedback_export(self, out: Path, since: str | None = None, user: str | None = None) -> ExportWritten:
        """Build, write into `out`, then mark and audit: a failed write marks nothing."""
        export = self.feedback_export_build(since)
        export.write(out)
        return self.feedback_export_done(export, str(out.resolve()), user)

    def remove_document(self, doc_id: int, user: str | None = None) -> DocumentRow:
        """Removed with its audit row in one transaction."""
        row = self.store.remove_document(
            doc_id,
            lambda row: self.audit(
                "remove",
                {
                    "doc_id": row.id,
                    "source": row.source,
                    "sha256": row.sha256,
                    "collection": row.collection,
                    "owner": row.owner,
                },
                user=user,
            ),
        )
        self.anchor()
        return row

    def search(self, query: str, k: int | None = None, collection: str | None = None) -> list[Source]:
        return [Source.model_validate(h.to_json()) for h in self.hits(query, k, collection)]

    def hits(self, query: str, k: int | None = None, collection: str | None = None) -> list[rag.Hit]:
        """What `search` finds, as retrieval holds it (with each chunk's heading and document hash)."""
        self.ready_index()
        return rag.search(self.store, self.embedder, query, k or self.settings.top_k, collection)

    def lookup(self, query: str, collection: str | None = None, limit: int = 20) -> list[dict]:
        from appliance.retrieval.lookup import lookup

        return lookup(self.store, query, collection, limit)

    def draft(
        self,
        rfp: Path,
        collections: list[str] | None = None,
        max_tokens: int | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        generator=None,
        user: str | None = None,
        source: str | None = None,
        model_info: dict | None = None,
    ) -> DraftReport:
        """A proposal draft for an RFP file (see appliance.drafting.draft); `generator` replaces the model in tests;
        `source`: what the RFP is recorded as (an upload's name on the caller's side)."""
        from appliance.drafting import draft

        self.audit_ready()
        self.ready_index()
        generator = generator or self.engine
        model_info = model_info or self.model_info()
        with self.sandbox("draft") as sandbox:  # an RFP is as untrusted as any upload
            result = draft.draft(
                self.store,
                self.embedder,
                generator,
                rfp,
                collections=collections,
                model_info=model_info,
                max_bytes=int(self.settings.max_file_mb * 1_000_000),
                n_ctx=getattr(generator, "n_ctx", None) or self.context_tokens(),
                max_tokens=max_tokens or self.settings.max_tokens,
                sampling=self.sampling(),
                progress=progress,
                source=source,
                sandbox=sandbox,
            )
        self.audit(
            "draft",
            {
                "rfp": result.rfp,
                "rfp_sha256": sha256_file(rfp),
                "requirements": len(result.requirements),
                "gaps": result.gaps,
                "unknown_codes": result.unknown_codes,
                "chunks": [
                    {"chunk_id": s["chunk_id"], "doc_sha256": s["doc_sha256"]} for s in result.sources
                ],
            },
            user=user,
            model=model_info,
        )
        return result.report()

    def ask(
        self,
        question: str,
        *,
        collection: str | None = None,
        use_rag: bool = True,
        max_tokens: int | None = None,
        temperature: float | None = None,
        on_text: Callable[[str], None] | None = None,
        history: list[dict] | None = None,
        should_stop: Callable[[], bool] | None = None,
        user: str | None = None,
        conversation: int | None = None,
        sampling: Sampling | None = None,
    ) -> AnswerReport:
        """`conversation`: a stored conversation (the operator UI's); its last turns are the history and
        the question and answer are added to it. `sampling`: all of how the answer is decoded (the API's
        top_p, logit_bias, seed and stop), in place of `temperature`."""
        return self.answer(
            question,
            collection=collection,
            use_rag=use_rag,
            max_tokens=max_tokens,
            temperature=temperature,
            on_text=on_text,
            history=history,
            should_stop=should_stop,
            user=user,
            conversation=conversation,
            sampling=sampling,
        ).report()

    def answer(
        self,
        question: str,
        *,
        collection: str | None = None,
        use_rag: bool = True,
        max_tokens: int | None = None,
        temperature: float | None = None,
        on_text: Callable[[str], None] | None = None,
        history: list[dict] | None = None,
        should_stop: Callable[[], bool] | None = None,
        user: str | None = None,
        conversation: int | None = None,
        sampling: Sampling | None = None,
    ) -> rag.Answer:
        """`ask` with the whole record (the raw text, whether it was stopped, the prompt): `prepare_ask`,
        the model in this process, `finish_ask` (the service runs them apart around its engine server)."""
        job = self.prepare_ask(
            question,
            collection,
            use_rag,
            max_tokens,
            sampling or self.sampling(temperature),
            history=history,
            user=user,
            conversation=conversation,
        )
        return self.finish_ask(job, *rag.decode(self.engine, job.prep, on_text, should_stop))

    def sampling(self, temperature: float | None = None) -> Sampling:
        """The settings' sampling, at `temperature` when given."""
        return Sampling(self.settings.temperature if temperature is None else temperature)

    def prepare_ask(
        self,
        question: str,
        collection: str | None = None,
        use_rag: bool = True,
        max_tokens: int | None = None,
        sampling: Sampling | None = None,
        history: list[dict] | None = None,
        user: str | None = None,
        conversation: int | None = None,
        tokenizer=None,
        model_info: dict | None = None,
    ) -> asking.AskJob:
        """Everything before the model (appliance.asking.prepare)."""
        return asking.prepare(
            self,
            question,
            collection,
            use_rag,
            max_tokens,
            sampling,
            history,
            user,
            conversation,
            tokenizer,
            model_info,
        )

    def finish_ask(
        self, job: asking.AskJob, pieces: list[str], timing: dict, stopped: bool = False
    ) -> rag.Answer:
        """Everything after the model (appliance.asking.finish)."""
        return asking.finish(self, job, pieces, timing, stopped)

    # -- reads the operator UI and the CLI make (appliance.client.ServiceClient has the same methods) --
    def documents(self, collection: str | None = None) -> list[DocumentRow]:
        return self.store.list_documents(collection)

    def generations(self) -> Generations:
        from appliance.bundles import bundle, trust

        return Generations(
            generations=bundle.history(self.settings.home),
            trusted_version=trust.trusted_version(self.settings.home),
        )

    def audit_rows(self, action: str | None = None, user: str | None = None, limit: int = 50) -> list[dict]:
        """Newest first; `detail` parsed."""
        return [
            dict(e, detail=json.loads(e["detail"])) for e in audit.rows(self.store.conn, action, user, limit)
        ]

    def checkpoint_lines(self) -> list[str] | None:
        path = self.settings.home / audit.CHECKPOINTS
        try:
            return path.read_text().splitlines()
        except FileNotFoundError:
            return None

    def audit_verify(self, against: list[str] | None = None) -> AuditVerdict:
        """The chain and every signed checkpoint (audit.verify); `against`: an earlier export's lines,
        whose rows must still be the database's first rows, ending at the head the export names."""
        from appliance.bundles import identity

        ident = identity.load(self.settings.home)
        public = ident.public if ident else None
        entries = list(audit.rows(self.store.conn))
        verdict = audit.verify(entries, self.checkpoint_lines(), public)
        try:
            if ident and not ident.matches_private():
                verdict.problems.insert(
                    0,
                    "identity/appliance.pub is not the public half of identity/appliance.key: "
                    "it was replaced, so nothing it vouches for is proven",
                )
        except (
            OSError,
            ValueError,
            TypeError,
        ):  # the key is not ours to read: the log's record still checks it
            pass
        result = AuditVerdict.model_validate(verdict.to_json())
        if against is not None:
            result.against = audit.compare_export(entries, against, public)
            if result.against["problems"]:
                result.intact = False
        return result

    def new_conversation(self, user: str | None = None) -> int:
        return self.store.new_conversation(user or audit.os_user())

    def _key_status(self) -> dict | None:
        from appliance.bundles import identity

        ident = identity.load(self.settings.home)
        return {"key_id": ident.key_id, "public_key": ident.public_pem} if ident else None

    def status(self) -> Status:
        inst = self.installed
        m = inst.manifest
        name, dim = self.store.embedder_id()
        # An empty index (nothing ingested yet) matches any embedder.
        index_matches = name is None or (name, dim) == (m.embedder.name, m.embedder.dim)
        return Status.model_validate(
            {
                "home": str(self.settings.home),
                "generation": inst.number,
                "version": inst.version,
                "generations": generations.list_generations(self.settings.generations_dir),
                "model": {
                    "name": m.model.name,
                    "sha256": m.files[m.model.file].sha256,
                    "quant": m.model.quant,
                    "architecture": m.model.architecture,
                    "parameters": m.model.parameters,
                    "context_length": m.model.context_length,
                    "size": m.files[m.model.file].size,
                },
                "embedder": {
                    "name": m.embedder.name,
                    "dim": m.embedder.dim,
                    "index": {"name": name, "dim": dim, "matches": index_matches},
                },
                "collections": self.store.collection_stats(),
                "lineage": m.lineage,
                "resident_mb": resident_mb(),
                "appliance_key": self._key_status(),
            }
        )
