-- Catalog of this node's subtree, upward streams and the cursors of children's streams.
CREATE TABLE catalog (
    id            TEXT PRIMARY KEY NOT NULL,
    node_code     TEXT NOT NULL,
    provider_uscc TEXT NOT NULL,
    title         TEXT NOT NULL,
    summary       TEXT NOT NULL,
    classification TEXT NOT NULL,
    share_type    INTEGER NOT NULL,
    version       INTEGER NOT NULL,
    withdrawn     INTEGER NOT NULL DEFAULT 0,
    entry         BLOB NOT NULL
);
CREATE INDEX catalog_node ON catalog (node_code);
CREATE INDEX catalog_provider ON catalog (provider_uscc);

CREATE TABLE outbox (
    stream  INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (stream, seq)
) WITHOUT ROWID;

CREATE TABLE stream_cursor (
    child   TEXT NOT NULL,
    stream  INTEGER NOT NULL,
    applied INTEGER NOT NULL,
    PRIMARY KEY (child, stream)
) WITHOUT ROWID;
