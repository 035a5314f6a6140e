//! Configuration: a TOML file, with `DATABASE_URL` and `TOLLGATE_*` variables on top.

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tollgate_actors::journal::JournalSync;
use tollgate_actors::money::{Price, PriceError};
use tollgate_actors::provider::ProviderSpec;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default = "default_database_url")]
    pub database_url: String,
    pub admin_token: String,
    #[serde(default)]
    pub log_format: LogFormat,
    #[serde(default)]
    pub providers: Vec<ProviderConfig>,
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub ledger: LedgerConfig,
    #[serde(default)]
    pub accounts: AccountsConfig,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    #[serde(default = "default_kind")]
    pub kind: String,
    pub base_url: String,
    /// Name of the environment variable holding the upstream API key.
    pub api_key_env: Option<String>,
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// A PEM file of root certificates to trust for this provider's HTTPS besides Mozilla's,
    /// for a server whose certificate a private CA signed.
    pub ca_file: Option<std::path::PathBuf>,
    /// The HTTP proxy to reach this provider through: `http://[user:password@]host:port`, or
    /// `"direct"` for none. Unset: `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` and `NO_PROXY`
    /// from the environment decide, as for curl.
    pub proxy: Option<String>,
    /// Deadline for the upstream's response headers, and for a whole non-streamed body.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Longest silence allowed between two chunks of a stream.
    #[serde(default = "default_stream_idle_timeout_ms")]
    pub stream_idle_timeout_ms: u64,
    /// How long an upstream connection is kept open between calls.
    #[serde(default = "default_idle_connection_timeout_ms")]
    pub idle_connection_timeout_ms: u64,
    /// Calls a minute the upstream takes (its rate limit for this key); unset, no limit. A call
    /// over it is answered 429 with when to retry, without reaching the upstream.
    pub requests_per_minute: Option<std::num::NonZeroU32>,
    /// Tokens a minute the upstream takes; unset, no limit. A call counts its prompt's
    /// estimate (a token per 4 bytes of the request) and the most its answer may use.
    pub tokens_per_minute: Option<std::num::NonZeroU32>,
    /// More attempts at this provider after an attempt that failed in a way that may pass (it
    /// could not be reached, timed out, or answered 429 or 5xx), before the model's next route
    /// (docs/billing.md, "Retries and failover").
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// The wait before the first retry; each later one waits twice as long as the one before.
    /// Half of each wait is random, so that calls that failed together do not retry together.
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// The longest the gateway waits to retry here: a 429 whose `retry-after` asks for longer
    /// is not retried at this provider.
    #[serde(default = "default_retry_max_wait_ms")]
    pub retry_max_wait_ms: u64,
    /// A provider that failed 5 calls in a row is `down`: while a model has another route,
    /// its calls skip this provider until this long after its last failure, then one call
    /// tries it again.
    #[serde(default = "default_down_cooldown_ms")]
    pub down_cooldown_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub id: String,
    pub provider: String,
    pub upstream_model: String,
    /// USDT per one million input tokens, as a decimal string.
    pub input_per_mtok: String,
    pub output_per_mtok: String,
    /// The model's own output limit: the worst case when a request sets no max_tokens.
    #[serde(default = "default_max_output_tokens")]
    pub max_output_tokens: u64,
    /// Where a call goes, in order, when every attempt at the routes before failed in a way
    /// that may pass elsewhere. The client pays the model's price whichever route answers.
    #[serde(default)]
    pub fallbacks: Vec<RouteConfig>,
}

