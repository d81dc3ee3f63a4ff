//! Persistence of one controller node: the Raft log, the vote and snapshots in SQLite (sqlx),
//! and the in-memory state machine they rebuild.
//!
//! Design (see ARCHITECTURE.md, "Persistence"):
//! - One SQLite database per node, `DATA_DIR/strata.db`, in WAL mode with `synchronous=FULL`, so
//!   a committed transaction is on disk before we acknowledge it; the schema comes from the
//!   sqlx migrations in `migrations/`.
//! - A single writer task owns the only connection that writes. Log appends, truncations,
//!   purges, votes and snapshots are queued to it in the order openraft issues them; it drains
//!   whatever is queued into one transaction (group commit: one fsync for many appends) and
//!   only then reports them persisted (`LogFlushed`), so openraft counts an entry toward the
//!   quorum only once it is durable here.
//! - The log is also kept in memory (from the last purge to the end) so replication and apply
//!   never wait for SQLite; the snapshot policy and purging bound its size.
//! - The state machine lives in memory and is persisted through snapshots ("persistent
//!   snapshot" in openraft's terms: `apply` does not write to disk). On start the newest
//!   snapshot is loaded and openraft re-applies the log after it.
//!
//! openraft's storage-v2 contract that this relies on (openraft 0.9 `RaftLogStorage` docs):
//! entries must be readable when `append` returns and persisted when the callback fires; the
//! vote must be persisted before `save_vote` returns; `truncate` and `purge` must leave no hole.

// openraft's storage traits fix `StorageError` (over 200 bytes) as the error type; boxing it in
// our private helpers would only add conversions back at every trait method.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, EntryPayload, ErrorSubject, ErrorVerb, RaftLogId, RaftLogReader, RaftSnapshotBuilder,
    StorageIOError,
};
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{ConnectOptions, Row, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use crate::raft_types::{
    Entry, LogId, NodeId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig, Vote,
};
use crate::state::{CommandResult, Request, State};

/// The file name of the node database inside the data dir.
pub const DATABASE_FILE: &str = "strata.db";

/// Failures opening the store; once running, errors surface as openraft `StorageError`s.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("open database {path}: {source}")]
    Open { path: String, source: sqlx::Error },
    #[error("run migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("load {what}: {source}")]
    Load {
        what: &'static str,
        source: sqlx::Error,
    },
    #[error("decode {what}: {source}")]
    Decode {
        what: &'static str,
        source: serde_json::Error,
    },
}

/// Opens (creating if needed) the node database under `data_dir` and starts its writer task.
/// The writer stops when every store handle has been dropped.
pub async fn open(data_dir: &Path) -> Result<(LogStore, StateMachineStore), StoreError> {
    let path = data_dir.join(DATABASE_FILE);
    // The database holds every secret the cluster keeps (node credential digests) and all of
    // its state: its owner's alone. SQLite gives its -wal and -shm files the database file's
    // mode, so creating it 0600 first covers them too.
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let private = || -> std::io::Result<()> {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(&path)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        };
        private().map_err(|source| StoreError::Open {
            path: path.display().to_string(),
            source: sqlx::Error::Io(source),
        })?;
    }
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // FULL: the WAL is fsynced at every commit, so an acknowledged write survives not only
        // kill -9 but also power loss.
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(std::time::Duration::from_secs(10))
        .disable_statement_logging();
    let mut connection = options.connect().await.map_err(|source| StoreError::Open {
        path: path.display().to_string(),
        source,
    })?;
    // `run_direct` rather than `run`: the latter's `Acquire` bound makes the future not `Send`
    // in generic contexts (openraft's test suite builds stores inside such a context).
    sqlx::migrate!("../migrations")
        .run_direct(&mut connection)
        .await?;

    let loaded = load(&mut connection).await?;
    let (writer, queue) = mpsc::unbounded_channel();
    tokio::spawn(run_writer(connection, queue));

    let log = LogStore {
        shared: Arc::new(LogShared {
            cache: Mutex::new(LogCache {
                entries: loaded.entries,
                last_purged: loaded.last_purged,
                vote: loaded.vote,
                committed: loaded.committed,
            }),
            writer: writer.clone(),
        }),
    };
    let machine = match &loaded.snapshot {
        Some(snapshot) => snapshot.decode_machine()?,
        None => StateMachine::default(),
    };
    let state_machine = StateMachineStore {
        shared: Arc::new(MachineShared {
            machine: RwLock::new(machine),
            snapshot: Mutex::new(loaded.snapshot),
            snapshot_counter: AtomicU64::new(0),
            snapshot_bytes: AtomicU64::new(0),
            snapshot_build_micros: AtomicU64::new(0),
            writer,
            on_applied: OnceLock::new(),
        }),
    };
    Ok((log, state_machine))
}

