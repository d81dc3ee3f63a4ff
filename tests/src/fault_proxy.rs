//! A fault-injecting HTTP proxy in front of an EC2 endpoint (moto) on loopback: the cloud API
//! that throttles, fails and drops connections, for the EC2 fault tests.
//!
//! Every request is one EC2 Query API call (`POST /` with `Action=...` in a form body). Which
//! calls fail is decided by a counter per action, so each run injects the same faults:
//! `RunInstances` calls go, in turn, dropped after moto ran them (the answer is lost: the
//! launch happened, the caller does not know), answered, throttled, answered, failed with
//! 503, answered; every fourth call of any other action is throttled, failed, or dropped
//! before it reaches moto. Each answer closes its connection (`Connection: close`), so a
//! dropped one costs the client nothing but the call.
//!
//! `Schedule::Throttle(n)` instead throttles every n-th call of every action and passes the
//! rest (the benchmark's "10% throttled"); `Schedule::None` passes everything.
//!
//! The proxy records when each call arrived, so a test can check the caller's rate limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy did with a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forwarded and answered.
    None,
    /// 503 `RequestLimitExceeded`, as EC2 throttles (not executed).
    Throttled,
    /// 503 `Unavailable` (not executed here; a real 5xx may follow execution).
    Unavailable,
    /// Closed before forwarding: not executed, and the caller gets no answer.
    DroppedBefore,
    /// Forwarded and executed, then closed without the answer.
    DroppedAfter,
}

/// Which calls fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// The mix of the module docs: lost launch answers, throttling, 503s, drops.
    Mixed,
    /// Every n-th call of each action is throttled.
    Throttle(usize),
    /// Every call is forwarded and answered.
    None,
}

impl Schedule {
    /// The fault for call number `count` (from 0) of `action`.
    fn fault(self, action: &str, count: usize) -> Fault {
        match self {
            Schedule::Mixed if action == "RunInstances" => {
                RUN_INSTANCES_FAULTS[count % RUN_INSTANCES_FAULTS.len()]
            }
            Schedule::Mixed => OTHER_FAULTS[count % OTHER_FAULTS.len()],
            Schedule::Throttle(every) if every > 0 && count % every == every - 1 => {
                Fault::Throttled
            }
            Schedule::Throttle(_) | Schedule::None => Fault::None,
        }
    }
}

/// One call as the proxy saw it.
#[derive(Clone, Debug)]
pub struct Call {
    pub at: Instant,
    pub action: String,
    pub fault: Fault,
}

pub struct FaultProxy {
    /// `http://127.0.0.1:port`, to give the controllers as `--ec2-endpoint`.
    pub endpoint: String,
    calls: Arc<Mutex<Vec<Call>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const RUN_INSTANCES_FAULTS: [Fault; 6] = [
    Fault::DroppedAfter,
    Fault::None,
    Fault::Throttled,
    Fault::None,
    Fault::Unavailable,
    Fault::None,
];
const OTHER_FAULTS: [Fault; 12] = [
    Fault::None,
    Fault::None,
    Fault::None,
    Fault::Throttled,
    Fault::None,
    Fault::None,
    Fault::None,
    Fault::Unavailable,
    Fault::None,
    Fault::None,
    Fault::None,
    Fault::DroppedBefore,
];

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream` (`http://host:port`), with
    /// the mixed schedule.
    pub async fn start(upstream: &str) -> anyhow::Result<FaultProxy> {
        FaultProxy::start_with(upstream, Schedule::Mixed).await
    }

    /// Like `start`, with `schedule` deciding which calls fail.
    pub async fn start_with(upstream: &str, schedule: Schedule) -> anyhow::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the fault proxy")?;
        let address = listener.local_addr().context("fault proxy address")?;
        let calls = Arc::new(Mutex::new(Vec::new()));
        let counters: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .context("build the proxy's client")?;
        let upstream = upstream.trim_end_matches('/').to_string();
        let task = {
            let calls = calls.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (calls, counters, http, upstream) = (
                        calls.clone(),
                        counters.clone(),
                        http.clone(),
                        upstream.clone(),
                    );
                    tokio::spawn(async move {
                        let _ = serve(stream, &http, &upstream, &calls, &counters, schedule).await;
                    });
                }
            })
        };
        Ok(FaultProxy {
            endpoint: format!("http://{address}"),
            calls,
            task,
        })
    }

    /// Every call so far, in arrival order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls
            .lock()
            .map(|calls| calls.clone())
            .unwrap_or_default()
    }
}