/// A model's fallback: another provider, or another upstream model, or both.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub provider: String,
    /// The model's name at that provider; unset, the model's own `upstream_model`.
    pub upstream_model: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Open client connections at most; one accepted beyond it is closed at once.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections the kernel may hold for the listener before they are accepted (the
    /// `listen(2)` backlog; the kernel caps it at `net.core.somaxconn`). Beyond it, a new
    /// connection's SYN is dropped and its client waits a second or more to try again.
    #[serde(default = "default_listen_backlog")]
    pub listen_backlog: u32,
    /// A request line and headers must arrive within this long. It also bounds how long a
    /// kept-alive connection may sit idle waiting for its next request.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// A request body must arrive whole within this long after its headers; else 408.
    #[serde(default = "default_body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// The most of an upstream's answer held at once: a non-streamed answer, or one event of
    /// a stream. A larger one ends the call with 502 (docs/billing.md).
    #[serde(default = "default_max_upstream_answer_bytes")]
    pub max_upstream_answer_bytes: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// Most records in one store transaction.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Pause before a shipment of journaled records to the store, to gather more of them into
    /// one transaction (a barrier or a credit ships at once). 0: ship as soon as the previous
    /// shipment is done.
    #[serde(default = "default_ship_interval_ms", alias = "flush_interval_ms")]
    pub ship_interval_ms: u64,
    /// Records allowed to wait for the store (while it is slow or unreachable); beyond it new
    /// requests get 503.
    #[serde(default = "default_max_buffer")]
    pub max_buffer: usize,
    /// Where the charge journal lives. Default: beside a SQLite database file
    /// (`<file>.journal`), otherwise `tollgate-journal` in the working directory.
    #[serde(default)]
    pub journal_dir: Option<PathBuf>,
    /// `write`: a charge is acknowledged once written to the journal (survives a process
    /// crash). `fsync`: once synced to disk as well (survives a machine crash).
    #[serde(default)]
    pub journal_sync: JournalSync,
    /// The size of a journal segment: each is allocated on disk at this size when it is
    /// opened, and closed (cut to its records) when the next record would not fit.
    #[serde(default = "default_segment_bytes")]
    pub journal_segment_bytes: u64,
    /// How long a stopping gateway keeps shipping to the store; what is left stays in the
    /// journal and is shipped at the next start.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsConfig {
    /// An account actor with no reservations stops after this long without messages.
    #[serde(default = "default_idle_secs")]
    pub idle_secs: u64,
}

/// Every field at its default, with no name and no URL: for code that builds a provider and
/// sets those (`ProviderConfig { name, base_url, ..Default::default() }`).
impl Default for ProviderConfig {
    fn default() -> Self {
        ProviderConfig {
            name: String::new(),
            kind: default_kind(),
            base_url: String::new(),
            api_key_env: None,
            max_concurrency: default_max_concurrency(),
            connect_timeout_ms: default_connect_timeout_ms(),
            ca_file: None,
            proxy: None,
            request_timeout_ms: default_request_timeout_ms(),
            stream_idle_timeout_ms: default_stream_idle_timeout_ms(),
            idle_connection_timeout_ms: default_idle_connection_timeout_ms(),
            requests_per_minute: None,
            tokens_per_minute: None,
            retries: default_retries(),
            retry_backoff_ms: default_retry_backoff_ms(),
            retry_max_wait_ms: default_retry_max_wait_ms(),
            down_cooldown_ms: default_down_cooldown_ms(),
        }
    }
}

