//! A provider's upstream connections: HTTP/1.1, kept alive between calls, and each driven by
//! the task of the call that is using it.
//!
//! hyper-util's pooled client, which this replaces, ran every connection in a task of its own.
//! A call handed its request to that task through a channel and got the response head and each
//! piece of the body back the same way, so every call cost task wake-ups on both sides, plus
//! a SipHash of the pool's key each time a connection was taken or put back (BENCHMARKS.md,
//! item 42). Here the call's own task polls the connection while it waits for the response,
//! and the response [`Body`] polls it while the body is read. Bytes go from the upstream's
//! socket to the client's without a hop between tasks.
//!
//! Rules:
//! - A connection serves one call at a time. Between calls it waits in the [`Pool`], newest
//!   first, for at most the idle timeout. Nobody polls it there; [`Pool::prune`] (the provider
//!   actor calls it on a timer) closes the ones that expired or that the upstream closed.
//! - A connection goes back to the pool only after its response body was read to the end.
//!   A body dropped before its end (a client that went away mid-stream) closes its connection:
//!   HTTP/1 has no other way to abandon a response.
//! - A connection taken from the pool is looked at first (one poll reads a close the upstream
//!   sent meanwhile). A request that a reused connection could not take is sent again on
//!   another one. A request that reached the socket is never sent twice: a chat completion is
//!   not idempotent.
//! - Only HTTP/1.1 is offered (TLS's ALPN says so), as nginx and the providers' own SDKs use
//!   it. The provider's concurrency cap bounds the connections in use, and so the idle ones.

use crate::provider::Dial;
use bytes::Bytes;
use http::header::HOST;
use http::uri::{PathAndQuery, Uri};
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::rt::TokioIo;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tower_service::Service;

type Io = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an upstream call got no response.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be opened (or tunnelled, or secured). The reason is the source.
    #[error("could not connect to the upstream")]
    Connect(#[source] BoxError),
    /// The connection failed while the request was sent or the response head awaited.
    #[error("the upstream connection failed")]
    Http(#[source] hyper::Error),
}

/// One upstream connection: the half that takes requests and the half that does the I/O,
/// which whoever is waiting on the connection polls.
struct Conn {
    send: SendRequest<Full<Bytes>>,
    /// `None` once the connection has ended.
    io: Option<Connection<Io, Full<Bytes>>>,
}

impl Conn {
    /// Moves the connection's I/O along; false once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(io) = self.io.as_mut() else {
            return false;
        };
        if io.poll_without_shutdown(cx).is_pending() {
            return true;
        }
        // Dropping the I/O half hands any request it had not written back to its sender.
        self.io = None;
        false
    }

    /// Whether the connection can take another request, as far as one look (driving it with
    /// `cx`) can tell.
    fn open(&mut self, cx: &mut Context<'_>) -> bool {
        self.drive(cx) && !self.send.is_closed()
    }

    /// [`Conn::open`] for a connection nobody waits on (in the pool).
    fn usable(&mut self) -> bool {
        self.open(&mut Context::from_waker(Waker::noop()))
    }

    /// Sends `req` and waits for the response head, driving the connection meanwhile.
    async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, Failed> {
        let ready = poll_fn(|cx| {
            if let Poll::Ready(r) = self.send.poll_ready(cx) {
                return Poll::Ready(r.is_ok());
            }
            if !self.drive(cx) {
                return Poll::Ready(false);
            }
            self.send.poll_ready(cx).map(|r| r.is_ok())
        })
        .await;
        if !ready {
            return Err(Failed::Unsent(Box::new(req)));
        }
        let mut sending = std::pin::pin!(self.send.try_send_request(req));
        poll_fn(|cx| {
            if let Poll::Ready(r) = sending.as_mut().poll(cx) {
                return Poll::Ready(answered(r));
            }
            // Driven, the connection may have answered. If it ended instead, its answer (an
            // error) is there now.
            self.drive(cx);
            sending.as_mut().poll(cx).map(answered)
        })
        .await
    }
}

/// What became of a request sent on a connection.
fn answered(
    r: Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<Full<Bytes>>>>,
) -> Result<Response<Incoming>, Failed> {
    r.map_err(|mut e| match e.take_message() {
        Some(req) => Failed::Unsent(Box::new(req)),
        None => Failed::Sent(e.into_error()),
    })
}

enum Failed {
    /// The connection never wrote the request, which comes back to be sent elsewhere.
    Unsent(Box<Request<Full<Bytes>>>),
    Sent(hyper::Error),
}

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

