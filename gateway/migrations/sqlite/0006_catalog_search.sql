-- Catalog positions and the search index. `pos` is fixed when an entry first reaches this node: search results
-- come in its order and pages continue after it. `catalog_fts` holds, under each live entry's position, the
-- tokens the node computed for it (words, CJK unigrams and bigrams, tags of its filters; fedgate_gateway::catalog::search);
-- it is filled by the node, which rebuilds it whenever `catalog_index` does not name its tokenizer's version.
CREATE TABLE catalog_positioned (
    pos           INTEGER PRIMARY KEY,
    id            TEXT NOT NULL UNIQUE,
    node_code     TEXT NOT NULL,
    provider_uscc TEXT NOT NULL,
    share_type    INTEGER NOT NULL,
    version       INTEGER NOT NULL,
    withdrawn     INTEGER NOT NULL DEFAULT 0,
    entry         BLOB NOT NULL
);
INSERT INTO catalog_positioned (id, node_code, provider_uscc, share_type, version, withdrawn, entry)
    SELECT id, node_code, provider_uscc, share_type, version, withdrawn, entry FROM catalog ORDER BY rowid;
DROP TABLE catalog;
ALTER TABLE catalog_positioned RENAME TO catalog;

CREATE VIRTUAL TABLE catalog_fts USING fts5(
    tokens, content = '', contentless_delete = 1, tokenize = 'ascii', prefix = '1 2 3', detail = 'none'
);
CREATE TABLE catalog_index (tokenizer INTEGER NOT NULL);
