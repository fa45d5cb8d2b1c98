-- Governance documents held by this node: applications and objections about its resources, grants it issued,
-- revocations it has seen. `body` is the encoded protobuf message of the kind.
CREATE TABLE governance_doc (
    kind          TEXT NOT NULL,
    id            TEXT NOT NULL,
    provider_uscc TEXT NOT NULL,
    consumer_uscc TEXT NOT NULL,
    state         INTEGER NOT NULL,
    due_at        INTEGER NOT NULL,
    body          BLOB NOT NULL,
    PRIMARY KEY (kind, id)
) WITHOUT ROWID;
CREATE INDEX governance_provider ON governance_doc (kind, provider_uscc, state);
CREATE INDEX governance_consumer ON governance_doc (kind, consumer_uscc, state);

-- Monotonic counters for ids issued by this node.
CREATE TABLE id_counter (
    name  TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
) WITHOUT ROWID;
