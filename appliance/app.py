"""The appliance as one object: settings, the installed generation, the database, the embedder and the
model, each opened on first use and closed together, and the audit row every change writes. The CLI uses
it in-process; the service and the operator UI hold one for their lifetime.

What it does is done by the modules beside it, whose functions are its methods: appliance.asking
(questions), appliance.intake (documents in, drafts out), appliance.installs (what it runs: bundles,
rollback, trust), appliance.oversight (the audit log and feedback), appliance.health (the check a new
generation passes).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from appliance import asking, installs, intake, oversight
from appliance.bundles import generations
from appliance.bundles.manifest import context_tokens
from appliance.config import Settings
from appliance.errors import ApplianceError
from appliance.protocols import Sampling
from appliance.records import audit
from appliance.retrieval import rag
from appliance.retrieval.store import Store, make_private
from appliance.schemas import DocumentRow, Source, Status


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

    def let_go(self) -> None:
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
            self.let_go()

    def has_generation(self) -> bool:
        try:
            return self.installed is not None
        except ApplianceError:
            return False

    def identity(self):
        """The appliance's signing key (appliance.bundles.identity), created and audited on first need."""
        from appliance.bundles import identity

        if self._identity is None:
            self._identity, created = identity.ensure(self.settings.home)
            if created:
                self.audit(
                    "identity",
                    {"key_id": self._identity.key_id, "public_key": self._identity.public_pem},
                    with_model=self.has_generation(),
                )
        return self._identity

    # -- what the appliance runs (appliance.installs) ----------------------------------------------------
    install_generation = installs.install_generation
    install_bundle = installs.install_bundle
    verify_bundle = installs.verify_bundle
    rollback = installs.rollback
    recover = installs.recover
    trust_init = installs.trust_init
    generations = installs.history

    # -- documents in, drafts out (appliance.intake) -----------------------------------------------------
    ingest = intake.ingest
    ingest_upload = intake.ingest_upload
    clean_uploads = intake.clean_uploads
    remove_document = intake.remove_document
    draft = intake.draft
    draft_upload = intake.draft_upload

    # -- questions (appliance.asking): `answer` is `ask` with the whole record; the service runs the
    # two steps around its engine server ---------------------------------------------------------------
    ask = asking.ask
    answer = asking.answer
    prepare_ask = asking.prepare
    finish_ask = asking.finish

    # -- the audit log and feedback (appliance.oversight) ------------------------------------------------
    audit_rows = oversight.audit_rows
    audit_verify = oversight.audit_verify
    checkpoint_lines = oversight.checkpoint_lines
    feedback = oversight.record_feedback
    feedback_items = oversight.feedback_items
    feedback_export = oversight.feedback_export
    feedback_export_build = oversight.feedback_export_build
    feedback_export_done = oversight.feedback_export_done

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

    def search(self, query: str, k: int | None = None, collection: str | None = None) -> list[Source]:
        return [Source.model_validate(h.to_json()) for h in self.hits(query, k, collection)]

    def hits(self, query: str, k: int | None = None, collection: str | None = None) -> list[rag.Hit]:
        """What `search` finds, as retrieval holds it (with each chunk's heading and document hash)."""
        self.ready_index()
        return rag.search(self.store, self.embedder, query, k or self.settings.top_k, collection)

    def lookup(self, query: str, collection: str | None = None, limit: int = 20) -> list[dict]:
        from appliance.retrieval.lookup import lookup

        return lookup(self.store, query, collection, limit)

    def sampling(self, temperature: float | None = None) -> Sampling:
        """The settings' sampling, at `temperature` when given."""
        return Sampling(self.settings.temperature if temperature is None else temperature)

    def documents(self, collection: str | None = None) -> list[DocumentRow]:
        return self.store.list_documents(collection)

    def new_conversation(self, user: str | None = None) -> int:
        return self.store.new_conversation(user or audit.os_user())

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
                "appliance_key": oversight.key_status(self),
            }
        )