impl Idle {
    /// Whether the connection may serve another call: not expired, and not closed.
    fn reusable(&mut self, timeout: Duration) -> bool {
        self.since.elapsed() < timeout && self.conn.usable()
    }
}

/// A provider's idle upstream connections, and how to open another.
pub struct Pool {
    connector: HttpsConnector<Dial>,
    /// Where connections go: the provider's base URL (its scheme and authority count).
    target: Uri,
    /// The `Host` every request carries: the target's host, and its port unless the scheme's.
    host: HeaderValue,
    /// Newest last.
    idle: Mutex<Vec<Idle>>,
    max_idle: usize,
    idle_timeout: Duration,
    opened: AtomicU64,
    opened_counter: metrics::Counter,
}

impl Pool {
    /// A pool for connections to `target` (an http:// or https:// URL with a host).
    pub fn new(
        connector: HttpsConnector<Dial>,
        target: Uri,
        max_idle: usize,
        idle_timeout: Duration,
        opened_counter: metrics::Counter,
    ) -> Option<Pool> {
        let host = target.host()?;
        let default_port = match target.scheme_str()? {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        let host = match target.port_u16() {
            Some(port) if port != default_port => HeaderValue::try_from(format!("{host}:{port}")),
            _ => HeaderValue::try_from(host),
        }
        .ok()?;
        Some(Pool {
            connector,
            target,
            host,
            idle: Mutex::new(Vec::new()),
            max_idle,
            idle_timeout,
            opened: AtomicU64::new(0),
            opened_counter,
        })
    }

    /// Sends `req` on an idle connection, or on a new one, and returns the response, whose
    /// body drives the connection while it is read and puts it back at its end. The request's
    /// URI may be absolute; it is sent in origin form, with the pool's `Host`.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<Full<Bytes>>,
    ) -> Result<Response<Body>, Error> {
        origin_form(req.uri_mut());
        req.headers_mut().insert(HOST, self.host.clone());
        loop {
            let (mut conn, reused) = match self.take() {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            match conn.send(req).await {
                Ok(resp) => {
                    let pool = self.clone();
                    return Ok(resp.map(|body| Body {
                        body,
                        conn: Some(conn),
                        pool,
                    }));
                }
                // The upstream closed an idle connection as we took it: try the next one,
                // and in the end a new one, whose failure is final.
                Err(Failed::Unsent(back)) if reused => req = *back,
                Err(Failed::Unsent(_)) => {
                    return Err(Error::Connect("the new connection closed at once".into()))
                }
                Err(Failed::Sent(e)) => return Err(Error::Http(e)),
            }
        }
    }

    /// A new connection, boxed: a connection is several hundred bytes, and it moves from the
    /// call to its response body, into the pool and out again (each move a `memcpy` of it).
    async fn connect(&self) -> Result<Box<Conn>, Error> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(Error::Connect)?;
        let io = connector
            .call(self.target.clone())
            .await
            .map_err(Error::Connect)?;
        let (send, io) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| Error::Connect(e.into()))?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        self.opened_counter.increment(1);
        Ok(Box::new(Conn { send, io: Some(io) }))
    }

    /// The newest idle connection that is still usable; those found expired or closed are
    /// closed on the way.
    fn take(&self) -> Option<Box<Conn>> {
        let mut stale = Vec::new();
        let found = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let Some(mut entry) = idle.pop() else {
                    break None;
                };
                if entry.reusable(self.idle_timeout) {
                    break Some(entry.conn);
                }
                stale.push(entry);
            }
        };
        drop(stale);
        found
    }

    fn put(&self, conn: Box<Conn>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Closes the idle connections that have waited longer than the idle timeout, or that the
    /// upstream has closed.
    pub fn prune(&self) {
        let stale: Vec<Idle> = self
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extract_if(.., |entry| !entry.reusable(self.idle_timeout))
            .collect();
        // Closed here, outside the lock.
        drop(stale);
    }

    /// Connections waiting for a call.
    pub fn idle(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Connections opened since the pool was made.
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }
}

/// `uri` without its scheme and authority, as HTTP/1 sends it to an origin server.
fn origin_form(uri: &mut Uri) {
    if uri.scheme().is_some() || uri.authority().is_some() {
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *uri = Uri::from(path);
    }
}

