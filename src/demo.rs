//! `tollgate serve --demo`: the embedded store, an in-process mock upstream, and a funded demo
//! account with a fresh key, so that a first run needs nothing installed.

use crate::config::{Config, ModelConfig, ProviderConfig};
use crate::http::App;
use tollgate_actors::account::CreditRequest;
use tollgate_actors::keys::NewKey;
use tollgate_actors::store::EntryKind;
use tollgate_actors::Amount;

pub const DEMO_EMAIL: &str = "demo@tollgate.local";

/// Points the config at the mock upstream on `mock_addr` and serves two demo models from it.
pub fn configure(config: &mut Config, mock_addr: std::net::SocketAddr) {
    config.providers = vec![ProviderConfig {
        name: "mock".to_owned(),
        kind: "openai-compatible".to_owned(),
        base_url: format!("http://{mock_addr}/v1"),
        max_concurrency: 4096,
        connect_timeout_ms: 2_000,
        // In-process, on loopback: never through a proxy the environment may name.
        proxy: Some("direct".to_owned()),
        request_timeout_ms: 60_000,
        stream_idle_timeout_ms: 60_000,
        ..Default::default()
    }];
    config.models = vec![
        ModelConfig {
            id: "gpt-4o-mini".to_owned(),
            provider: "mock".to_owned(),
            upstream_model: "gpt-4o-mini".to_owned(),
            input_per_mtok: "0.15".to_owned(),
            output_per_mtok: "0.60".to_owned(),
            max_output_tokens: 16_384,
            ..Default::default()
        },
        ModelConfig {
            id: "gpt-4o".to_owned(),
            provider: "mock".to_owned(),
            upstream_model: "gpt-4o".to_owned(),
            input_per_mtok: "2.50".to_owned(),
            output_per_mtok: "10".to_owned(),
            max_output_tokens: 16_384,
            ..Default::default()
        },
    ];
}

/// Makes sure the demo account exists with money on it, and returns a new key for it.
pub async fn seed(app: &App) -> Result<(String, String), Box<dyn std::error::Error + Send + Sync>> {
    let account = match app.store.account_by_email(DEMO_EMAIL).await? {
        Some(a) => a,
        None => {
            let id = tollgate_actors::keys::random_id("acct_")?;
            app.store.create_account(&id, DEMO_EMAIL).await?
        }
    };
    // Idempotent: the demo grant is applied once per database.
    app.system
        .billing
        .credit(
            &account.id,
            CreditRequest {
                entry_id: format!("demo-grant:{}", account.id),
                kind: EntryKind::Adjustment,
                amount: Amount(10 * tollgate_actors::money::NANOS_PER_USDT),
                reason: Some("demo grant".to_owned()),
            },
        )
        .await?;
    let (_, key) = app
        .keys
        .create(
            &account.id,
            NewKey {
                name: "demo".to_owned(),
                ..Default::default()
            },
        )
        .await?;
    Ok((account.id, key))
}
