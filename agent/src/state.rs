//! The agent's local state dir: one directory per instance, holding `record.json` and the
//! instance's logs.
//!
//! ```text
//! DATA_DIR/instances/<uuid>/record.json   the InstanceRecord
//! DATA_DIR/instances/<uuid>/stdout.log    ... and stderr.log, console.log (qemu)
//! ```
//!
//! Records are replaced atomically (write a temporary file, fsync, rename), so a crash leaves
//! either the old or the new record, never half of one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::driver::InstanceRecord;

const RECORD_FILE: &str = "record.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("create state dir {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("write record {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("read state dir {path}: {source}")]
    List {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("remove instance dir {path}: {source}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A record that could not be read back; the agent reports it and leaves the files alone for
/// an operator to inspect.
#[derive(Debug)]
pub struct UnreadableRecord {
    pub path: PathBuf,
    pub problem: String,
}

#[derive(Clone, Debug)]
pub struct StateDir {
    instances: PathBuf,
}

impl StateDir {
    /// Opens (creating if needed) the state under `data_dir`.
    pub fn open(data_dir: &Path) -> Result<StateDir, StateError> {
        let instances = data_dir.join("instances");
        fs::create_dir_all(&instances).map_err(|source| StateError::CreateDir {
            path: instances.clone(),
            source,
        })?;
        // The data dir holds the node credential and every instance's logs: the agent's
        // alone. Instances running as another user get their working directory elsewhere.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
            StateError::CreateDir {
                path: data_dir.to_path_buf(),
                source,
            }
        })?;
        Ok(StateDir { instances })
    }

    pub fn instance_dir(&self, instance_id: Uuid) -> PathBuf {
        self.instances.join(instance_id.to_string())
    }

    pub fn create_instance_dir(&self, instance_id: Uuid) -> Result<PathBuf, StateError> {
        let dir = self.instance_dir(instance_id);
        fs::create_dir_all(&dir).map_err(|source| StateError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        Ok(dir)
    }

    /// Writes the record atomically and durably.
    pub fn save(&self, record: &InstanceRecord) -> Result<(), StateError> {
        let dir = self.create_instance_dir(record.instance_id)?;
        let path = dir.join(RECORD_FILE);
        let temporary = dir.join(format!("{RECORD_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            let body = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
            let mut file = fs::File::create(&temporary)?;
            file.write_all(&body)?;
            file.sync_all()?;
            fs::rename(&temporary, &path)?;
            // The rename itself is durable only once the directory is synced.
            fs::File::open(&dir)?.sync_all()
        };
        write().map_err(|source| StateError::Write { path, source })
    }

    /// Every readable record, plus the ones that could not be read.
    pub fn load_all(&self) -> Result<(Vec<InstanceRecord>, Vec<UnreadableRecord>), StateError> {
        let entries = fs::read_dir(&self.instances).map_err(|source| StateError::List {
            path: self.instances.clone(),
            source,
        })?;
        let mut records = Vec::new();
        let mut unreadable = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let dir = entry.path();
            let Some(expected_id) = dir
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| Uuid::parse_str(name).ok())
            else {
                continue;
            };
            let path = dir.join(RECORD_FILE);
            let text = match fs::read(&path) {
                Ok(text) => text,
                // A directory without a record: a start that crashed before its record was
                // written, with nothing running yet (the record precedes any use).
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => {
                    unreadable.push(UnreadableRecord {
                        path,
                        problem: error.to_string(),
                    });
                    continue;
                }
            };
            match serde_json::from_slice::<InstanceRecord>(&text) {
                Ok(record) if record.instance_id == expected_id => records.push(record),
                Ok(record) => unreadable.push(UnreadableRecord {
                    path,
                    problem: format!(
                        "record names instance {} but sits in the directory of {expected_id}",
                        record.instance_id
                    ),
                }),
                Err(error) => unreadable.push(UnreadableRecord {
                    path,
                    problem: error.to_string(),
                }),
            }
        }
        records.sort_by_key(|record| record.instance_id);
        Ok((records, unreadable))
    }

    /// Removes the instance's directory, logs included. Missing is fine.
    pub fn remove(&self, instance_id: Uuid) -> Result<(), StateError> {
        let dir = self.instance_dir(instance_id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Remove { path: dir, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::driver::{DriverKind, LogPaths, ProcessIdentity};

    fn record(id: Uuid) -> InstanceRecord {
        InstanceRecord {
            instance_id: id,
            tier: "web".into(),
            driver: DriverKind::Process,
            address: SocketAddr::from(([127, 0, 0, 1], 4000)),
            process: Some(ProcessIdentity {
                pid: 10,
                pgid: 10,
                start_time: 99,
            }),
            logs: LogPaths {
                stdout: "/x/stdout.log".into(),
                stderr: "/x/stderr.log".into(),
                console: None,
            },
            accel: None,
            guest_port: None,
            started_at_ms: 1,
            exit: None,
        }
    }

    #[test]
    fn round_trips_and_reports_garbage() {
        let temp = tempfile::tempdir().expect("tempdir");
        let state = StateDir::open(temp.path()).expect("open");
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        state.save(&record(b)).expect("save");
        state.save(&record(a)).expect("save");
        // Garbage, a misplaced record, an empty dir and a stray file.
        let bad = Uuid::from_u128(3);
        state.create_instance_dir(bad).expect("dir");
        fs::write(state.instance_dir(bad).join(RECORD_FILE), b"{not json").expect("write");
        let misplaced = Uuid::from_u128(4);
        state.create_instance_dir(misplaced).expect("dir");
        fs::write(
            state.instance_dir(misplaced).join(RECORD_FILE),
            serde_json::to_vec(&record(a)).expect("json"),
        )
        .expect("write");
        state.create_instance_dir(Uuid::from_u128(5)).expect("dir");
        fs::write(temp.path().join("instances/README"), b"hi").expect("write");

        let (records, unreadable) = state.load_all().expect("load");
        assert_eq!(records, vec![record(a), record(b)]);
        assert_eq!(unreadable.len(), 2, "{unreadable:?}");

        state.remove(a).expect("remove");
        state.remove(a).expect("remove twice is fine");
        let (records, _) = state.load_all().expect("load");
        assert_eq!(records, vec![record(b)]);
    }
}