/// An upstream response's body. Reading it drives its connection; at its end the connection
/// goes back to the pool, and dropped before its end, the connection is closed.
pub struct Body {
    body: Incoming,
    /// `None` once the connection has ended or gone back to the pool.
    conn: Option<Box<Conn>>,
    pool: Arc<Pool>,
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(conn) = &mut this.conn {
            if !conn.drive(cx) {
                this.conn = None;
            }
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        let ended = matches!(frame, Poll::Ready(None)) || this.body.is_end_stream();
        if ended {
            if let Some(mut conn) = this.conn.take() {
                // The connection sees the body's end, and waits for the next request.
                if conn.open(cx) {
                    this.pool.put(conn);
                }
            }
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn connector() -> HttpsConnector<Dial> {
        crate::provider::https_connector(
            Dial::Direct(hyper_util::client::legacy::connect::HttpConnector::new()),
            rustls::RootCertStore::empty(),
        )
        .unwrap()
    }

    fn pool(target: &str) -> Arc<Pool> {
        Arc::new(
            Pool::new(
                connector(),
                target.parse().unwrap(),
                4,
                Duration::from_secs(90),
                metrics::Counter::noop(),
            )
            .unwrap(),
        )
    }

    fn post(uri: &str) -> Request<Full<Bytes>> {
        Request::post(uri)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    }

    #[test]
    fn host_names_the_port_only_when_it_is_not_the_schemes() {
        assert_eq!(
            pool("http://upstream.test:8080/v1").host,
            "upstream.test:8080"
        );
        assert_eq!(pool("http://upstream.test:80/v1").host, "upstream.test");
        assert_eq!(pool("https://upstream.test/v1").host, "upstream.test");
        assert_eq!(pool("https://[::1]:8443/v1").host, "[::1]:8443");
        assert!(Pool::new(
            connector(),
            "ftp://upstream.test/".parse().unwrap(),
            1,
            Duration::from_secs(1),
            metrics::Counter::noop()
        )
        .is_none());
    }

    #[test]
    fn requests_go_in_origin_form() {
        let mut uri: Uri = "https://upstream.test:8443/v1/chat/completions?x=1"
            .parse()
            .unwrap();
        origin_form(&mut uri);
        assert_eq!(uri, "/v1/chat/completions?x=1");
        let mut uri: Uri = "/already".parse().unwrap();
        origin_form(&mut uri);
        assert_eq!(uri, "/already");
    }

    /// The request line and headers the upstream received, once the pool has sent one.
    #[tokio::test]
    async fn the_upstream_gets_origin_form_and_the_pools_host() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (head_tx, head_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            let _ = head_tx.send(String::from_utf8(got).unwrap());
            // Keeps the connection open, as a keep-alive server does.
            while s.read(&mut buf).await.map(|n| n > 0).unwrap_or(false) {}
        });
        let pool = pool(&format!("http://{addr}/v1"));
        let resp = pool
            .send(post(&format!("http://{addr}/v1/chat/completions")))
            .await
            .unwrap();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"ok");
        let head = head_rx.await.unwrap().to_ascii_lowercase();
        assert!(
            head.starts_with("post /v1/chat/completions http/1.1\r\n"),
            "{head}"
        );
        assert!(head.contains(&format!("\r\nhost: {addr}\r\n")), "{head}");
        assert_eq!(pool.idle(), 1, "read to its end, the connection went back");
        assert_eq!(pool.opened(), 1);
    }

    /// A connection the upstream closed before the request was written hands the request
    /// back (the pool then sends it on another connection) instead of failing the call.
    #[tokio::test]
    async fn a_request_a_closed_connection_never_wrote_comes_back() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = pool(&format!("http://{addr}/v1"));
        let (connected, accepted) = tokio::join!(pool.connect(), listener.accept());
        let mut conn = connected.unwrap();
        drop(accepted.unwrap()); // the upstream hangs up at once
        tokio::time::sleep(Duration::from_millis(50)).await;
        match conn.send(post("/v1/chat/completions")).await {
            Err(Failed::Unsent(req)) => assert_eq!(req.uri(), "/v1/chat/completions"),
            Err(Failed::Sent(e)) => panic!("reported as sent: {e}"),
            Ok(_) => panic!("answered by a closed connection"),
        }
        assert!(!conn.usable());
    }

    /// A body dropped before its end takes its connection with it: nothing goes back to the
    /// pool that still has part of an answer to read.
    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npart")
                .await
                .unwrap();
            // Reads until the client closes.
            while s.read(&mut buf).await.map(|n| n > 0).unwrap_or(false) {}
        });
        let pool = pool(&format!("http://{addr}/v1"));
        let resp = pool.send(post("/v1/chat/completions")).await.unwrap();
        drop(resp);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the connection was closed")
            .unwrap();
        assert_eq!(pool.idle(), 0);
    }
}
