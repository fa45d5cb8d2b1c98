-- Recovery of what a node lost after forwarding it (restored from a backup, or its last commits lost).
-- `uplink_mark`: where each upward stream stood (the higher of its head and the parent's acknowledgement) and,
-- for the audit stream, the head of the node's own chain, when the first run that has not yet compared its
-- history with the parent's started; written when a node with a parent starts, removed once the parent's cursor
-- shows nothing was lost or the node recovered at Join.
CREATE TABLE uplink_mark (
    stream  INTEGER PRIMARY KEY NOT NULL,
    head    INTEGER NOT NULL,
    own_seq INTEGER NOT NULL
);
-- Records of the node's own chain taken back from its parent, until the recovery stores them in `audit_log`.
CREATE TABLE takeback_audit (
    seq           INTEGER PRIMARY KEY NOT NULL,
    time_ns       INTEGER NOT NULL,
    operation     INTEGER NOT NULL,
    consumer_uscc TEXT NOT NULL,
    provider_uscc TEXT NOT NULL,
    resource_id   TEXT NOT NULL,
    outcome       TEXT NOT NULL,
    record        BLOB NOT NULL
);
-- The node's own catalog entries as its parent holds them, until the recovery applies them.
CREATE TABLE takeback_catalog (
    id        TEXT PRIMARY KEY NOT NULL,
    withdrawn INTEGER NOT NULL,
    entry     BLOB NOT NULL
) WITHOUT ROWID;