/// The most calls that arrived within any window of `window`.
pub fn busiest_window(calls: &[Call], window: Duration) -> usize {
    let mut times: Vec<Instant> = calls.iter().map(|call| call.at).collect();
    times.sort();
    let mut most = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end].duration_since(times[start]) > window {
            start += 1;
        }
        most = most.max(end - start + 1);
    }
    most
}

async fn serve(
    mut stream: TcpStream,
    http: &reqwest::Client,
    upstream: &str,
    calls: &Mutex<Vec<Call>>,
    counters: &Mutex<HashMap<String, usize>>,
    schedule: Schedule,
) -> anyhow::Result<()> {
    let (head, body) = read_request(&mut stream).await?;
    let at = Instant::now();
    let body_text = String::from_utf8_lossy(&body).to_string();
    let action = body_text
        .split('&')
        .find_map(|pair| pair.strip_prefix("Action="))
        .unwrap_or("unknown")
        .to_string();
    let fault = {
        let mut counters = counters.lock().unwrap_or_else(|e| e.into_inner());
        let count = counters.entry(action.clone()).or_default();
        let fault = schedule.fault(&action, *count);
        *count += 1;
        fault
    };
    if let Ok(mut calls) = calls.lock() {
        calls.push(Call {
            at,
            action: action.clone(),
            fault,
        });
    }
    let error = |code: &str| {
        let body = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>injected by the fault proxy</Message></Error></Errors><RequestID>fault-proxy</RequestID></Response>"
        );
        format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/xml\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    match fault {
        Fault::Throttled => {
            stream
                .write_all(error("RequestLimitExceeded").as_bytes())
                .await?
        }
        Fault::Unavailable => stream.write_all(error("Unavailable").as_bytes()).await?,
        Fault::DroppedBefore => {}
        Fault::None | Fault::DroppedAfter => {
            let mut request = http
                .post(format!("{upstream}{}", request_path(&head)))
                .body(body);
            for (name, value) in headers(&head) {
                if !matches!(
                    name.as_str(),
                    "host" | "content-length" | "connection" | "transfer-encoding"
                ) {
                    request = request.header(name, value);
                }
            }
            let response = request.send().await?;
            let status = response.status();
            let content_type = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("text/xml")
                .to_string();
            let bytes = response.bytes().await?;
            if fault == Fault::None {
                let head = format!(
                    "HTTP/1.1 {} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or(""),
                    bytes.len()
                );
                stream.write_all(head.as_bytes()).await?;
                stream.write_all(&bytes).await?;
            }
        }
    }
    let _ = stream.shutdown().await;
    Ok(())
}

/// A request head (as text) and its body (by `content-length`).
async fn read_request(stream: &mut TcpStream) -> anyhow::Result<(String, Vec<u8>)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        anyhow::ensure!(buffer.len() < 64 * 1024, "request head too large");
        let read = stream.read(&mut chunk).await?;
        anyhow::ensure!(read > 0, "connection closed before a request");
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
    let length: usize = headers(&head)
        .into_iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0);
    let mut body = buffer[head_end..].to_vec();
    while body.len() < length {
        let read = stream.read(&mut chunk).await?;
        anyhow::ensure!(read > 0, "connection closed inside a body");
        body.extend_from_slice(&chunk[..read]);
    }
    body.truncate(length);
    Ok((head, body))
}

fn request_path(head: &str) -> String {
    head.lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap_or("/")
        .to_string()
}

/// Header names (lowercase) and values of a request head.
fn headers(head: &str) -> Vec<(String, String)> {
    head.lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_fail_the_calls_they_name() {
        let throttled = (0..20)
            .filter(|n| Schedule::Throttle(10).fault("DescribeInstances", *n) == Fault::Throttled)
            .count();
        assert_eq!(throttled, 2);
        assert_eq!(Schedule::None.fault("RunInstances", 0), Fault::None);
        assert_eq!(
            Schedule::Mixed.fault("RunInstances", 0),
            Fault::DroppedAfter
        );
    }

    #[test]
    fn the_busiest_window_counts_calls_within_it() {
        let start = Instant::now();
        let calls: Vec<Call> = [0u64, 100, 200, 1500, 1600, 1700, 1800]
            .iter()
            .map(|ms| Call {
                at: start + Duration::from_millis(*ms),
                action: "X".to_string(),
                fault: Fault::None,
            })
            .collect();
        assert_eq!(busiest_window(&calls, Duration::from_millis(1000)), 4);
        assert_eq!(busiest_window(&calls, Duration::from_millis(100)), 2);
        assert_eq!(busiest_window(&[], Duration::from_secs(1)), 0);
    }
}
