-- Leases that let one of several processes sharing a store do a job at a time (such as shipping an upward
-- stream); a lease nobody renewed before `until_ms` (Unix milliseconds) may be taken by anyone.
CREATE TABLE leases (
    name     TEXT PRIMARY KEY,
    holder   TEXT NOT NULL,
    until_ms INTEGER NOT NULL
);