struct Loaded {
    entries: BTreeMap<u64, Entry>,
    last_purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    snapshot: Option<StoredSnapshot>,
}

async fn load(connection: &mut SqliteConnection) -> Result<Loaded, StoreError> {
    let rows = sqlx::query("SELECT entry FROM raft_log ORDER BY idx")
        .fetch_all(&mut *connection)
        .await
        .map_err(|source| StoreError::Load {
            what: "raft log",
            source,
        })?;
    let mut entries = BTreeMap::new();
    for row in rows {
        let bytes: Vec<u8> = row.get(0);
        let entry: Entry = serde_json::from_slice(&bytes).map_err(|source| StoreError::Decode {
            what: "raft log entry",
            source,
        })?;
        entries.insert(entry.log_id.index, entry);
    }
    let meta_rows = sqlx::query("SELECT key, value FROM raft_meta")
        .fetch_all(&mut *connection)
        .await
        .map_err(|source| StoreError::Load {
            what: "raft meta",
            source,
        })?;
    let mut meta: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for row in meta_rows {
        meta.insert(row.get(0), row.get(1));
    }
    let vote: Option<Vote> = decode_meta(&meta, "vote")?;
    let committed: Option<Option<LogId>> = decode_meta(&meta, "committed")?;
    let last_purged: Option<Option<LogId>> = decode_meta(&meta, "last_purged")?;

    let snapshot = sqlx::query("SELECT meta, data FROM raft_snapshot WHERE id = 1")
        .fetch_optional(&mut *connection)
        .await
        .map_err(|source| StoreError::Load {
            what: "snapshot",
            source,
        })?
        .map(|row| -> Result<StoredSnapshot, StoreError> {
            let meta_bytes: Vec<u8> = row.get(0);
            Ok(StoredSnapshot {
                meta: serde_json::from_slice(&meta_bytes).map_err(|source| StoreError::Decode {
                    what: "snapshot meta",
                    source,
                })?,
                data: row.get(1),
            })
        })
        .transpose()?;
    Ok(Loaded {
        entries,
        last_purged: last_purged.flatten(),
        vote,
        committed: committed.flatten(),
        snapshot,
    })
}

/// One log entry to insert: index, term, JSON of the entry.
type AppendRow = (u64, u64, Vec<u8>);

/// Work for the writer task, in the order openraft issued it.
enum WriteOp {
    Append {
        rows: Vec<AppendRow>,
        callback: LogFlushed<TypeConfig>,
    },
    Truncate {
        from_index: u64,
    },
    Purge {
        upto: LogId,
    },
    Meta {
        key: &'static str,
        value: Vec<u8>,
        done: Option<oneshot::Sender<Result<(), String>>>,
    },
    Snapshot {
        snapshot: StoredSnapshot,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// Most operations one transaction takes; bounds the latency of the first one in a burst.
const MAX_BATCH: usize = 4096;

async fn run_writer(mut connection: SqliteConnection, mut queue: mpsc::UnboundedReceiver<WriteOp>) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let outcome = write_batch(&mut connection, &batch)
            .await
            .map_err(|error| error.to_string());
        if let Err(error) = &outcome {
            tracing::error!(%error, operations = batch.len(), "persist raft state");
        }
        for op in batch {
            match op {
                WriteOp::Append { callback, .. } => callback.log_io_completed(
                    outcome
                        .clone()
                        .map_err(|error| std::io::Error::other(error.clone())),
                ),
                WriteOp::Meta {
                    done: Some(done), ..
                }
                | WriteOp::Snapshot { done, .. } => {
                    // The waiter may have given up (shutdown); nothing to do then.
                    let _ = done.send(outcome.clone());
                }
                WriteOp::Meta { done: None, .. }
                | WriteOp::Truncate { .. }
                | WriteOp::Purge { .. } => {}
            }
        }
    }
}

/// Rows per multi-row `INSERT`: three parameters a row stays far below SQLite's limit of
/// 32,766 bound parameters (SQLITE_MAX_VARIABLE_NUMBER since 3.32), and a handful of statement
/// shapes keeps sqlx's prepared-statement cache warm.
const ROWS_PER_INSERT: usize = 64;

