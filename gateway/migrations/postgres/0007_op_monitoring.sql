-- Operational monitoring: what this node saw of each call it handled (timestamps, sizes, peers, outcome), by
-- position; the filtered columns beside the encoded OperationRecord. Kept for `[op_monitoring] retention_days`.
CREATE TABLE op_record (
    pos           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_in_ns BIGINT NOT NULL,
    method        TEXT   NOT NULL,
    resource_id   TEXT   NOT NULL,
    consumer_node TEXT   NOT NULL,
    consumer_uscc TEXT   NOT NULL,
    code          INTEGER NOT NULL,
    record        BYTEA  NOT NULL
);
CREATE INDEX op_record_time ON op_record (request_in_ns);
CREATE INDEX op_record_resource ON op_record (resource_id, pos);
