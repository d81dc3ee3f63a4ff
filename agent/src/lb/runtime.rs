//! HAProxy's two command sockets: the Runtime API on the worker's stats socket (`stats socket
//! ... level admin`, management guide 9.3) and the master CLI (`-S`, management guide 9.4).
//!
//! Framing, as HAProxy 2.6 does it:
//! - Non-interactive (the default): one line of commands, the answer, then HAProxy closes.
//!   The master CLI closes only once the client half-closes its side, so every request here
//!   shuts down its writing half after the line.
//! - Interactive (`prompt`, 9.3): every answer ends with the prompt `> ` on a line of its own,
//!   which lets one connection carry a batch of commands with one answer each. Converging a
//!   pool uses it: one connection for every `set server` of the change.
//!
//! Every operation has a deadline ([`RuntimeClient::timeout`]): a stuck HAProxy cannot stall
//! the agent.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::layout::AdminState;

/// Why a socket operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talk to {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} did not answer within {timeout:?}")]
    Timeout { path: PathBuf, timeout: Duration },
    /// HAProxy answered, refusing the command.
    #[error("haproxy refused `{command}`: {answer}")]
    Refused { command: String, answer: String },
    #[error("unexpected answer to `{command}`: {answer}")]
    Unexpected { command: String, answer: String },
}

/// The answer of `show proc` on the master CLI (management guide 9.4.1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcList {
    pub master_pid: Option<u32>,
    /// Reloads the master went through, and how many of them failed.
    pub reloads: u64,
    pub failed_reloads: u64,
    /// The current worker (first of "# workers").
    pub worker_pid: Option<u32>,
    /// Workers of older generations still finishing their connections.
    pub old_workers: Vec<u32>,
}

/// Parses `show proc`:
///
/// ```text
/// #<PID>          <type>          <reloads>       <uptime>        <version>
/// 1162            master          5 [failed: 0]   0d00h02m07s     2.6.12
/// # workers
/// 1271            worker          1               0d00h00m00s     2.6.12
/// # old workers
/// 1233            worker          3               0d00h00m43s     2.6.12
/// ```
pub fn parse_show_proc(text: &str) -> Option<ProcList> {
    let mut list = ProcList::default();
    let mut section = "";
    let mut saw_master = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(title) = line.strip_prefix('#') {
            let title = title.trim();
            if !title.starts_with('<') {
                section = if title == "workers" {
                    "workers"
                } else if title == "old workers" {
                    "old"
                } else {
                    "other"
                };
            }
            continue;
        }
        let mut words = line.split_whitespace();
        let (Some(pid), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        match (kind, section) {
            ("master", _) => {
                saw_master = true;
                list.master_pid = Some(pid);
                list.reloads = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                let rest: Vec<&str> = words.collect();
                list.failed_reloads = rest
                    .iter()
                    .position(|w| *w == "[failed:")
                    .and_then(|i| rest.get(i + 1))
                    .and_then(|n| n.trim_end_matches(']').parse().ok())
                    .unwrap_or(0);
            }
            ("worker", "workers") if list.worker_pid.is_none() => list.worker_pid = Some(pid),
            ("worker", "old") => list.old_workers.push(pid),
            _ => {}
        }
    }
    saw_master.then_some(list)
}

/// A client of one HAProxy socket.
#[derive(Clone, Debug)]
pub struct RuntimeClient {
    path: PathBuf,
    timeout: Duration,
}

impl RuntimeClient {
    pub fn new(path: impl Into<PathBuf>, timeout: Duration) -> Self {
        RuntimeClient {
            path: path.into(),
            timeout,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn io(&self, source: std::io::Error) -> RuntimeError {
        RuntimeError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn timed_out(&self) -> RuntimeError {
        RuntimeError::Timeout {
            path: self.path.clone(),
            timeout: self.timeout,
        }
    }

    async fn connect(&self) -> Result<UnixStream, RuntimeError> {
        match tokio::time::timeout(self.timeout, UnixStream::connect(&self.path)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(source)) => Err(RuntimeError::Connect {
                path: self.path.clone(),
                source,
            }),
            Err(_) => Err(self.timed_out()),
        }
    }

    /// One command line, non-interactive: the whole answer.
    pub async fn command(&self, line: &str) -> Result<String, RuntimeError> {
        let exchange = async {
            let mut stream = self.connect().await?;
            stream
                .write_all(format!("{line}\n").as_bytes())
                .await
                .map_err(|e| self.io(e))?;
            // The master CLI answers and closes only after the client's half-close.
            stream.shutdown().await.map_err(|e| self.io(e))?;
            let mut answer = Vec::new();
            stream
                .read_to_end(&mut answer)
                .await
                .map_err(|e| self.io(e))?;
            Ok(String::from_utf8_lossy(&answer).into_owned())
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| self.timed_out())?
    }

    /// Opens an interactive session for a batch of commands.
    pub async fn session(&self) -> Result<Session<'_>, RuntimeError> {
        let stream = self.connect().await?;
        let mut session = Session {
            client: self,
            stream,
            buffer: Vec::new(),
        };
        session.call("prompt").await?;
        Ok(session)
    }

    /// `show stat` (management guide 9.3; CSV, 9.1).
    pub async fn show_stat(&self) -> Result<String, RuntimeError> {
        self.command("show stat").await
    }

    /// `show proc` on the master CLI.
    pub async fn show_proc(&self) -> Result<ProcList, RuntimeError> {
        let answer = self.command("show proc").await?;
        parse_show_proc(&answer).ok_or_else(|| RuntimeError::Unexpected {
            command: "show proc".to_string(),
            answer,
        })
    }

    /// `reload` on the master CLI: "the same as a `kill -USR2` on the master process" (9.4.1).
    /// HAProxy 2.6 closes the connection without saying how the reload went; the caller
    /// watches `show proc` for the new worker or a failed reload.
    pub async fn reload(&self) -> Result<(), RuntimeError> {
        self.command("reload").await.map(|_| ())
    }
}

/// An interactive Runtime API connection.
pub struct Session<'a> {
    client: &'a RuntimeClient,
    stream: UnixStream,
    buffer: Vec<u8>,
}