/// Persists `batch` in one transaction with a single round trip to sqlx's SQLite worker thread.
///
/// openraft 0.9 appends one client write at a time and waits for its flush before it handles
/// the next (`RaftCore::append_to_log` turns the non-blocking `append` into a blocking one), so
/// the time from `append` to `LogFlushed` bounds the leader's write rate. sqlx runs every
/// statement on the connection's worker thread and answers over a channel
/// (sqlx-sqlite 0.8 `connection/worker.rs`): `begin()`, one `INSERT` per row and `commit()`
/// cost one cross-thread round trip each. Instead the whole transaction is one query string,
/// `BEGIN; ...; COMMIT`; sqlx-sqlite prepares and steps each statement of a multi-statement
/// query in turn and binds positional parameters across them (`connection/execute.rs`,
/// `args_used`). Consecutive appends become multi-row `INSERT`s.
async fn write_batch(
    connection: &mut SqliteConnection,
    batch: &[WriteOp],
) -> Result<(), sqlx::Error> {
    let mut sql = String::from("BEGIN;");
    let mut arguments = sqlx::sqlite::SqliteArguments::default();
    let mut rows: Vec<&AppendRow> = Vec::new();
    for op in batch {
        if let WriteOp::Append { rows: appended, .. } = op {
            rows.extend(appended.iter());
            continue;
        }
        push_inserts(&mut sql, &mut arguments, &mut rows)?;
        match op {
            WriteOp::Append { .. } => {}
            WriteOp::Truncate { from_index } => {
                sql.push_str("DELETE FROM raft_log WHERE idx >= ?;");
                bind(&mut arguments, i64_from(*from_index))?;
            }
            WriteOp::Purge { upto } => {
                sql.push_str("DELETE FROM raft_log WHERE idx <= ?;");
                bind(&mut arguments, i64_from(upto.index))?;
                let value = serde_json::to_vec(&Some(upto)).map_err(encode_error)?;
                push_meta(&mut sql, &mut arguments, "last_purged", value)?;
            }
            WriteOp::Meta { key, value, .. } => {
                push_meta(&mut sql, &mut arguments, key, value.as_slice())?
            }
            WriteOp::Snapshot { snapshot, .. } => {
                let meta = serde_json::to_vec(&snapshot.meta).map_err(encode_error)?;
                sql.push_str(
                    "INSERT OR REPLACE INTO raft_snapshot (id, meta, data) VALUES (1, ?, ?);",
                );
                bind(&mut arguments, meta)?;
                bind(&mut arguments, snapshot.data.as_slice())?;
            }
        }
    }
    push_inserts(&mut sql, &mut arguments, &mut rows)?;
    sql.push_str("COMMIT;");
    let outcome = sqlx::query_with(&sql, arguments)
        .execute(&mut *connection)
        .await;
    if outcome.is_err() {
        // A failed statement leaves the transaction open: roll it back so the next batch starts
        // clean. This fails harmlessly when SQLite already rolled back (or never began).
        let _ = sqlx::query("ROLLBACK").execute(&mut *connection).await;
    }
    outcome.map(|_| ())
}

/// Appends `INSERT`s for the queued `rows` (in order, `ROWS_PER_INSERT` at a time) and empties
/// it.
fn push_inserts<'q>(
    sql: &mut String,
    arguments: &mut sqlx::sqlite::SqliteArguments<'q>,
    rows: &mut Vec<&'q AppendRow>,
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(ROWS_PER_INSERT) {
        sql.push_str("INSERT OR REPLACE INTO raft_log (idx, term, entry) VALUES ");
        for (position, (index, term, entry)) in chunk.iter().enumerate() {
            sql.push_str(if position == 0 {
                "(?, ?, ?)"
            } else {
                ", (?, ?, ?)"
            });
            bind(arguments, i64_from(*index))?;
            bind(arguments, i64_from(*term))?;
            bind(arguments, entry.as_slice())?;
        }
        sql.push(';');
    }
    rows.clear();
    Ok(())
}

fn push_meta<'q>(
    sql: &mut String,
    arguments: &mut sqlx::sqlite::SqliteArguments<'q>,
    key: &'static str,
    value: impl sqlx::Encode<'q, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite> + 'q,
) -> Result<(), sqlx::Error> {
    sql.push_str("INSERT OR REPLACE INTO raft_meta (key, value) VALUES (?, ?);");
    bind(arguments, key)?;
    bind(arguments, value)
}

