//! The benchmark harness's "bare hyper proxy": the gateway's HTTP stack and nothing else.
//!
//! It serves HTTP/1 with the same hyper server settings as the gateway, reads each request's
//! body whole, sends it to one upstream through the same pooled client the gateway uses
//! (hyper-util's, over plain TCP), and passes the upstream's answer back as it arrives. No
//! authentication, no parsing, no reservation, no journal, no store: the difference between
//! this target and the gateway in `bench/run.sh` is what the gateway's own work costs, and the
//! difference between this target and nginx is what the Rust HTTP stack costs.
//!
//! ```sh
//! cargo run --release --example bare_proxy -- 127.0.0.1:8090 http://127.0.0.1:8081
//! cargo run --release --example bare_proxy -- 127.0.0.1:8090 http://127.0.0.1:8081 --inline
//! ```
//! With `--inline`, an experiment rather than a baseline: each client connection gets an
//! upstream connection of its own, and the client connection's task drives it (hyper's
//! `client::conn::http1`, polled beside the request and the response body), where the pooled
//! client runs every upstream connection in a task of its own and hands each response and
//! each piece of body across to the caller's task. What that hand-over costs is the difference
//! between the two modes (BENCHMARKS.md). No pool across client connections, no reconnect
//! beyond "the last one closed, dial again", plain TCP only.
//!
//! Never run by `cargo test` (which only compiles it).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

type Upstream = Client<HttpConnector, Full<Bytes>>;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bare_proxy LISTEN_ADDR UPSTREAM_BASE_URL [--inline]";
    let listen: std::net::SocketAddr = args.next().ok_or(usage)?.parse()?;
    let upstream: http::Uri = args.next().ok_or(usage)?.parse()?;
    let (scheme, authority) = match (upstream.scheme(), upstream.authority()) {
        (Some(s), Some(a)) if s == &http::uri::Scheme::HTTP => (s.clone(), a.clone()),
        _ => return Err("the upstream must be an http:// URL with a host".into()),
    };
    let inline = match args.next().as_deref() {
        None => false,
        Some("--inline") => true,
        Some(_) => return Err(usage.into()),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if inline {
        runtime.block_on(inline::serve(listen, authority))
    } else {
        runtime.block_on(serve(listen, scheme, authority))
    }
}

async fn serve(
    listen: std::net::SocketAddr,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut dial = HttpConnector::new();
    dial.set_nodelay(true);
    let client: Upstream = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(dial);
    let target = Arc::new((client, scheme, authority));
    accept(listen, || {
        let target = target.clone();
        hyper::service::service_fn(move |req| forward(target.clone(), req))
    })
    .await
}

/// The response both modes give.
type Reply = http::Response<http_body_util::combinators::BoxBody<Bytes, hyper::Error>>;

/// Serves HTTP/1 on `listen` with the gateway's server settings, each connection with the
/// service `service` makes for it, in a task of its own.
async fn accept<S>(
    listen: std::net::SocketAddr,
    mut service: impl FnMut() -> S,
) -> Result<(), Box<dyn std::error::Error>>
where
    S: hyper::service::Service<http::Request<Incoming>, Response = Reply, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    // The gateway's listener: the same accept queue as `tollgate serve` by default.
    let listener = tollgate::server::bind(
        &listen.to_string(),
        tollgate::config::Limits::default().listen_backlog,
    )
    .await?;
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(Duration::from_secs(30));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let conn = http1.serve_connection(TokioIo::new(stream), service());
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

async fn forward(
    target: Arc<(Upstream, http::uri::Scheme, http::uri::Authority)>,
    req: http::Request<Incoming>,
) -> Result<Reply, Infallible> {
    let (client, scheme, authority) = &*target;
    let (mut parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return Ok(status(http::StatusCode::BAD_REQUEST)),
    };
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(scheme.clone());
    uri.authority = Some(authority.clone());
    uri.path_and_query = parts.uri.path_and_query().cloned();
    let Ok(uri) = http::Uri::from_parts(uri) else {
        return Ok(status(http::StatusCode::BAD_REQUEST));
    };
    parts.uri = uri;
    parts.headers.remove(http::header::HOST);
    match client
        .request(http::Request::from_parts(parts, Full::new(body)))
        .await
    {
        Ok(resp) => Ok(resp.map(BodyExt::boxed)),
        Err(_) => Ok(status(http::StatusCode::BAD_GATEWAY)),
    }
}

