"""The database's schema, as ordered, named migrations: each is applied once, in order, under the
write lock (appliance.retrieval.store.Store.migrate), and recorded in `_migrations`. Add a new one at the end;
never edit one that has shipped."""

MIGRATIONS: list[tuple[str, str]] = [
    (
        "001_initial",
        """
        CREATE TABLE collections (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created TEXT NOT NULL
        );
        CREATE TABLE documents (
            id INTEGER PRIMARY KEY,
            collection_id INTEGER NOT NULL REFERENCES collections(id),
            source TEXT NOT NULL,
            title TEXT NOT NULL,
            kind TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            ingested TEXT NOT NULL,
            UNIQUE (collection_id, sha256)
        );
        CREATE INDEX documents_source ON documents(collection_id, source);
        CREATE TABLE chunks (
            id INTEGER PRIMARY KEY,
            document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            heading TEXT NOT NULL,
            text TEXT NOT NULL
        );
        CREATE INDEX chunks_document ON chunks(document_id, position);
        CREATE VIRTUAL TABLE chunk_fts USING fts5(
            heading, text, content='', contentless_delete=1, tokenize='unicode61 remove_diacritics 2'
        );
        CREATE TABLE ref_rows (
            id INTEGER PRIMARY KEY,
            document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
            chunk_id INTEGER NOT NULL REFERENCES chunks(id) ON DELETE CASCADE,
            row_index INTEGER NOT NULL,
            code TEXT,
            title TEXT,
            data TEXT NOT NULL
        );
        CREATE INDEX ref_rows_code ON ref_rows(code);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    ),
    (
        "002_fts_vocabulary",
        """
        CREATE VIRTUAL TABLE chunk_fts_terms USING fts5vocab(chunk_fts, 'row');
    """,
    ),
    (
        "003_audit",
        """
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            user TEXT NOT NULL,
            action TEXT NOT NULL,
            model_sha256 TEXT,
            generation INTEGER,
            detail TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            row_hash TEXT NOT NULL
        );
        CREATE INDEX audit_action ON audit(action, user);
    """,
    ),
    (
        "004_conversations",
        """
        CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            started TEXT NOT NULL,
            user TEXT NOT NULL
        );
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content TEXT NOT NULL,
            audit_id INTEGER,
            time TEXT NOT NULL
        );
        CREATE INDEX messages_conversation ON messages(conversation_id, id);
    """,
    ),
    (
        "005_feedback",
        """
        CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            user TEXT NOT NULL,
            answer_audit_id INTEGER NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('good', 'bad', 'correction', 'irrelevant_source',
                                               'missing_source')),
            question TEXT NOT NULL,
            answer TEXT NOT NULL,
            sources TEXT NOT NULL,
            correction TEXT,
            source_n INTEGER,
            chunk TEXT,
            note TEXT,
            model_sha256 TEXT,
            generation INTEGER,
            audit_id INTEGER,
            export_id TEXT
        );
        CREATE INDEX feedback_answer ON feedback(answer_audit_id);
        CREATE INDEX feedback_pending ON feedback(export_id, id);
    """,
    ),
    (
        "006_document_owner",
        """
        ALTER TABLE documents ADD COLUMN owner TEXT;  -- who ingested it; NULL: before owners were kept
        CREATE INDEX documents_owner ON documents(collection_id, source, owner);
    """,
    ),
    (
        "007_audit_signature",
        """
        -- ed25519 signature of row_hash by the appliance's identity key: a row the appliance did not
        -- write (someone with the database but not the key) cannot carry one. NULL in rows before 007.
        ALTER TABLE audit ADD COLUMN signature TEXT;
    """,
    ),
]
