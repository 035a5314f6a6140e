//! The benchmark harness's "bare hyper proxy": the gateway's HTTP stack and nothing else.
//!
//! It serves HTTP/1 with the same hyper server settings as the gateway, reads each request's
//! body whole, sends it to one upstream through the same upstream connections the gateway
//! uses (`tollgate_actors::upstream::Pool`, over plain TCP), and passes the upstream's answer
//! back as it arrives. No authentication, no parsing, no reservation, no journal, no store:
//! the difference between this target and the gateway in `bench/run.sh` is what the gateway's
//! own work costs, and the difference between this target and nginx is what the Rust HTTP
//! stack costs.
//!
//! ```sh
//! cargo run --release --example bare_proxy -- 127.0.0.1:8090 http://127.0.0.1:8081
//! cargo run --release --example bare_proxy -- 127.0.0.1:8090 http://127.0.0.1:8081 --hyper-util
//! ```
//! With `--hyper-util`, the upstream client the gateway used before BENCHMARKS.md item 42
//! (hyper-util's pooled client, each connection in a task of its own), which was hyper-bare
//! in every round before the fifteenth: the difference between the two modes is what that
//! client's hand-offs between tasks cost.
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
use tollgate_actors::upstream::Pool;

type Upstream = Client<HttpConnector, Full<Bytes>>;

// The gateway's allocator, so that the difference between the two is the gateway's own work.
#[global_allocator]
static GLOBAL: tollgate::allocator::Allocator = tollgate::allocator::Allocator;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: bare_proxy LISTEN_ADDR UPSTREAM_BASE_URL [--hyper-util]";
    let listen: std::net::SocketAddr = args.next().ok_or(usage)?.parse()?;
    let upstream: http::Uri = args.next().ok_or(usage)?.parse()?;
    let (scheme, authority) = match (upstream.scheme(), upstream.authority()) {
        (Some(s), Some(a)) if s == &http::uri::Scheme::HTTP => (s.clone(), a.clone()),
        _ => return Err("the upstream must be an http:// URL with a host".into()),
    };
    let hyper_util = match args.next().as_deref() {
        None => false,
        Some("--hyper-util") => true,
        Some(_) => return Err(usage.into()),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if hyper_util {
        runtime.block_on(serve(listen, scheme, authority))
    } else {
        runtime.block_on(serve_pooled(listen, upstream))
    }
}

/// The gateway's upstream connections: one pool, plain TCP, the gateway's connector.
async fn serve_pooled(
    listen: std::net::SocketAddr,
    upstream: http::Uri,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut dial = HttpConnector::new();
    dial.set_nodelay(true);
    dial.enforce_http(false);
    let connector = tollgate_actors::provider::https_connector(
        tollgate_actors::provider::Dial::Direct(dial),
        rustls::RootCertStore::empty(),
    )?;
    let pool = Arc::new(
        Pool::new(
            connector,
            upstream,
            1024,
            Duration::from_secs(90),
            metrics::Counter::noop(),
        )
        .ok_or("the upstream must be an http:// URL with a host")?,
    );
    accept(listen, || {
        let pool = pool.clone();
        hyper::service::service_fn(move |req: http::Request<Incoming>| {
            let pool = pool.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = match body.collect().await {
                    Ok(collected) => collected.to_bytes(),
                    Err(_) => return Ok(status(http::StatusCode::BAD_REQUEST)),
                };
                match pool
                    .send(http::Request::from_parts(parts, Full::new(body)))
                    .await
                {
                    Ok(resp) => Ok(resp.map(BodyExt::boxed)),
                    Err(_) => Ok(status(http::StatusCode::BAD_GATEWAY)),
                }
            }
        })
    })
    .await
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