fn bind<'q, T>(
    arguments: &mut sqlx::sqlite::SqliteArguments<'q>,
    value: T,
) -> Result<(), sqlx::Error>
where
    T: sqlx::Encode<'q, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite> + 'q,
{
    use sqlx::Arguments;
    arguments.add(value).map_err(sqlx::Error::Encode)
}

fn encode_error(error: serde_json::Error) -> sqlx::Error {
    sqlx::Error::Encode(Box::new(error))
}

/// SQLite integers are signed; Raft indexes and terms stay far below `i64::MAX`.
fn i64_from(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn decode_meta<T: serde::de::DeserializeOwned>(
    meta: &BTreeMap<String, Vec<u8>>,
    key: &'static str,
) -> Result<Option<T>, StoreError> {
    meta.get(key)
        .map(|bytes| serde_json::from_slice(bytes))
        .transpose()
        .map_err(|source| StoreError::Decode { what: key, source })
}

fn io_error(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    error: impl std::error::Error + 'static,
) -> StorageError {
    StorageIOError::new(subject, verb, AnyError::new(&error)).into()
}

fn writer_gone(subject: ErrorSubject<NodeId>) -> StorageError {
    io_error(
        subject,
        ErrorVerb::Write,
        std::io::Error::other("the store's writer task has stopped"),
    )
}

// ---------------------------------------------------------------------------------------------
// Log

/// The Raft log and vote. Cheap to clone: clones share the cache and the writer.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<LogShared>,
}

struct LogShared {
    cache: Mutex<LogCache>,
    writer: mpsc::UnboundedSender<WriteOp>,
}

/// The in-memory mirror of the persisted log. Invariant: `entries` holds every entry after
/// `last_purged`, with no hole, exactly as the writer will have persisted them once its queue
/// drains.
struct LogCache {
    entries: BTreeMap<u64, Entry>,
    last_purged: Option<LogId>,
    vote: Option<Vote>,
    committed: Option<LogId>,
}

impl LogStore {
    fn cache(&self) -> MutexGuard<'_, LogCache> {
        // A panic while holding this lock would already have taken the node down; recover the
        // data rather than poison every later call.
        self.shared
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn send(&self, op: WriteOp, subject: ErrorSubject<NodeId>) -> Result<(), StorageError> {
        self.shared
            .writer
            .send(op)
            .map_err(|_| writer_gone(subject))
    }

    /// Bytes of request text in the log entries after `index` (blank and membership entries
    /// count as nothing). Linear in the entries kept, which the snapshot policy bounds.
    pub fn bytes_after(&self, index: u64) -> u64 {
        let cache = self.cache();
        cache
            .entries
            .range(index.saturating_add(1)..)
            .map(|(_, entry)| match &entry.payload {
                EntryPayload::Normal(proposal) => proposal.json().len() as u64,
                EntryPayload::Blank | EntryPayload::Membership(_) => 0,
            })
            .sum()
    }

    /// Bytes of request text in every log entry this node holds.
    pub fn bytes(&self) -> u64 {
        self.bytes_after(0)
    }