/// Every field at its default, with empty names and prices, as for [`ProviderConfig`].
impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            id: String::new(),
            provider: String::new(),
            upstream_model: String::new(),
            input_per_mtok: String::new(),
            output_per_mtok: String::new(),
            max_output_tokens: default_max_output_tokens(),
            fallbacks: Vec::new(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: default_max_body_bytes(),
            max_connections: default_max_connections(),
            listen_backlog: default_listen_backlog(),
            header_read_timeout_ms: default_header_read_timeout_ms(),
            body_read_timeout_ms: default_body_read_timeout_ms(),
            max_upstream_answer_bytes: default_max_upstream_answer_bytes(),
        }
    }
}
impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            max_batch: default_max_batch(),
            ship_interval_ms: default_ship_interval_ms(),
            max_buffer: default_max_buffer(),
            journal_dir: None,
            journal_sync: JournalSync::default(),
            journal_segment_bytes: default_segment_bytes(),
            drain_timeout_ms: default_drain_timeout_ms(),
        }
    }
}
impl Default for AccountsConfig {
    fn default() -> Self {
        AccountsConfig {
            idle_secs: default_idle_secs(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".to_owned()
}
fn default_database_url() -> String {
    "sqlite://data/tollgate.db".to_owned()
}
fn default_kind() -> String {
    "openai".to_owned()
}
fn default_max_concurrency() -> usize {
    1024
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_request_timeout_ms() -> u64 {
    120_000
}
fn default_stream_idle_timeout_ms() -> u64 {
    120_000
}
fn default_idle_connection_timeout_ms() -> u64 {
    90_000
}
fn default_retries() -> u32 {
    1
}
fn default_retry_backoff_ms() -> u64 {
    200
}
fn default_retry_max_wait_ms() -> u64 {
    2_000
}
fn default_down_cooldown_ms() -> u64 {
    5_000
}
fn default_max_output_tokens() -> u64 {
    16_384
}
fn default_listen_backlog() -> u32 {
    4096
}
fn default_max_body_bytes() -> usize {
    4 * 1024 * 1024
}
fn default_max_upstream_answer_bytes() -> usize {
    32 * 1024 * 1024
}
fn default_max_connections() -> usize {
    10_000
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}
fn default_body_read_timeout_ms() -> u64 {
    30_000
}
fn default_max_batch() -> usize {
    4096
}
fn default_max_buffer() -> usize {
    100_000
}
fn default_ship_interval_ms() -> u64 {
    10
}
fn default_segment_bytes() -> u64 {
    16 << 20
}
fn default_drain_timeout_ms() -> u64 {
    10_000
}

impl Config {
    /// The charge journal's directory (see [`LedgerConfig::journal_dir`]).
    pub fn journal_dir(&self) -> PathBuf {
        if let Some(dir) = &self.ledger.journal_dir {
            return dir.clone();
        }
        let file = self
            .database_url
            .strip_prefix("sqlite://")
            .or_else(|| self.database_url.strip_prefix("sqlite:"))
            .map(|rest| rest.split('?').next().unwrap_or(rest))
            .filter(|path| !path.is_empty() && !path.starts_with(":memory:"));
        match file {
            Some(path) => PathBuf::from(format!("{path}.journal")),
            None => PathBuf::from("tollgate-journal"),
        }
    }
}
fn default_idle_secs() -> u64 {
    300
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("model `{model}`: {source}")]
    Price {
        model: String,
        #[source]
        source: PriceError,
    },
    #[error("model `{model}` names provider `{provider}`, which is not configured")]
    UnknownProvider { model: String, provider: String },
    #[error("model `{model}` has route {provider} / {upstream_model} twice")]
    DuplicateRoute {
        model: String,
        provider: String,
        upstream_model: String,
    },
    #[error("{what} `{name}` is configured twice")]
    Duplicate { what: &'static str, name: String },
    #[error(
        "provider `{name}` has kind `{kind}`; this build speaks `openai`, `openai-compatible` and `anthropic`"
    )]
    UnsupportedKind { name: String, kind: String },
    #[error("provider `{name}`: base_url `{url}` is not an http:// or https:// URL")]
    BaseUrl { name: String, url: String },
    #[error("provider `{name}`: {reason}")]
    Proxy { name: String, reason: String },
    #[error("provider `{name}`: ca_file {path}: {reason}")]
    CaFile {
        name: String,
        path: std::path::PathBuf,
        reason: String,
    },
}

/// Everything but the proxy URL, which may carry a password.
impl std::fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("api_key_env", &self.api_key_env)
            .field("max_concurrency", &self.max_concurrency)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("ca_file", &self.ca_file)
            .field("proxy", &self.proxy.as_ref().map(|_| "(set)"))
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("stream_idle_timeout_ms", &self.stream_idle_timeout_ms)
            .field(
                "idle_connection_timeout_ms",
                &self.idle_connection_timeout_ms,
            )
            .field("requests_per_minute", &self.requests_per_minute)
            .field("tokens_per_minute", &self.tokens_per_minute)
            .field("retries", &self.retries)
            .field("retry_backoff_ms", &self.retry_backoff_ms)
            .field("retry_max_wait_ms", &self.retry_max_wait_ms)
            .field("down_cooldown_ms", &self.down_cooldown_ms)
            .finish()
    }
}

fn proxy_for(p: &ProviderConfig) -> Result<Option<tollgate_actors::provider::Proxy>, ConfigError> {
    tollgate_actors::provider::proxy_for(&p.base_url, p.proxy.as_deref()).map_err(|reason| {
        ConfigError::Proxy {
            name: p.name.clone(),
            reason,
        }
    })
}

