-- The long words of the search index (more characters than FTS5's prefix lists cover), so that a long prefix is
-- looked up as the words starting with it (fedgate_gateway::store::sqlite::catalog). Filled by the node's index
-- build: emptying `catalog_index` makes the node rebuild the index, and this table with it, when it next opens.
CREATE TABLE catalog_words (word TEXT PRIMARY KEY) WITHOUT ROWID;
DELETE FROM catalog_index;
