"""The database: migrations, durability settings, and re-embedding when the embedder changes."""

import numpy as np

from appliance.retrieval.store import NewChunk, Store


def test_migrations_and_durability_pragmas(tmp_path):
    with Store(tmp_path / "a.db") as store:
        assert store.migrations() == [
            "001_initial",
            "002_fts_vocabulary",
            "003_audit",
            "004_conversations",
            "005_feedback",
            "006_document_owner",
            "007_audit_signature",
        ]
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with Store(tmp_path / "a.db") as store:  # reopening applies nothing twice
        assert store.migrations() == [
            "001_initial",
            "002_fts_vocabulary",
            "003_audit",
            "004_conversations",
            "005_feedback",
            "006_document_owner",
            "007_audit_signature",
        ]


def test_changed_embedder_re_embeds_everything(home):
    from appliance.app import Appliance
    from appliance.config import load_settings

    with Appliance(load_settings(home=home)) as app:
        app.store.ensure_embedder(app.embedder.name, app.embedder.dim, app.embedder.embed)
        from appliance.retrieval.store import NewChunk

        app.store.add_document(
            "c",
            "/x",
            "x",
            "txt",
            "0" * 64,
            1,
            [NewChunk(0, "", "alpha beta")],
            app.embedder.embed(["alpha beta"]),
        )

        def other(texts):
            return np.ones((len(texts), 8), dtype=np.float32) / np.sqrt(8)

        assert app.store.ensure_embedder("other-embedder", 8, other) == 1
        assert app.store.embedder_id() == ("other-embedder", 8)
        assert app.store.vector_search(np.ones(8, dtype=np.float32), 5)[0][0] >= 1
        assert app.store.ensure_embedder("other-embedder", 8, other) == 0  # already matches
        assert app.status().embedder["index"]["matches"] is False


def _filled(path, n=300, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = Store(path)
    store.ensure_embedder("e", dim, lambda t: vectors[: len(t)])
    for d in range(n // 50):
        chunks = [NewChunk(i, "", f"chunk {d} {i}") for i in range(50)]
        store.add_document(
            "odd" if d % 2 else "even",
            f"/d{d}",
            f"d{d}",
            "txt",
            f"{d:064x}",
            1,
            chunks,
            vectors[d * 50 : (d + 1) * 50],
        )
    return store, rng


def test_vector_cache_agrees_with_vec0_and_follows_other_writers(tmp_path):
    store, rng = _filled(tmp_path / "v.db")
    cached = Store(tmp_path / "v.db", cache_vectors=True)
    coll = store.collection_id("odd")
    for _ in range(5):
        q = rng.standard_normal(16).astype(np.float32)
        q /= np.linalg.norm(q)
        for c in (None, coll):
            direct, fast = store.vector_search(q, 10, c), cached.vector_search(q, 10, c)
            assert [i for i, _ in direct] == [i for i, _ in fast]
            assert np.allclose([d for _, d in direct], [d for _, d in fast], atol=1e-5)
    # another connection removes a document: the cache must not keep serving its vectors
    doc = store.list_documents("even")[0]
    first_chunk = store.conn.execute(
        "SELECT min(id) FROM chunks WHERE document_id = ?", (doc.id,)
    ).fetchone()[0]
    vec = np.frombuffer(
        store.conn.execute("SELECT embedding FROM chunk_vectors WHERE rowid = ?", (first_chunk,)).fetchone()[
            0
        ],
        dtype=np.float32,
    )
    assert cached.vector_search(vec, 1)[0][0] == first_chunk
    store.remove_document(doc.id)
    assert cached.vector_search(vec, 1)[0][0] != first_chunk
    store.close()
    cached.close()


def test_common_words_are_dropped_from_the_keyword_query(tmp_path):
    from appliance.retrieval.rag import selective_words

    store, _ = _filled(tmp_path / "v.db")
    # "chunk" is in all 300 chunks, "1" in 55, "49" in 6
    assert store.term_document_counts(["chunk", "1", "49", "nowhere"]) == {
        "chunk": 300,
        "1": 55,
        "49": 6,
        "nowhere": 0,
    }
    assert selective_words(store, ["chunk", "1", "49"], budget=5000) == ["49", "1", "chunk"]  # small: all
    assert selective_words(store, ["chunk", "1", "49"], budget=100) == ["49", "1"]  # rarest first
    assert selective_words(store, ["chunk"], budget=100) == []  # only a common word: vectors alone
    store.remove_document(store.list_documents()[0].id)  # counts follow the data
    assert store.term_document_counts(["chunk"]) == {"chunk": 250}
    store.close()


def test_full_disk_during_ingest_keeps_nothing_half_written(tmp_path):
    import pytest

    from appliance.errors import StoreError

    store, _ = _filled(tmp_path / "v.db", n=50)
    count = "SELECT count(*) FROM chunks"
    before = store.conn.execute(count).fetchone()[0]
    pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
    store.conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is now full
    big = [NewChunk(i, "", "filler text " * 400) for i in range(200)]
    vectors = np.ones((200, 16), dtype=np.float32) / 4
    with pytest.raises(StoreError, match="could not be written.*nothing of /big was kept"):
        store.add_document("even", "/big", "big", "txt", "f" * 64, 1, big, vectors)
    assert store.conn.execute(count).fetchone()[0] == before
    assert [d.source for d in store.list_documents()] == ["/d0"]
    store.close()


def test_two_connections_opening_a_new_database_at_once_migrate_it_once(tmp_path, monkeypatch):
    """The second opener arrives while the first is still migrating: it must wait, not re-apply."""
    import threading
    import time

    from appliance.retrieval import migrations

    slow = (
        "999_slow",
        "CREATE TABLE slow(x); WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
        "WHERE x < 2000000) INSERT INTO slow SELECT x FROM c;",
    )
    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, slow])
    db, errors = tmp_path / "new.db", []

    def open_store():
        try:
            Store(db).close()
        except Exception as exc:  # reported below with the thread's error
            errors.append(exc)

    first = threading.Thread(target=open_store)
    first.start()
    time.sleep(0.1)  # the first connection is inside the slow migration now
    open_store()
    first.join()
    assert errors == []
    with Store(db) as store:
        assert store.migrations()[-1] == "999_slow"
        assert store.conn.execute("SELECT count(*) FROM slow").fetchone()[0] == 2_000_000


def test_the_database_is_its_owners_alone(tmp_path):
    """Created 0600, and an existing one found readable by others (made before this check, or by a
    umask of 0022) is made private, with what was repaired said."""
    import stat

    db = tmp_path / "new.db"
    with Store(db) as store:
        assert store.repaired == []
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in tmp_path.glob("new.db*"))
    old = tmp_path / "old.db"
    with Store(old):
        pass
    old.chmod(0o644)
    with Store(old) as store:
        assert store.repaired == [f"{old}: mode -rw-r--r-- -> -rw-------"]
    assert stat.S_IMODE(old.stat().st_mode) == 0o600
