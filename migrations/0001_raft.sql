-- The Raft log, the vote and the newest snapshot of one controller node.
-- Entries are JSON-encoded openraft entries; `idx` is the Raft log index.
CREATE TABLE raft_log (
    idx   INTEGER PRIMARY KEY,
    term  INTEGER NOT NULL,
    entry BLOB    NOT NULL
);

-- Small singletons: `vote`, `committed`, `last_purged` (JSON values).
CREATE TABLE raft_meta (
    key   TEXT PRIMARY KEY,
    value BLOB NOT NULL
);

-- Only the newest snapshot is kept: `meta` is the JSON SnapshotMeta, `data` the state machine.
CREATE TABLE raft_snapshot (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    meta BLOB NOT NULL,
    data BLOB NOT NULL
);