    async fn persist_meta(&self, key: &'static str, value: Vec<u8>) -> Result<(), StorageError> {
        let (done, wait) = oneshot::channel();
        self.send(
            WriteOp::Meta {
                key,
                value,
                done: Some(done),
            },
            ErrorSubject::Vote,
        )?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(io_error(
                ErrorSubject::Vote,
                ErrorVerb::Write,
                std::io::Error::other(error),
            )),
            Err(_) => Err(writer_gone(ErrorSubject::Vote)),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let cache = self.cache();
        Ok(cache
            .entries
            .range(range)
            .map(|(_, entry)| entry.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let cache = self.cache();
        let last_log_id = cache
            .entries
            .values()
            .next_back()
            .map(|entry| *entry.get_log_id())
            .or(cache.last_purged);
        Ok(LogState {
            last_purged_log_id: cache.last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let value = serde_json::to_vec(vote)
            .map_err(|error| io_error(ErrorSubject::Vote, ErrorVerb::Write, error))?;
        self.persist_meta("vote", value).await?;
        self.cache().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.cache().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Persisting the commit index is an optimisation (a restarted node can apply up to it
        // before hearing from a leader), so it rides along with the next batch unawaited.
        let value = serde_json::to_vec(&committed)
            .map_err(|error| io_error(ErrorSubject::Store, ErrorVerb::Write, error))?;
        self.cache().committed = committed;
        self.send(
            WriteOp::Meta {
                key: "committed",
                value,
                done: None,
            },
            ErrorSubject::Store,
        )
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.cache().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut rows = Vec::new();
        {
            let mut cache = self.cache();
            for entry in entries {
                let log_id = *entry.get_log_id();
                let bytes = serde_json::to_vec(&entry).map_err(|error| {
                    io_error(ErrorSubject::Log(log_id), ErrorVerb::Write, error)
                })?;
                rows.push((log_id.index, log_id.leader_id.term, bytes));
                cache.entries.insert(log_id.index, entry);
            }
        }
        self.send(WriteOp::Append { rows, callback }, ErrorSubject::Logs)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.cache().entries.split_off(&log_id.index);
        self.send(
            WriteOp::Truncate {
                from_index: log_id.index,
            },
            ErrorSubject::Logs,
        )
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        {
            let mut cache = self.cache();
            let kept = cache.entries.split_off(&(log_id.index + 1));
            cache.entries = kept;
            cache.last_purged = Some(log_id);
        }
        self.send(WriteOp::Purge { upto: log_id }, ErrorSubject::Logs)
    }
}

// ---------------------------------------------------------------------------------------------
// State machine

/// What a snapshot holds: the applied position, the membership, and the data.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StateMachine {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
    pub state: State,
}

#[derive(Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

impl StoredSnapshot {
    fn decode_machine(&self) -> Result<StateMachine, StoreError> {
        let mut machine: StateMachine =
            serde_json::from_slice(&self.data).map_err(|source| StoreError::Decode {
                what: "snapshot data",
                source,
            })?;
        machine.state.reindex();
        Ok(machine)
    }
}

/// The state machine and its snapshots. Cheap to clone; the API reads through `read`.
#[derive(Clone)]
pub struct StateMachineStore {
    shared: Arc<MachineShared>,
}

impl StateMachineStore {
    /// Size in bytes and build time in microseconds of the last snapshot built on this node.
    pub fn last_snapshot_build(&self) -> (u64, u64) {
        (
            self.shared.snapshot_bytes.load(Ordering::Relaxed),
            self.shared.snapshot_build_micros.load(Ordering::Relaxed),
        )
    }
}

struct MachineShared {
    machine: RwLock<StateMachine>,
    snapshot: Mutex<Option<StoredSnapshot>>,
    /// Distinguishes snapshots built at the same log id (after a restart, for example).
    snapshot_counter: AtomicU64,
    /// The last snapshot built here: its size and how long encoding and persisting it took.
    snapshot_bytes: AtomicU64,
    snapshot_build_micros: AtomicU64,
    writer: mpsc::UnboundedSender<WriteOp>,
    /// Told of the requests each `apply` call applied; set once, after Raft exists.
    on_applied: OnceLock<AppliedHook>,
}

/// Called after every `apply` with the requests it applied, in log order, once the state
/// machine's lock is released (so the hook may read the state). It runs on openraft's state
/// machine task: keep it short and never wait in it.
pub type AppliedHook = Box<dyn Fn(&StateMachineStore, &[Request]) + Send + Sync>;

impl StateMachineStore {
    /// Runs `read` against the applied state. Keep it short: apply waits for it.
    pub fn read<T>(&self, read: impl FnOnce(&StateMachine) -> T) -> T {
        let machine = self
            .shared
            .machine
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        read(&machine)
    }

    /// Installs the hook told of applied requests. Only the first call installs one.
    pub fn on_applied(&self, hook: AppliedHook) {
        if self.shared.on_applied.set(hook).is_err() {
            tracing::warn!("an applied-command hook was already installed; keeping the first");
        }
    }

    fn write_machine(&self) -> std::sync::RwLockWriteGuard<'_, StateMachine> {
        self.shared
            .machine
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn current_snapshot(&self) -> MutexGuard<'_, Option<StoredSnapshot>> {
        self.shared
            .snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn persist_snapshot(&self, snapshot: StoredSnapshot) -> Result<(), StorageError> {
        let signature = snapshot.meta.signature();
        let (done, wait) = oneshot::channel();
        self.shared
            .writer
            .send(WriteOp::Snapshot {
                snapshot: snapshot.clone(),
                done,
            })
            .map_err(|_| writer_gone(ErrorSubject::Snapshot(Some(signature.clone()))))?;
        let outcome = wait
            .await
            .map_err(|_| writer_gone(ErrorSubject::Snapshot(Some(signature.clone()))))?;
        outcome.map_err(|error| {
            io_error(
                ErrorSubject::Snapshot(Some(signature)),
                ErrorVerb::Write,
                std::io::Error::other(error),
            )
        })?;
        *self.current_snapshot() = Some(snapshot);
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let started = std::time::Instant::now();
        // A copy taken under the read lock, encoded off it and off the async workers: encoding
        // the state of a large fleet takes hundreds of milliseconds, and apply (which waits
        // for the lock on a worker) and every request would wait with it.
        let machine = self.read(StateMachine::clone);
        let (last_applied, last_membership) =
            (machine.last_applied, machine.last_membership.clone());
        let data = tokio::task::spawn_blocking(move || serde_json::to_vec(&machine))
            .await
            .map_err(|error| {
                io_error(
                    ErrorSubject::StateMachine,
                    ErrorVerb::Read,
                    std::io::Error::other(error),
                )
            })?
            .map_err(|error| io_error(ErrorSubject::StateMachine, ErrorVerb::Read, error))?;
        let counter = self.shared.snapshot_counter.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{counter}", id.leader_id.term, id.index),
            None => format!("0-0-{counter}"),
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership,
            snapshot_id,
        };
        self.persist_snapshot(StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        })
        .await?;
        let micros = started.elapsed().as_micros() as u64;
        self.shared
            .snapshot_bytes
            .store(data.len() as u64, Ordering::Relaxed);
        self.shared
            .snapshot_build_micros
            .store(micros, Ordering::Relaxed);
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), micros, "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok(self.read(|machine| (machine.last_applied, machine.last_membership.clone())))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut results = Vec::new();
        // Kept (not cloned) until the lock is released, for the hook.
        let mut applied = Vec::new();
        {
            let mut machine = self.write_machine();
            for entry in entries {
                let log_id = *entry.get_log_id();
                machine.last_applied = Some(log_id);
                let result = match entry.payload {
                    EntryPayload::Blank => CommandResult::None,
                    EntryPayload::Normal(proposal) => {
                        // Only text this same code encoded gets here; a node that cannot read
                        // an entry must stop rather than diverge from the others.
                        let request = proposal.take_request().map_err(|error| {
                            io_error(ErrorSubject::Apply(log_id), ErrorVerb::Read, error)
                        })?;
                        let result = machine.state.apply(log_id.index, &request);
                        applied.push(request);
                        result
                    }
                    EntryPayload::Membership(membership) => {
                        machine.last_membership = StoredMembership::new(Some(log_id), membership);
                        CommandResult::None
                    }
                };
                results.push(result);
            }
        }
        if let Some(hook) = self.shared.on_applied.get() {
            if !applied.is_empty() {
                hook(self, &applied);
            }
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        // Decoded off the async workers, like a build: a large fleet's state takes a while.
        let (data, decoded) = tokio::task::spawn_blocking(move || {
            let decoded = serde_json::from_slice::<StateMachine>(&data).map(|mut machine| {
                machine.state.reindex();
                machine
            });
            (data, decoded)
        })
        .await
        .map_err(|error| {
            io_error(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                std::io::Error::other(error),
            )
        })?;
        let machine = decoded.map_err(|error| {
            io_error(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                error,
            )
        })?;
        self.persist_snapshot(StoredSnapshot {
            meta: meta.clone(),
            data,
        })
        .await?;
        *self.write_machine() = machine;
        tracing::info!(snapshot = %meta.snapshot_id, "installed snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        Ok(self.current_snapshot().clone().map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;

    /// Builds a fresh store in its own temporary directory; the directory lives as long as the
    /// store under test.
    struct TempStoreBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for TempStoreBuilder {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
            let dir = tempfile::tempdir()
                .map_err(|error| io_error(ErrorSubject::Store, ErrorVerb::Write, error))?;
            let (log, machine) = open(dir.path())
                .await
                .map_err(|error| io_error(ErrorSubject::Store, ErrorVerb::Read, error))?;
            Ok((dir, log, machine))
        }
    }

    /// openraft's own conformance suite for `RaftLogStorage` and `RaftStateMachine`.
    #[test]
    fn passes_the_openraft_storage_suite() -> Result<(), StorageError> {
        Suite::test_all(TempStoreBuilder)
    }
}
