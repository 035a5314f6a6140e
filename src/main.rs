//! The `tollgate` command line. Everything it runs lives in the library.

#[global_allocator]
static GLOBAL: tollgate::allocator::Allocator = tollgate::allocator::Allocator;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpListener;
use tollgate::config::{Config, LogFormat};
use tollgate::mock::MockOptions;

#[derive(Parser)]
#[command(name = "tollgate", version, about = "A prepaid LLM API gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, default_value = "config/tollgate.toml")]
        config: PathBuf,
        /// Overrides `listen` from the config.
        #[arg(long)]
        listen: Option<String>,
        /// Embedded store, an in-process mock upstream, and a funded demo account.
        #[arg(long)]
        demo: bool,
    },
    /// Run a mock OpenAI-compatible upstream.
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: String,
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        #[arg(long, default_value_t = 16)]
        chunks: u64,
        #[arg(long, default_value_t = 0)]
        chunk_interval_ms: u64,
        /// Stamp each streamed content chunk with the time it was sent (`mock_sent_us`, wall
        /// clock in µs), for a client measuring each chunk's transit.
        #[arg(long)]
        stamp_chunks: bool,
        /// Send each streamed answer whole, in one write, as from behind a buffering proxy.
        #[arg(long)]
        burst: bool,
    },
    /// Operate a running gateway through its admin API.
    Admin(tollgate::admin_cli::AdminArgs),
}

fn init_logging(format: LogFormat) {
    // ractor wraps every actor's life in an `info` span: at the default level each account
    // actor would keep one open (about 400 bytes) and enter it on every message. Its
    // warnings and errors still show.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ractor=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn terminated() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

#[allow(clippy::print_stdout)]
async fn serve(config_path: PathBuf, listen: Option<String>, demo: bool) -> anyhow::Result<()> {
    let mut config = if demo && !config_path.exists() {
        Config::from_toml("admin_token = \"demo-admin-token\"")?
    } else {
        Config::load(&config_path).with_context(|| format!("loading {}", config_path.display()))?
    };
    if let Some(l) = listen {
        config.listen = l;
    }
    init_logging(config.log_format);
    // Two descriptors a connection: the client's, and its upstream call's.
    let descriptors = tollgate::server::raise_descriptor_limit();
    tollgate::server::warn_if_descriptors_short(descriptors, config.limits.max_connections, 2);
    if demo {
        let mock = TcpListener::bind("127.0.0.1:0").await?;
        tollgate::demo::configure(&mut config, mock.local_addr()?);
        tokio::spawn(tollgate::mock::serve(
            mock,
            MockOptions {
                chunk_interval: Duration::from_millis(20),
                ..Default::default()
            },
            std::future::pending(),
        ));
    }
    if config.admin_token == "change-me" {
        tracing::warn!("admin_token is the sample value `change-me`; set TOLLGATE_ADMIN_TOKEN");
    }
    let listener = tollgate::server::bind(&config.listen, config.limits.listen_backlog)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let admin_token = config.admin_token.clone();
    let gateway = tollgate::start(listener, config).await?;
    if demo {
        let (account, key) = tollgate::demo::seed(gateway.app())
            .await
            .map_err(|e| anyhow::anyhow!("seeding the demo account: {e}"))?;
        let addr = gateway.addr;
        println!("Tollgate demo on http://{addr}  (mock upstream, embedded SQLite)");
        println!("demo account {account}, API key (shown once): {key}");
        println!("admin token: {admin_token}");
        println!();
        println!(
            "curl -s http://{addr}/v1/chat/completions -H 'Authorization: Bearer {key}' \\\n  -H 'Content-Type: application/json' \\\n  -d '{{\"model\":\"gpt-4o-mini\",\"messages\":[{{\"role\":\"user\",\"content\":\"hello tollgate\"}}]}}' -i"
        );
        println!("curl -s http://{addr}/admin/accounts/{account} -H 'Authorization: Bearer {admin_token}'");
    }
    let app_stopped = async {
        tokio::select! {
            _ = terminated() => false,
            _ = gateway.app().system.stopped() => true,
        }
    };
    let gave_up = app_stopped.await;
    tracing::info!("shutting down: draining requests, then the ledger");
    gateway.shutdown().await;
    if gave_up {
        anyhow::bail!("the supervisor tree gave up");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            listen,
            demo,
        } => serve(config, listen, demo).await,
        Command::MockUpstream {
            listen,
            latency_ms,
            chunks,
            chunk_interval_ms,
            stamp_chunks,
            burst,
        } => {
            init_logging(LogFormat::Text);
            // The mock serves load tests: the same backlog and connection limit as the
            // gateway's defaults, and as many descriptors as the machine lets it have.
            let limits = tollgate::config::Limits::default();
            let descriptors = tollgate::server::raise_descriptor_limit();
            tollgate::server::warn_if_descriptors_short(descriptors, limits.max_connections, 1);
            let backlog = limits.listen_backlog;
            let listener = tollgate::server::bind(&listen, backlog)
                .await
                .with_context(|| format!("binding {listen}"))?;
            tracing::info!(addr = %listener.local_addr()?, "mock upstream listening");
            let options = MockOptions {
                latency: Duration::from_millis(latency_ms),
                chunks,
                chunk_interval: Duration::from_millis(chunk_interval_ms),
                stamp_chunks,
                burst,
            };
            tollgate::mock::serve(listener, options, terminated()).await;
            Ok(())
        }
        Command::Admin(args) => std::process::exit(tollgate::admin_cli::run(args).await),
    }
}
