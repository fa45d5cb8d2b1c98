-- Nodes this node served answers of its entries to, and until when they may cache them: the nodes whose caches
-- a change of the entry must purge.
CREATE TABLE cache_served (
    resource_id   TEXT NOT NULL,
    consumer_node TEXT NOT NULL,
    until_unix    INTEGER NOT NULL,
    PRIMARY KEY (resource_id, consumer_node)
) WITHOUT ROWID;
