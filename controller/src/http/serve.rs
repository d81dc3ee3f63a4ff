//! The HTTP/1.1 server loop: hyper under the router, with every connection bounded.
//!
//! `axum::serve` sets no timeouts and no connection limit: a client that opened connections
//! and sent nothing (or half a request) kept each one open for good, and enough of them used up
//! the node's file descriptors, after which it answered nobody, its peers included. Here:
//!
//! - **Header timeout** (`--header-timeout`): hyper's `header_read_timeout`, which runs from
//!   when the connection starts waiting for a request head until the head is complete. That
//!   covers a slowloris sending a header a byte at a time, a connection that never sends
//!   anything, and an idle keep-alive connection between requests (hyper starts the clock as
//!   soon as it waits for the next head), so it is the idle keep-alive timeout as well.
//! - **Body timeout** (`--body-timeout`): a request body must have arrived this long after its
//!   head; reading it fails afterwards (the handler answers 408 and the connection closes).
//! - **Connection cap** (`--max-connections`): when every slot is taken, a connection is
//!   closed to make room: one that never completed a request (the oldest first), else the
//!   least recently active idle keep-alive one; never a peer's, one in a request, or one
//!   younger than `PROBATION_MS` (so a new client gets to send its first request). A flood of
//!   silent connections thus pushes out its own. What this does not stop: one address opening
//!   connections faster than the cap per probation period keeps every slot young; per-address
//!   limits belong in front of the node (a firewall's connlimit, the load balancer). When none can go (every one is
//!   busy or a peer's), a new connection gets one of `PEER_RESERVE` further slots, where only
//!   peer traffic (`/raft/...`) and health checks are served and anything else is answered 503
//!   at once; beyond those it is closed without a word. A connection becomes a peer's when a
//!   request on it authenticates with the cluster secret.
//! - **Errors hyper writes itself** (a malformed request line, a URI or headers beyond its
//!   limits) carry no body; the connection's writer replaces them with problem documents.
//! - **Transfer codings** other than `chunked` are refused with 501 (RFC 9112, section 6.1):
//!   hyper decodes `chunked` and would pass a `gzip` body on undecoded.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use strata_api::{Problem, PROBLEM_CONTENT_TYPE};

/// A new connection is not closed to make room before it had this long to send a request:
/// a real client sends its first request head within milliseconds of connecting.
const PROBATION_MS: u64 = 250;
/// Connections beyond `--max-connections` that may still carry peer traffic.
pub const PEER_RESERVE: usize = 64;
/// How long a reserve connection may take to send its request head.
const RESERVE_HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// The largest request head (request line and headers) hyper buffers; beyond it, 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The longest request target; beyond it, 414 (hyper's own limit, 65,534 bytes, sits beyond
/// the head limit and would never answer).
const MAX_URI_BYTES: usize = 8 * 1024;
/// Headers in one request at most; beyond it, 431.
const MAX_HEADERS: usize = 100;
/// How long shutdown waits for connections to finish their requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Bounds of the server, and its TLS.
#[derive(Clone)]
pub struct ServeConfig {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
    /// TLS on every connection (`--tls-cert`); `None` serves plain HTTP (`--insecure-http`).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// The limits the request path needs (the part of `ServeConfig` that is `Copy`).
#[derive(Clone, Copy, Debug)]
struct Limits {
    header_timeout: Duration,
    body_timeout: Duration,
}

/// One open connection, as the table and the request path see it. Handlers find it in the
/// request's extensions.
#[derive(Debug)]
pub struct Connection {
    id: u64,
    /// Milliseconds since the table started, of the last byte read or request answered.
    last_active: AtomicU64,
    /// Requests in flight on it.
    busy: AtomicUsize,
    /// Requests answered on it.
    answered: AtomicU64,
    /// When it was accepted (ms since the table started).
    opened: u64,
    /// A request on it authenticated with the cluster secret.
    peer: AtomicBool,
    /// In the reserve: peer traffic and health checks only.
    reserve: bool,
    close: CancellationToken,
}

impl Connection {
    /// Marks the connection as a peer's: it is never closed to make room.
    pub fn mark_peer(&self) {
        self.peer.store(true, Ordering::Relaxed);
    }
}

/// The open connections.
struct Table {
    started: tokio::time::Instant,
    max: usize,
    next_id: AtomicU64,
    main: Mutex<HashMap<u64, Arc<Connection>>>,
    reserve: AtomicUsize,
    /// Connections closed to make room, and connections refused outright (for /metrics and
    /// logs).
    evicted: AtomicU64,
    refused: AtomicU64,
}

impl Table {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn connection(&self, reserve: bool) -> Arc<Connection> {
        let now = self.now_ms();
        Arc::new(Connection {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            last_active: AtomicU64::new(now),
            busy: AtomicUsize::new(0),
            answered: AtomicU64::new(0),
            opened: now,
            peer: AtomicBool::new(false),
            reserve,
            close: CancellationToken::new(),
        })
    }

