-- Flow-back subscriptions: the items of each subscription, at the resource's node (side 1, the outbox the
-- shipper sends from) and at the subscriber's node (side 2, what was received), by position.
CREATE TABLE flow_item (
    side   SMALLINT NOT NULL,
    sub_id TEXT COLLATE "C" NOT NULL,
    seq    BIGINT   NOT NULL,
    body   BYTEA    NOT NULL,
    PRIMARY KEY (side, sub_id, seq)
);
-- For a provider without a change feed: the digest of every record of the last full export, by key.
CREATE TABLE flow_snapshot (
    sub_id TEXT COLLATE "C" NOT NULL,
    key    TEXT COLLATE "C" NOT NULL,
    digest BYTEA NOT NULL,
    PRIMARY KEY (sub_id, key)
);
