"""The database: migrations, durability settings, and re-embedding when the embedder changes."""

import numpy as np

from appliance.store import Store


def test_migrations_and_durability_pragmas(tmp_path):
    with Store(tmp_path / "a.db") as store:
        assert store.migrations() == ["001_initial"]
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    with Store(tmp_path / "a.db") as store:  # reopening applies nothing twice
        assert store.migrations() == ["001_initial"]


def test_changed_embedder_re_embeds_everything(home):
    from appliance.app import Appliance
    from appliance.config import load_settings

    with Appliance(load_settings(home=home)) as app:
        app.store.ensure_embedder(app.embedder.name, app.embedder.dim, app.embedder.embed)
        from appliance.store import NewChunk

        app.store.add_document("c", "/x", "x", "txt", "0" * 64, 1, [NewChunk(0, "", "alpha beta")],
                               app.embedder.embed(["alpha beta"]))

        def other(texts):
            return np.ones((len(texts), 8), dtype=np.float32) / np.sqrt(8)

        assert app.store.ensure_embedder("other-embedder", 8, other) == 1
        assert app.store.embedder_id() == ("other-embedder", 8)
        assert app.store.vector_search(np.ones(8, dtype=np.float32), 5)[0][0] >= 1
        assert app.store.ensure_embedder("other-embedder", 8, other) == 0  # already matches
        assert app.status()["embedder"]["index"]["matches"] is False
