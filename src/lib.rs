//! Tollgate: a prepaid LLM API gateway.
//!
//! The binary (`src/main.rs`) only parses the command line. Everything else is here:
//! - [`config`]: the TOML config and the model catalog;
//! - [`http`]: the client API (`/v1/…`) and the admin API (`/admin/…`);
//! - [`error`]: the one mapping of errors to HTTP status and the OpenAI error shape;
//! - [`mock`]: a mock OpenAI-compatible upstream;
//! - [`tokens`]: token counting when an upstream reports none.
//!
//! Actors, money and the store live in the `tollgate-actors` crate. Tests start the gateway
//! with [`start`] on a `127.0.0.1:0` listener, or spawn the real binary.

pub mod admin_cli;
pub mod config;
pub mod demo;
pub mod error;
pub mod http;
pub mod mock;
pub mod telemetry;
pub mod tokens;

use crate::config::Config;
use crate::http::App;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tollgate_actors::keys::KeyRing;
use tollgate_actors::restart::RestartPolicy;
use tollgate_actors::{ActorSystem, Store, SystemConfig};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] tollgate_actors::store::StoreError),
    #[error("actor system failed to start: {0}")]
    Actors(#[from] ractor::SpawnErr),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error("the supervisor tree gave up (restart intensity exceeded)")]
    SupervisorGaveUp,
}

/// A running gateway.
pub struct Gateway {
    pub addr: SocketAddr,
    app: Arc<App>,
    stop_http: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<()>,
}

/// Connects the store, starts the actor system and serves HTTP on `listener`.
pub async fn start(listener: TcpListener, config: Config) -> Result<Gateway, ServeError> {
    let catalog = config.catalog()?;
    telemetry::prometheus();
    let store = Store::connect(&config.database_url).await?;
    let system = ActorSystem::start(SystemConfig {
        store: store.clone(),
        ledger_max_batch: config.ledger.max_batch,
        ledger_flush_interval: Duration::from_millis(config.ledger.flush_interval_ms),
        ledger_max_buffer: config.ledger.max_buffer,
        account_idle_after: Duration::from_secs(config.accounts.idle_secs),
        policy: RestartPolicy::default(),
        providers: config.provider_specs(),
    })
    .await?;
    let keys = KeyRing::load(store.clone()).await?;
    let addr = listener.local_addr()?;
    let app = Arc::new(App::new(config, catalog, keys, system, store));
    let (stop_http, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, app.clone(), stopped));
    tracing::info!(%addr, "tollgate listening");
    Ok(Gateway {
        addr,
        app,
        stop_http: Some(stop_http),
        server,
    })
}

/// How long shutdown lets open connections finish their requests and streams before it drops
/// the ones still open.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// The accept loop. At most `limits.max_connections` connections are open; one accepted
/// beyond that is closed at once. Each is served by hyper's HTTP/1 with keep-alive and a
/// header read timeout (which also bounds a kept-alive connection's wait for its next
/// request). When `stop` resolves the listener closes, every connection is told to finish
/// its request in flight and close, and after [`DRAIN_DEADLINE`] the rest are dropped.
async fn serve(listener: TcpListener, app: Arc<App>, stop: oneshot::Receiver<()>) {
    let limits = &app.config.limits;
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(
            (limits.header_read_timeout_ms > 0)
                .then(|| Duration::from_millis(limits.header_read_timeout_ms)),
        );
    let service = TowerToHyperService::new(warp::service(http::filter(app.clone())));
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

impl Gateway {
    pub fn app(&self) -> &App {
        &self.app
    }

    /// Stops accepting, lets in-flight requests and streams finish, then stops the actors
    /// (the ledger writer commits everything queued before it stops).
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop_http.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.server).await;
        self.app.relays.close();
        self.app.relays.wait().await;
        self.app.system.shutdown().await;
        self.app.store.close().await;
    }
}

/// Serves until `shutdown` resolves (or the supervisor tree gives up), then drains.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let gateway = start(listener, config).await?;
    let app = gateway.app.clone();
    let gave_up = tokio::select! {
        _ = shutdown => false,
        _ = app.system.stopped() => true,
    };
    gateway.shutdown().await;
    if gave_up {
        Err(ServeError::SupervisorGaveUp)
    } else {
        Ok(())
    }
}