fn status(code: http::StatusCode) -> Reply {
    let mut resp = http::Response::new(
        http_body_util::Empty::new()
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *resp.status_mut() = code;
    resp
}

/// `--inline`: the upstream connection driven by the client connection's task.
mod inline {
    use super::{status, Reply};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::body::{Body, Frame, Incoming};
    use hyper::client::conn::http1::{Connection, SendRequest};
    use hyper_util::rt::TokioIo;
    use std::convert::Infallible;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    /// One upstream connection: the half that sends requests and the half that does the I/O,
    /// which whoever waits on it polls.
    struct Upstream {
        send: SendRequest<Full<Bytes>>,
        conn: Connection<TokioIo<tokio::net::TcpStream>, Full<Bytes>>,
    }

    impl Upstream {
        async fn dial(authority: &http::uri::Authority) -> Option<Upstream> {
            let stream = tokio::net::TcpStream::connect(authority.as_str())
                .await
                .ok()?;
            let _ = stream.set_nodelay(true);
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .ok()?;
            Some(Upstream { send, conn })
        }

        /// Drives the connection's I/O; false once it has ended.
        fn drive(&mut self, cx: &mut Context<'_>) -> bool {
            matches!(self.conn.poll_without_shutdown(cx), Poll::Pending)
        }
    }

    /// Where a client connection keeps its upstream connection between requests.
    type Slot = Arc<Mutex<Option<Upstream>>>;

    pub async fn serve(
        listen: std::net::SocketAddr,
        authority: http::uri::Authority,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let authority = Arc::new(authority);
        super::accept(listen, || {
            let authority = authority.clone();
            let slot: Slot = Arc::default();
            hyper::service::service_fn(move |req| forward(slot.clone(), authority.clone(), req))
        })
        .await
    }

    async fn forward(
        slot: Slot,
        authority: Arc<http::uri::Authority>,
        req: http::Request<Incoming>,
    ) -> Result<Reply, Infallible> {
        let (mut parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => return Ok(status(http::StatusCode::BAD_REQUEST)),
        };
        let idle = slot.lock().ok().and_then(|mut s| s.take());
        let mut upstream = match idle {
            Some(u) if !u.send.is_closed() => u,
            _ => match Upstream::dial(&authority).await {
                Some(u) => u,
                None => return Ok(status(http::StatusCode::BAD_GATEWAY)),
            },
        };
        let Ok(path) = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse::<http::Uri>()
        else {
            return Ok(status(http::StatusCode::BAD_REQUEST));
        };
        parts.uri = path;
        if let Ok(host) = http::HeaderValue::from_str(authority.as_str()) {
            parts.headers.insert(http::header::HOST, host);
        }
        let mut sent = std::pin::pin!(upstream
            .send
            .send_request(http::Request::from_parts(parts, Full::new(body))));
        let answer = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = sent.as_mut().poll(cx) {
                return Poll::Ready(r.ok());
            }
            if upstream.drive(cx) {
                // The connection may have moved the answer along; look again.
                sent.as_mut().poll(cx).map(Result::ok)
            } else {
                Poll::Ready(None)
            }
        })
        .await;
        let Some(answer) = answer else {
            return Ok(status(http::StatusCode::BAD_GATEWAY));
        };
        let (parts, body) = answer.into_parts();
        let body = Relay {
            body,
            upstream: Some(upstream),
            slot,
        };
        Ok(http::Response::from_parts(parts, body.boxed()))
    }

    /// The upstream's body, read by the client connection's task, which drives the upstream
    /// connection as it reads; at the body's end the connection goes back to the slot.
    struct Relay {
        body: Incoming,
        upstream: Option<Upstream>,
        slot: Slot,
    }

    impl Body for Relay {
        type Data = Bytes;
        type Error = hyper::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
            let this = &mut *self;
            if let Some(upstream) = &mut this.upstream {
                if !upstream.drive(cx) {
                    this.upstream = None;
                }
            }
            let frame = Pin::new(&mut this.body).poll_frame(cx);
            if matches!(frame, Poll::Ready(None)) || this.body.is_end_stream() {
                if let Some(mut upstream) = this.upstream.take() {
                    // Let the connection see the body's end before it waits for the next call.
                    if upstream.drive(cx) && !upstream.send.is_closed() {
                        if let Ok(mut slot) = this.slot.lock() {
                            *slot = Some(upstream);
                        }
                    }
                }
            }
            frame
        }

        fn is_end_stream(&self) -> bool {
            self.body.is_end_stream()
        }
    }
}
