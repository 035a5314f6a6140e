//! Serving HTTP/1 on a listener: our own accept loop (as tokio-rs/mini-redis does), so that
//! connections are capped and slow clients time out. Used by the gateway and the mock upstream.

use crate::config::Limits;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long shutdown lets open connections finish their requests and streams before it drops
/// the ones still open.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// A listener on `addr` (a host name is resolved; the first address that binds wins) with a
/// `listen(2)` backlog of `backlog`. Tokio's `TcpListener::bind` asks for 128, as the standard
/// library does: at a couple of thousand new connections a second, a moment's delay in the
/// accept loop fills that, and each connection turned away waits a second or more for its
/// SYN to be sent again.
pub async fn bind(addr: &str, backlog: u32) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        };
        let bound = socket.and_then(|socket| {
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(backlog)
        });
        match bound {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

/// Descriptors the gateway holds besides its connections: the listener, the store's files and
/// connections, the journal's segments, the runtime's own (epoll, eventfd), logs.
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// Raises the soft limit on open descriptors to the hard limit, as a server that holds one
/// descriptor per client connection (and, in the gateway, one per upstream call) must: the
/// soft limit a shell or systemd hands out (often 1,024) is there for programs that never need
/// more, and would fail calls with "too many open files" at about 500 held streams. Where the
/// hard limit is unlimited, the kernel's own ceiling (`/proc/sys/fs/nr_open`) is taken. Logs
/// what it did; returns the soft limit now in force (`None`: unlimited).
pub fn raise_descriptor_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let ceiling = limit.maximum.or_else(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
    });
    let (Some(current), Some(ceiling)) = (limit.current, ceiling) else {
        return limit.current;
    };
    if current >= ceiling {
        return Some(current);
    }
    let raised = Rlimit {
        current: Some(ceiling),
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::info!(from = current, to = ceiling, "descriptor limit raised");
            Some(ceiling)
        }
        Err(e) => {
            tracing::warn!(limit = current, error = %e, "could not raise the descriptor limit");
            Some(current)
        }
    }
}

/// Warns when a descriptor `limit` cannot hold `max_connections` connections of
/// `per_connection` descriptors each (the gateway's: two, the client's socket and its upstream
/// call's; the mock upstream's: one) besides [`RESERVED_DESCRIPTORS`].
pub fn warn_if_descriptors_short(limit: Option<u64>, max_connections: usize, per_connection: u64) {
    let needed = (max_connections as u64)
        .saturating_mul(per_connection)
        .saturating_add(RESERVED_DESCRIPTORS);
    if let Some(n) = limit.filter(|&n| n < needed) {
        tracing::warn!(
            limit = n,
            max_connections,
            "the descriptor limit holds about {} connections at {per_connection} descriptors \
             each, fewer than limits.max_connections; beyond that, connections wait to be \
             accepted and calls fail with \"too many open files\". Raise the hard limit \
             (ulimit -Hn, systemd LimitNOFILE=) to at least {needed}",
            n.saturating_sub(RESERVED_DESCRIPTORS) / per_connection.max(1)
        );
    }
}

/// The accept loop. At most `limits.max_connections` connections are open; one accepted
/// beyond that is closed at once. Each is served by hyper's HTTP/1 with keep-alive and a
/// header read timeout (which also bounds a kept-alive connection's wait for its next
/// request). When `stop` resolves the listener closes, every connection is told to finish
/// its request in flight and close, and after [`DRAIN_DEADLINE`] the rest are dropped.
pub async fn serve<F>(
    listener: TcpListener,
    filter: F,
    limits: &Limits,
    stop: impl Future<Output = ()>,
) where
    F: warp::Filter<Extract = (warp::reply::Response,), Error = warp::Rejection>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(
            (limits.header_read_timeout_ms > 0)
                .then(|| Duration::from_millis(limits.header_read_timeout_ms)),
        );
    let service = TowerToHyperService::new(warp::service(filter));
    let graceful = GracefulShutdown::new();
    let connections = TaskTracker::new();
    let drop_all = CancellationToken::new();
    metrics::counter!("tollgate_http_connections_refused_total").increment(0);
    metrics::gauge!("tollgate_http_connections_open").increment(0.0);

    let mut stop = std::pin::pin!(stop);
    loop {
        let stream = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Most likely out of file descriptors: give the open ones time to close.
                    tracing::error!(error = %e, "accept failed");
                    tokio::select! {
                        _ = &mut stop => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!("tollgate_http_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let open = OpenConnection::new(permit);
        let conn = graceful.watch(http1.serve_connection(TokioIo::new(stream), service.clone()));
        let drop_all = drop_all.clone();
        connections.spawn(async move {
            let _open = open;
            tokio::select! {
                result = conn => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "connection closed with an error");
                    }
                }
                _ = drop_all.cancelled() => {}
            }
        });
    }

    drop(listener);
    if tokio::time::timeout(DRAIN_DEADLINE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            deadline_secs = DRAIN_DEADLINE.as_secs(),
            "connections still open after the drain deadline; dropping them"
        );
        drop_all.cancel();
    }
    connections.close();
    connections.wait().await;
}

/// Errors of one incoming connection, not of the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// An open client connection: holds its slot under `max_connections` and counts in the
/// `tollgate_http_connections_open` gauge until dropped.
struct OpenConnection {
    _permit: OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        metrics::gauge!("tollgate_http_connections_open").increment(1.0);
        OpenConnection { _permit: permit }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        metrics::gauge!("tollgate_http_connections_open").decrement(1.0);
    }
}