impl Session<'_> {
    /// Sends one command and returns its answer (without the prompt).
    pub async fn call(&mut self, line: &str) -> Result<String, RuntimeError> {
        let client = self.client;
        let exchange = async {
            self.stream
                .write_all(format!("{line}\n").as_bytes())
                .await
                .map_err(|e| client.io(e))?;
            self.buffer.clear();
            let mut chunk = [0u8; 4096];
            loop {
                // Every answer, empty or not, ends with a newline and then the prompt.
                if self.buffer.ends_with(b"\n> ") || self.buffer == b"> " {
                    let answer = &self.buffer[..self.buffer.len() - 2];
                    return Ok(String::from_utf8_lossy(answer).trim().to_string());
                }
                let read = self
                    .stream
                    .read(&mut chunk)
                    .await
                    .map_err(|e| client.io(e))?;
                if read == 0 {
                    return Err(client.io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "haproxy closed the connection",
                    )));
                }
                self.buffer.extend_from_slice(&chunk[..read]);
            }
        };
        tokio::time::timeout(client.timeout, exchange)
            .await
            .map_err(|_| client.timed_out())?
    }

    /// `set server <backend>/<server> addr <ip> port <port>` (9.3). HAProxy answers what it
    /// changed ("IP changed from ...", "no need to change the addr, port changed ...").
    pub async fn set_addr(
        &mut self,
        backend: &str,
        server: &str,
        address: IpAddr,
        port: u16,
    ) -> Result<(), RuntimeError> {
        let command = format!("set server {backend}/{server} addr {address} port {port}");
        let answer = self.call(&command).await?;
        if answer.is_empty() || answer.contains("changed") || answer.contains("no need to change") {
            Ok(())
        } else {
            Err(RuntimeError::Refused { command, answer })
        }
    }

    /// `set server <backend>/<server> weight <weight>` (9.3): silent on success.
    pub async fn set_weight(
        &mut self,
        backend: &str,
        server: &str,
        weight: u32,
    ) -> Result<(), RuntimeError> {
        let command = format!("set server {backend}/{server} weight {weight}");
        self.silent(command).await
    }

    /// `set server <backend>/<server> state ready|drain|maint` (9.3): silent on success.
    pub async fn set_state(
        &mut self,
        backend: &str,
        server: &str,
        state: AdminState,
    ) -> Result<(), RuntimeError> {
        let command = format!("set server {backend}/{server} state {}", state.keyword());
        self.silent(command).await
    }

    async fn silent(&mut self, command: String) -> Result<(), RuntimeError> {
        let answer = self.call(&command).await?;
        if answer.is_empty() {
            Ok(())
        } else {
            Err(RuntimeError::Refused { command, answer })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_proc_names_master_current_and_old_workers() {
        let text = "#<PID>          <type>          <reloads>       <uptime>        <version>      \n\
                    26577           master          2 [failed: 1]   0d00h00m22s     2.6.12-1+deb12u4\n\
                    # workers\n\
                    27930           worker          0               0d00h00m00s     2.6.12-1+deb12u4\n\
                    # old workers\n\
                    26589           worker          1               0d00h00m20s     2.6.12-1+deb12u4\n\
                    # programs\n\n";
        assert_eq!(
            parse_show_proc(text),
            Some(ProcList {
                master_pid: Some(26577),
                reloads: 2,
                failed_reloads: 1,
                worker_pid: Some(27930),
                old_workers: vec![26589],
            })
        );
        assert_eq!(parse_show_proc("Unknown command\n"), None);
    }
}
