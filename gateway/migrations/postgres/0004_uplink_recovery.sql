-- Recovery of what a node lost after forwarding it, as SQLite's migration 0008.
CREATE TABLE uplink_mark (
    stream  INTEGER PRIMARY KEY,
    head    BIGINT NOT NULL,
    own_seq BIGINT NOT NULL
);
CREATE TABLE takeback_audit (
    seq           BIGINT PRIMARY KEY,
    time_ns       BIGINT NOT NULL,
    operation     INTEGER NOT NULL,
    consumer_uscc TEXT COLLATE "C" NOT NULL,
    provider_uscc TEXT COLLATE "C" NOT NULL,
    resource_id   TEXT COLLATE "C" NOT NULL,
    outcome       TEXT COLLATE "C" NOT NULL,
    record        BYTEA NOT NULL
);
CREATE TABLE takeback_catalog (
    id        TEXT COLLATE "C" PRIMARY KEY,
    withdrawn BOOLEAN NOT NULL,
    entry     BYTEA NOT NULL
);
