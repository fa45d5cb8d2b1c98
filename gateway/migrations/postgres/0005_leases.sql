-- Leases that let one replica of a node at a time do a job (such as shipping an upward stream); a lease nobody
-- renewed before `until_at` (the database's clock, so replicas' clocks do not matter) may be taken by anyone.
CREATE TABLE leases (
    name     TEXT COLLATE "C" PRIMARY KEY,
    holder   TEXT NOT NULL,
    until_at TIMESTAMPTZ NOT NULL
);
