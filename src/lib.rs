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
pub mod allocator;
pub mod config;
pub mod demo;
pub mod error;
pub mod http;
pub mod mock;
pub mod server;
pub mod telemetry;
pub mod tokens;

use crate::config::Config;
use crate::http::App;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tollgate_actors::keys::KeyRing;
use tollgate_actors::restart::RestartPolicy;
use tollgate_actors::supervisor::LedgerOptions;
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
        ledger: LedgerOptions {
            journal_dir: config.journal_dir(),
            journal_sync: config.ledger.journal_sync,
            segment_bytes: config.ledger.journal_segment_bytes,
            max_batch: config.ledger.max_batch,
            ship_interval: Duration::from_millis(config.ledger.ship_interval_ms),
            max_buffer: config.ledger.max_buffer,
            drain_timeout: Duration::from_millis(config.ledger.drain_timeout_ms),
        },
        account_idle_after: Duration::from_secs(config.accounts.idle_secs),
        policy: RestartPolicy::default(),
        providers: config.provider_specs()?,
    })
    .await?;
    let keys = KeyRing::load(store.clone()).await?;
    let addr = listener.local_addr()?;
    let app = Arc::new(App::new(config, catalog, keys, system, store));
    let (stop_http, stopped) = oneshot::channel::<()>();
    let filter = http::filter(app.clone());
    let limits = app.config.limits.clone();
    let server = tokio::spawn(async move {
        server::serve(listener, filter, &limits, async move {
            let _ = stopped.await;
        })
        .await
    });
    tracing::info!(%addr, "tollgate listening");
    Ok(Gateway {
        addr,
        app,
        stop_http: Some(stop_http),
        server,
    })
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
