//! A fake controller for tests: enough HTTP/1.1 on raw tokio sockets to answer one request per
//! connection, and a log of what it received. No web framework, so that this crate keeps its
//! promise of knowing none.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a fake controller answers: status, content type and body.
pub type Answer = (u16, &'static str, String);

pub struct FakeServer {
    pub address: SocketAddr,
    /// `METHOD /path` plus the `authorization` header and body, one entry per request.
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeServer {
    pub async fn start(
        answer: impl Fn(&str) -> Option<Answer> + Send + Sync + 'static,
    ) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|error| panic!("bind fake server: {error}"));
        let address = listener
            .local_addr()
            .unwrap_or_else(|error| panic!("local address: {error}"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let answer = Arc::new(answer);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                let answer = answer.clone();
                tokio::spawn(async move {
                    // A connection the client dropped is no failure of the fake server.
                    let _ = read_request(stream, &log, &*answer).await;
                });
            }
        });
        FakeServer {
            address,
            requests,
            task,
        }
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        self.address.to_string()
    }
}

/// Reads one request, logs it, and writes the answer; `None` from `answer` means holding the
/// connection open without answering, like a stuck controller.
async fn read_request(
    mut stream: TcpStream,
    log: &Mutex<Vec<String>>,
    answer: &(dyn Fn(&str) -> Option<Answer> + Send + Sync),
) -> Option<()> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
        if let Some(position) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break position + 4;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
    let content_length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    while buffer.len() < head_end + content_length {
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
    let request_line = head.lines().next().unwrap_or_default();
    let target = request_line
        .rsplit_once(' ')
        .map(|(target, _)| target)
        .unwrap_or(request_line)
        .to_string();
    let authorization = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("authorization")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    let body = String::from_utf8_lossy(&buffer[head_end..head_end + content_length]).to_string();
    if let Ok(mut log) = log.lock() {
        log.push(format!("{target}|{authorization}|{body}"));
    }
    match answer(&target) {
        Some((status, content_type, body)) => {
            let response = format!(
                "HTTP/1.1 {status} Whatever\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(response.as_bytes()).await.ok()?;
            stream.shutdown().await.ok()
        }
        None => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            None
        }
    }
}

/// An address on which nothing listens: bound once to get a free port, then released.
pub async fn refusing_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|error| panic!("bind: {error}"));
    let address = listener
        .local_addr()
        .unwrap_or_else(|error| panic!("local address: {error}"));
    drop(listener);
    address.to_string()
}
