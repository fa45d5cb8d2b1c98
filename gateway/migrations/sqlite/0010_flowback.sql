-- Flow-back subscriptions: the items of each subscription, at the resource's node (side 1, the outbox the
-- shipper sends from) and at the subscriber's node (side 2, what was received), by position.
CREATE TABLE flow_item (
    side   INTEGER NOT NULL,
    sub_id TEXT    NOT NULL,
    seq    INTEGER NOT NULL,
    body   BLOB    NOT NULL,
    PRIMARY KEY (side, sub_id, seq)
) WITHOUT ROWID;
-- For a provider without a change feed: the digest of every record of the last full export, by key.
CREATE TABLE flow_snapshot (
    sub_id TEXT NOT NULL,
    key    TEXT NOT NULL,
    digest BLOB NOT NULL,
    PRIMARY KEY (sub_id, key)
) WITHOUT ROWID;
