-- How far the parent has acknowledged each of this node's upward streams.
CREATE TABLE uplink_ack (
    stream INTEGER PRIMARY KEY NOT NULL,
    seq    INTEGER NOT NULL
);