    /// A slot for a new connection: a free one, one freed by closing the least recently
    /// active idle client connection, a reserve one, or none.
    fn admit(&self) -> Option<Arc<Connection>> {
        {
            let mut main = self
                .main
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if main.len() >= self.max {
                // Connections that never completed a request go first (oldest first), then
                // idle keep-alive ones; never a peer's, one in a request, or one still within
                // its probation.
                let now = self.now_ms();
                let victim = main
                    .values()
                    .filter(|c| {
                        c.busy.load(Ordering::Relaxed) == 0
                            && !c.peer.load(Ordering::Relaxed)
                            && now.saturating_sub(c.opened) >= PROBATION_MS
                    })
                    .min_by_key(|c| {
                        (
                            c.answered.load(Ordering::Relaxed) > 0,
                            c.last_active.load(Ordering::Relaxed),
                        )
                    })
                    .cloned();
                if let Some(victim) = victim {
                    main.remove(&victim.id);
                    victim.close.cancel();
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
            }
            if main.len() < self.max {
                let connection = self.connection(false);
                main.insert(connection.id, connection.clone());
                return Some(connection);
            }
        }
        let taken = self.reserve.fetch_add(1, Ordering::Relaxed);
        if taken < PEER_RESERVE {
            return Some(self.connection(true));
        }
        self.reserve.fetch_sub(1, Ordering::Relaxed);
        self.refused.fetch_add(1, Ordering::Relaxed);
        None
    }

    fn release(&self, connection: &Connection) {
        if connection.reserve {
            self.reserve.fetch_sub(1, Ordering::Relaxed);
        } else {
            self.main
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&connection.id);
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting, lets
/// requests in flight finish (for at most `SHUTDOWN_GRACE`) and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let table = Arc::new(Table {
        started: tokio::time::Instant::now(),
        max: config.max_connections.max(1),
        next_id: AtomicU64::new(0),
        main: Mutex::new(HashMap::new()),
        reserve: AtomicUsize::new(0),
        evicted: AtomicU64::new(0),
        refused: AtomicU64::new(0),
    });
    let stopping = CancellationToken::new();
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
            // Reap finished connection tasks as we go.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, _) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors (EMFILE/ENFILE) or a connection reset before it was
                // accepted: wait a moment rather than spin, as axum::serve does.
                tracing::warn!(%error, "accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(connection) = table.admit() else {
            // Closed at once: a refusal costs no more than the accept.
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        connections.spawn(serve_connection(
            stream,
            config.tls.clone(),
            router.clone(),
            Limits {
                header_timeout: config.header_timeout,
                body_timeout: config.body_timeout,
            },
            table.clone(),
            connection,
            stopping.clone(),
        ));
    }
    stopping.cancel();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.abort_all();
    }
    Ok(())
}

