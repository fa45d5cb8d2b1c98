-- Nodes this node served answers of its entries to, and until when they may cache them: the nodes whose caches
-- a change of the entry must purge.
CREATE TABLE cache_served (
    resource_id   TEXT COLLATE "C" NOT NULL,
    consumer_node TEXT COLLATE "C" NOT NULL,
    until_unix    BIGINT NOT NULL,
    PRIMARY KEY (resource_id, consumer_node)
);
