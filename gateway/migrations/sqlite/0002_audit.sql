-- Audit records of this node's subtree. `fwd_seq` is the record's position in this node's upward audit stream;
-- (node_code, seq) is its position in the chain of the node that wrote it.
CREATE TABLE audit_log (
    fwd_seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    node_code     TEXT NOT NULL,
    seq           INTEGER NOT NULL,
    time_ns       INTEGER NOT NULL,
    operation     INTEGER NOT NULL,
    consumer_uscc TEXT NOT NULL,
    provider_uscc TEXT NOT NULL,
    resource_id   TEXT NOT NULL,
    outcome       TEXT NOT NULL,
    record        BLOB NOT NULL,
    UNIQUE (node_code, seq)
);
CREATE INDEX audit_consumer ON audit_log (consumer_uscc, time_ns);
CREATE INDEX audit_provider ON audit_log (provider_uscc, time_ns);
CREATE INDEX audit_time ON audit_log (time_ns);

-- Public keys of nodes in this subtree, pinned on first sight.
CREATE TABLE node_key (
    node_code  TEXT PRIMARY KEY NOT NULL,
    public_key BLOB NOT NULL
) WITHOUT ROWID;