async fn serve_connection(
    stream: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    router: Router,
    limits: Limits,
    table: Arc<Table>,
    connection: Arc<Connection>,
    stopping: CancellationToken,
) {
    match tls {
        None => serve_http(stream, router, limits, &table, &connection, &stopping).await,
        Some(acceptor) => {
            // The handshake has the header timeout (a client that opens a connection and sends
            // nothing is a slowloris either way) and yields to eviction and shutdown. A client
            // without a certificate the --client-ca accepts fails here.
            let handshake = tokio::time::timeout(limits.header_timeout, acceptor.accept(stream));
            let outcome = tokio::select! {
                outcome = handshake => Some(outcome),
                () = connection.close.cancelled() => None,
                () = stopping.cancelled() => None,
            };
            match outcome {
                Some(Ok(Ok(stream))) => {
                    serve_http(stream, router, limits, &table, &connection, &stopping).await;
                }
                Some(Ok(Err(error))) => tracing::debug!(%error, "TLS handshake failed"),
                Some(Err(_)) => tracing::debug!("TLS handshake timed out"),
                None => {}
            }
        }
    }
    table.release(&connection);
}

/// HTTP/1.1 on an accepted (and, with TLS, handshaken) connection, until it ends.
async fn serve_http<S>(
    stream: S,
    router: Router,
    config: Limits,
    table: &Arc<Table>,
    connection: &Arc<Connection>,
    stopping: &CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(Guarded {
        inner: stream,
        table: table.clone(),
        connection: connection.clone(),
        replacement: None,
    });
    let service = {
        let connection = connection.clone();
        let table = table.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let router = router.clone();
            let connection = connection.clone();
            let table = table.clone();
            async move {
                connection.busy.fetch_add(1, Ordering::Relaxed);
                let response = handle(router, config, &connection, request).await;
                connection.busy.fetch_sub(1, Ordering::Relaxed);
                connection.answered.fetch_add(1, Ordering::Relaxed);
                connection
                    .last_active
                    .store(table.now_ms(), Ordering::Relaxed);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let header_timeout = if connection.reserve {
        RESERVE_HEADER_TIMEOUT.min(config.header_timeout)
    } else {
        config.header_timeout
    };
    // hyper's http1 server options: https://docs.rs/hyper/1/hyper/server/conn/http1/struct.Builder.html
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(!connection.reserve)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    let served = builder.serve_connection(io, service);
    tokio::pin!(served);
    let outcome = tokio::select! {
        outcome = &mut served => outcome,
        () = connection.close.cancelled() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
        () = stopping.cancelled() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(error) = outcome {
        tracing::debug!(%error, "connection ended");
    }
}

/// One request: the checks below the router, then the router.
async fn handle(
    router: Router,
    config: Limits,
    connection: &Arc<Connection>,
    request: Request<Incoming>,
) -> Response<Body> {
    if let Some(refusal) = unsupported_transfer_coding(&request) {
        return refusal;
    }
    if request.uri().to_string().len() > MAX_URI_BYTES {
        return problem(
            StatusCode::URI_TOO_LONG,
            "uri-too-long",
            "URI too long",
            format!("request targets are limited to {MAX_URI_BYTES} bytes"),
        );
    }
    let path = request.uri().path();
    if connection.reserve
        && !(path.starts_with("/raft/") || path == "/healthz" || path == "/readyz")
    {
        let mut response = problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "Too many connections",
            "this node is at its connection limit; retry shortly",
        );
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    }
    let deadline = tokio::time::Instant::now() + config.body_timeout;
    let mut request = request.map(|body| Body::new(DeadlineBody::new(body, deadline)));
    request.extensions_mut().insert(connection.clone());
    match router.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    }
}

/// 501 for a transfer coding other than `chunked` (hyper would hand the body on as it came).
fn unsupported_transfer_coding<B>(request: &Request<B>) -> Option<Response<Body>> {
    let codings: Vec<String> = request
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| {
            String::from_utf8_lossy(value.as_bytes())
                .split(',')
                .map(|coding| coding.trim().to_ascii_lowercase())
                .filter(|coding| !coding.is_empty())
                .collect::<Vec<_>>()
        })
        .collect();
    if codings.iter().all(|coding| coding == "chunked") {
        return None;
    }
    let mut response = problem(
        StatusCode::NOT_IMPLEMENTED,
        "unsupported-transfer-coding",
        "Unsupported transfer coding",
        format!(
            "Transfer-Encoding: {}: only chunked is supported",
            codings.join(", ")
        ),
    );
    // The body cannot be read, so the connection cannot carry another request.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    Some(response)
}