/// A model as the request path sees it.
#[derive(Clone, Debug)]
pub struct Model {
    pub id: String,
    /// Where its calls go: its own provider and upstream model first, then its fallbacks in
    /// order. Never empty.
    pub routes: Vec<Route>,
    pub price: Price,
    pub input_per_mtok: String,
    pub output_per_mtok: String,
    pub max_output_tokens: u64,
}

/// One place a model's calls can go.
#[derive(Clone, Debug)]
pub struct Route {
    pub provider: String,
    pub upstream_model: String,
    /// The API its provider speaks.
    pub wire: tollgate_actors::provider::Wire,
    /// Its metric handles (labelled with the model and this provider); set when the gateway
    /// starts, after the metrics recorder exists.
    pub meters: Option<std::sync::Arc<crate::telemetry::ModelMeters>>,
}

impl Model {
    /// The model's own provider (its first route's).
    pub fn provider(&self) -> &str {
        self.routes.first().map_or("", |r| r.provider.as_str())
    }
}

impl Config {
    /// Reads `path` (if it exists), then the environment: `DATABASE_URL`, and `TOLLGATE_*`
    /// for top-level keys (`TOLLGATE_ADMIN_TOKEN`, `TOLLGATE_LISTEN`, …).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Figment::new()
            .merge(Toml::file(path))
            .merge(Env::prefixed("TOLLGATE_").only(&[
                "admin_token",
                "listen",
                "log_format",
                "database_url",
            ]))
            .merge(Env::raw().only(&["database_url"]))
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Figment::new()
            .merge(Toml::string(text))
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))
    }

    /// The models, checked against the providers.
    pub fn catalog(&self) -> Result<HashMap<String, Model>, ConfigError> {
        let mut providers = HashMap::new();
        for p in &self.providers {
            let Some(wire) = tollgate_actors::provider::Wire::of(&p.kind) else {
                return Err(ConfigError::UnsupportedKind {
                    name: p.name.clone(),
                    kind: p.kind.clone(),
                });
            };
            if tollgate_actors::provider::completions_uri(&p.base_url).is_none() {
                return Err(ConfigError::BaseUrl {
                    name: p.name.clone(),
                    url: p.base_url.clone(),
                });
            }
            if let Some(path) = &p.ca_file {
                tollgate_actors::provider::read_roots(path).map_err(|reason| {
                    ConfigError::CaFile {
                        name: p.name.clone(),
                        path: path.clone(),
                        reason,
                    }
                })?;
            }
            proxy_for(p)?;
            if providers.insert(p.name.as_str(), wire).is_some() {
                return Err(ConfigError::Duplicate {
                    what: "provider",
                    name: p.name.clone(),
                });
            }
        }
        let mut out = HashMap::new();
        for m in &self.models {
            let mut routes: Vec<Route> = Vec::with_capacity(1 + m.fallbacks.len());
            let fallbacks = m.fallbacks.iter().map(|f| {
                (
                    &f.provider,
                    f.upstream_model.as_ref().unwrap_or(&m.upstream_model),
                )
            });
            for (provider, upstream_model) in
                std::iter::once((&m.provider, &m.upstream_model)).chain(fallbacks)
            {
                let Some(&wire) = providers.get(provider.as_str()) else {
                    return Err(ConfigError::UnknownProvider {
                        model: m.id.clone(),
                        provider: provider.clone(),
                    });
                };
                if routes
                    .iter()
                    .any(|r| &r.provider == provider && &r.upstream_model == upstream_model)
                {
                    return Err(ConfigError::DuplicateRoute {
                        model: m.id.clone(),
                        provider: provider.clone(),
                        upstream_model: upstream_model.clone(),
                    });
                }
                routes.push(Route {
                    provider: provider.clone(),
                    upstream_model: upstream_model.clone(),
                    wire,
                    meters: None,
                });
            }
            let price = Price::parse(&m.input_per_mtok, &m.output_per_mtok).map_err(|source| {
                ConfigError::Price {
                    model: m.id.clone(),
                    source,
                }
            })?;
            let model = Model {
                id: m.id.clone(),
                routes,
                price,
                input_per_mtok: m.input_per_mtok.clone(),
                output_per_mtok: m.output_per_mtok.clone(),
                max_output_tokens: m.max_output_tokens,
            };
            if out.insert(m.id.clone(), model).is_some() {
                return Err(ConfigError::Duplicate {
                    what: "model",
                    name: m.id.clone(),
                });
            }
        }
        Ok(out)
    }

    /// The providers as the actors take them; each one's proxy resolved (see [`Self::catalog`],
    /// which checks them first).
    pub fn provider_specs(&self) -> Result<Vec<ProviderSpec>, ConfigError> {
        self.providers
            .iter()
            .map(|p| {
                Ok(ProviderSpec {
                    name: p.name.clone(),
                    kind: p.kind.clone(),
                    base_url: p.base_url.trim_end_matches('/').to_owned(),
                    api_key: p.api_key_env.as_ref().and_then(|v| std::env::var(v).ok()),
                    max_concurrency: p.max_concurrency.max(1),
                    connect_timeout: Duration::from_millis(p.connect_timeout_ms),
                    ca_file: p.ca_file.clone(),
                    request_timeout: Duration::from_millis(p.request_timeout_ms),
                    proxy: proxy_for(p)?,
                    idle_connection_timeout: Duration::from_millis(
                        p.idle_connection_timeout_ms.max(1),
                    ),
                    requests_per_minute: p.requests_per_minute,
                    tokens_per_minute: p.tokens_per_minute,
                    retries: p.retries,
                    retry_backoff: Duration::from_millis(p.retry_backoff_ms),
                    retry_max_wait: Duration::from_millis(p.retry_max_wait_ms),
                    down_cooldown: Duration::from_millis(p.down_cooldown_ms),
                    stream_idle_timeout: Duration::from_millis(p.stream_idle_timeout_ms),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
admin_token = "t"
[[providers]]
name = "a"
base_url = "http://127.0.0.1:9/v1"
proxy = "direct"
[[providers]]
name = "b"
base_url = "http://127.0.0.1:9/v1"
proxy = "direct"
retries = 0
[[models]]
id = "m"
provider = "a"
upstream_model = "up"
input_per_mtok = "1"
output_per_mtok = "1"
"#;

    fn routes(fallbacks: &str) -> Result<Vec<(String, String)>, ConfigError> {
        let config = Config::from_toml(&format!("{BASE}fallbacks = {fallbacks}\n"))?;
        let catalog = config.catalog()?;
        Ok(catalog
            .get("m")
            .map(|m| {
                m.routes
                    .iter()
                    .map(|r| (r.provider.clone(), r.upstream_model.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn pair(provider: &str, model: &str) -> (String, String) {
        (provider.to_owned(), model.to_owned())
    }

    #[test]
    fn a_models_routes_are_its_own_then_its_fallbacks_in_order() -> Result<(), ConfigError> {
        assert_eq!(routes("[]")?, [pair("a", "up")]);
        assert_eq!(
            routes(r#"[{ provider = "b" }, { provider = "a", upstream_model = "other" }]"#)?,
            [pair("a", "up"), pair("b", "up"), pair("a", "other")]
        );
        Ok(())
    }

    #[test]
    fn a_fallback_to_nowhere_or_to_the_same_place_is_refused() {
        assert!(matches!(
            routes(r#"[{ provider = "c" }]"#),
            Err(ConfigError::UnknownProvider { provider, .. }) if provider == "c"
        ));
        assert!(matches!(
            routes(r#"[{ provider = "a", upstream_model = "up" }]"#),
            Err(ConfigError::DuplicateRoute { .. })
        ));
        assert!(matches!(
            routes(r#"[{ provider = "b" }, { provider = "b" }]"#),
            Err(ConfigError::DuplicateRoute { .. })
        ));
        assert!(matches!(
            routes(r#"[{ provider = "b", model = "x" }]"#),
            Err(ConfigError::Load(_))
        ));
    }

    #[test]
    fn retries_default_to_one_and_reach_the_providers_spec() -> Result<(), ConfigError> {
        let config = Config::from_toml(BASE)?;
        let specs = config.provider_specs()?;
        let got: Vec<_> = specs
            .iter()
            .map(|s| {
                (
                    s.retries,
                    s.retry_backoff,
                    s.retry_max_wait,
                    s.down_cooldown,
                )
            })
            .collect();
        let (backoff, most, rest) = (
            Duration::from_millis(200),
            Duration::from_secs(2),
            Duration::from_secs(5),
        );
        assert_eq!(got, [(1, backoff, most, rest), (0, backoff, most, rest)]);
        Ok(())
    }
}
