-- The schema of the four SQLite migrations (../sqlite/0001..0004) in one, in PostgreSQL types.
--
-- Every text column uses the "C" collation: SQLite compares and orders text bytewise (BINARY), and lower() in
-- the catalog search folds ASCII letters only; the "C" collation does both the same way whatever the database's
-- default locale is, so `ORDER BY id`, `id > $after` and the word search give the same results on both backends.
-- Integers that come from u64 are stored as BIGINT through the same saturating conversions as in SQLite.

-- Catalog of this node's subtree, upward streams and the cursors of children's streams.
CREATE TABLE catalog (
    id             TEXT COLLATE "C" PRIMARY KEY,
    node_code      TEXT COLLATE "C" NOT NULL,
    provider_uscc  TEXT COLLATE "C" NOT NULL,
    title          TEXT COLLATE "C" NOT NULL,
    summary        TEXT COLLATE "C" NOT NULL,
    classification TEXT COLLATE "C" NOT NULL,
    share_type     INTEGER NOT NULL,
    version        BIGINT NOT NULL,
    withdrawn      BOOLEAN NOT NULL DEFAULT FALSE,
    entry          BYTEA NOT NULL
);
CREATE INDEX catalog_node ON catalog (node_code);
CREATE INDEX catalog_provider ON catalog (provider_uscc);

CREATE TABLE outbox (
    stream  INTEGER NOT NULL,
    seq     BIGINT NOT NULL,
    payload BYTEA NOT NULL,
    PRIMARY KEY (stream, seq)
);

CREATE TABLE stream_cursor (
    child   TEXT COLLATE "C" NOT NULL,
    stream  INTEGER NOT NULL,
    applied BIGINT NOT NULL,
    PRIMARY KEY (child, stream)
);

-- Audit records of this node's subtree. `fwd_seq` is the record's position in this node's upward audit stream;
-- (node_code, seq) is its position in the chain of the node that wrote it.
CREATE TABLE audit_log (
    fwd_seq       BIGINT PRIMARY KEY,
    node_code     TEXT COLLATE "C" NOT NULL,
    seq           BIGINT NOT NULL,
    time_ns       BIGINT NOT NULL,
    operation     INTEGER NOT NULL,
    consumer_uscc TEXT COLLATE "C" NOT NULL,
    provider_uscc TEXT COLLATE "C" NOT NULL,
    resource_id   TEXT COLLATE "C" NOT NULL,
    outcome       TEXT COLLATE "C" NOT NULL,
    record        BYTEA NOT NULL,
    UNIQUE (node_code, seq)
);
CREATE INDEX audit_consumer ON audit_log (consumer_uscc, time_ns);
CREATE INDEX audit_provider ON audit_log (provider_uscc, time_ns);
CREATE INDEX audit_time ON audit_log (time_ns);

-- The last `fwd_seq` ever assigned, as SQLite's AUTOINCREMENT keeps it in sqlite_sequence: positions are never
-- reused after deletions, and, unlike a PostgreSQL sequence, an assignment that rolls back is undone with its
-- transaction, so the upward audit stream stays consecutive (a parent refuses a stream with a gap).
CREATE TABLE audit_position (
    only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
    last     BIGINT NOT NULL
);
INSERT INTO audit_position (only_row, last) VALUES (TRUE, 0);

-- Public keys of nodes in this subtree, pinned on first sight.
CREATE TABLE node_key (
    node_code  TEXT COLLATE "C" PRIMARY KEY,
    public_key BYTEA NOT NULL
);

-- How far the parent has acknowledged each of this node's upward streams.
CREATE TABLE uplink_ack (
    stream INTEGER PRIMARY KEY,
    seq    BIGINT NOT NULL
);

-- Governance documents held by this node: applications and objections about its resources, grants it issued,
-- revocations it has seen. `body` is the encoded protobuf message of the kind.
CREATE TABLE governance_doc (
    kind          TEXT COLLATE "C" NOT NULL,
    id            TEXT COLLATE "C" NOT NULL,
    provider_uscc TEXT COLLATE "C" NOT NULL,
    consumer_uscc TEXT COLLATE "C" NOT NULL,
    state         INTEGER NOT NULL,
    due_at        BIGINT NOT NULL,
    body          BYTEA NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE INDEX governance_provider ON governance_doc (kind, provider_uscc, state);
CREATE INDEX governance_consumer ON governance_doc (kind, consumer_uscc, state);

-- Monotonic counters for ids issued by this node.
CREATE TABLE id_counter (
    name  TEXT COLLATE "C" PRIMARY KEY,
    value BIGINT NOT NULL
);