fn problem(
    status: StatusCode,
    kind: &str,
    title: &str,
    detail: impl Into<String>,
) -> Response<Body> {
    let body =
        serde_json::to_vec(&Problem::new(status.as_u16(), kind, title, detail)).unwrap_or_default();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROBLEM_CONTENT_TYPE),
    );
    response
}

/// A request body that fails once its deadline has passed.
struct DeadlineBody {
    inner: Incoming,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl DeadlineBody {
    fn new(inner: Incoming, deadline: tokio::time::Instant) -> Self {
        DeadlineBody {
            inner,
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }
}

/// The error a body gives when its deadline passed; `JsonBody` answers it with 408.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
pub struct BodyTimeout;

impl http_body::Body for DeadlineBody {
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|frame| frame.map_err(axum::BoxError::from)));
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's socket: reads mark it active, and the body-less error responses hyper
/// writes itself (400, 414, 431) are replaced by problem documents.
struct Guarded<S> {
    inner: S,
    table: Arc<Table>,
    connection: Arc<Connection>,
    /// A replacement response still to be written, and how much of it has been.
    replacement: Option<(Vec<u8>, usize)>,
}

impl<S: AsyncWrite + Unpin> Guarded<S> {
    /// Writes what is left of the replacement; `Ready(Ok)` once it is all out.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.replacement {
            if *written >= bytes.len() {
                self.replacement = None;
                break;
            }
            let n =
                std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }
}

/// The problem document for a body-less error response hyper wrote itself, if `head` is one.
/// Such a response is recognised by its status and `content-length: 0`: every error response
/// of ours carries a problem document, never an empty body.
fn replace_bare_error(head: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(head).ok()?;
    let status_line = text.lines().next()?;
    let (kind, title, status) = match status_line.get(..12)? {
        "HTTP/1.1 400" | "HTTP/1.0 400" => ("bad-request", "Bad request", 400),
        "HTTP/1.1 414" | "HTTP/1.0 414" => ("uri-too-long", "URI too long", 414),
        "HTTP/1.1 431" | "HTTP/1.0 431" => {
            ("headers-too-large", "Request header fields too large", 431)
        }
        _ => return None,
    };
    let lower = text.to_ascii_lowercase();
    if !lower.contains("\r\ncontent-length: 0\r\n") || !lower.ends_with("\r\n\r\n") {
        return None;
    }
    let detail = match status {
        400 => "the request could not be parsed as HTTP/1.1".to_string(),
        414 => "the request target is longer than this server accepts".to_string(),
        _ => format!(
            "the request head is larger than this server accepts (about {MAX_HEAD_BYTES} bytes) or has more than {MAX_HEADERS} headers"
        ),
    };
    let body =
        serde_json::to_string(&Problem::new(status, kind, title, detail)).unwrap_or_default();
    Some(
        format!(
            "{status_line}\r\ncontent-type: {PROBLEM_CONTENT_TYPE}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let now = self.table.now_ms();
            self.connection.last_active.store(now, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_replacement(cx))?;
        if let Some(replacement) = replace_bare_error(buf) {
            self.replacement = Some((replacement, 0));
            // The original is consumed whole; the replacement goes out instead.
            std::task::ready!(self.poll_replacement(cx))?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_errors_become_problem_documents_and_ours_stay() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Wed, 02 Dec 2026 16:00:00 GMT\r\n\r\n";
        let replaced = replace_bare_error(bare).map(String::from_utf8);
        let Some(Ok(replaced)) = replaced else {
            panic!("not replaced");
        };
        assert!(replaced.starts_with("HTTP/1.1 431 "));
        assert!(replaced.contains("content-type: application/problem+json"));
        assert!(replaced.contains("urn:strata:problem:headers-too-large"));
        // A problem document of ours, or a success, is left alone.
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\ncontent-length: 10\r\n\r\n";
        assert!(replace_bare_error(ours).is_none());
        assert!(replace_bare_error(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
    }
}
