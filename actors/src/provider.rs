//! Provider actors: one per configured upstream. Each owns its upstream connections (a
//! [`Pool`]), its concurrency cap and its limits a minute, and hands out [`Lease`]s; a
//! request holds its lease (and so its slot under the cap) for as long as its upstream call
//! lasts, streaming included. The actor closes the pool's expired idle connections on a timer.
//!
//! The actor builds a [`Leaser`] when it starts and posts it on its [`Desk`]: request handlers
//! take leases there, without a message to the actor and back (two task wake-ups on the hot
//! path). A restarted actor posts a fresh leaser; leases of the old one stay valid until dropped.

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::upstream::Pool;

#[derive(Clone, Debug)]
pub struct ProviderSpec {
    pub name: String,
    pub kind: String,
    pub base_url: String,
    pub api_key: Option<String>,
    pub max_concurrency: usize,
    pub connect_timeout: Duration,
    /// A PEM file of root certificates to trust besides Mozilla's, for an upstream whose
    /// certificate a private CA signed.
    pub ca_file: Option<std::path::PathBuf>,
    /// Deadline for the upstream's response headers (and a whole non-streamed body).
    pub request_timeout: Duration,
    /// The HTTP proxy the provider's connections go through, if any ([`proxy_for`]).
    pub proxy: Option<Proxy>,
    /// How long an upstream connection is kept open between calls.
    pub idle_connection_timeout: Duration,
    /// Calls the upstream takes a minute, if it limits them.
    pub requests_per_minute: Option<NonZeroU32>,
    /// Tokens the upstream takes a minute, if it limits them: a call counts its prompt's
    /// estimate and the most its answer may use, as upstreams count it against such a limit.
    pub tokens_per_minute: Option<NonZeroU32>,
    /// More attempts at this provider after one that failed in a way that may pass.
    pub retries: u32,
    /// The wait before the first retry; doubled for each one after ([`Self::retry_wait`]).
    pub retry_backoff: Duration,
    /// The longest wait for a retry here: an upstream asking for longer is not retried.
    pub retry_max_wait: Duration,
    /// How long a `down` provider is skipped after its last failure, where a call has
    /// somewhere else to go ([`Desk::lease`]).
    pub down_cooldown: Duration,
    /// The longest silence allowed between two events of a stream.
    pub stream_idle_timeout: Duration,
}

/// The API a provider speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    /// OpenAI's chat completions (`openai`, `openai-compatible`): `{base_url}/chat/completions`,
    /// the key as `Authorization: Bearer`.
    OpenAi,
    /// Anthropic's Messages API (`anthropic`): `{base_url}/messages`, the key as `x-api-key`,
    /// with `anthropic-version`.
    Anthropic,
}

impl Wire {
    /// The wire of a provider `kind`, if this build speaks it.
    pub fn of(kind: &str) -> Option<Wire> {
        match kind {
            "openai" | "openai-compatible" => Some(Wire::OpenAi),
            "anthropic" => Some(Wire::Anthropic),
            _ => None,
        }
    }

    fn path(self) -> &'static str {
        match self {
            Wire::OpenAi => "chat/completions",
            Wire::Anthropic => "messages",
        }
    }
}

impl ProviderSpec {
    pub fn wire(&self) -> Wire {
        Wire::of(&self.kind).unwrap_or(Wire::OpenAi)
    }

    /// How long to wait before retry number `retry` (1 for the first): the backoff doubled
    /// for each retry after the first, half of it random, at most [`Self::retry_max_wait`];
    /// or the upstream's own `retry-after` where that is longer, and `None` (no retry) if
    /// the upstream asks for more than the most the gateway waits.
    pub fn retry_wait(&self, retry: u32, upstream_asks: Option<Duration>) -> Option<Duration> {
        self.retry_wait_with(retry, upstream_asks, getrandom::u64().unwrap_or(0))
    }

    fn retry_wait_with(
        &self,
        retry: u32,
        upstream_asks: Option<Duration>,
        random: u64,
    ) -> Option<Duration> {
        let full = self
            .retry_backoff
            .saturating_mul(1u32 << retry.saturating_sub(1).min(16));
        let half = full / 2;
        let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let jitter =
            Duration::from_nanos(random.checked_rem(spread.saturating_add(1)).unwrap_or(0));
        let asks = upstream_asks.unwrap_or_default();
        (asks <= self.retry_max_wait).then(|| (half + jitter).min(self.retry_max_wait).max(asks))
    }
}

/// An HTTP proxy: connections are tunnelled through it with CONNECT, for http:// upstreams as
/// well as https:// ones (curl would send an http:// request to the proxy whole instead; a
/// proxy that allows CONNECT only to port 443 refuses a plain upstream), and TLS to the
/// upstream runs end to end inside the tunnel.
#[derive(Clone, Debug)]
pub struct Proxy {
    /// `http://host:port/`, without the user and password.
    pub uri: http::Uri,
    /// `Proxy-Authorization` (Basic), from the proxy URL's user and password.
    pub authorization: Option<http::HeaderValue>,
}

/// The proxy for a provider at `base_url`. `setting` is the provider's own: `"direct"` for
/// none, or an `http://[user:password@]host:port` URL. Without one, the environment decides
/// as it does for curl: `HTTPS_PROXY` / `HTTP_PROXY` (by the upstream's scheme), `ALL_PROXY`,
/// and `NO_PROXY` for the hosts to reach directly. Only HTTP proxies are supported; the error
/// never repeats the URL (it may hold a password).
pub fn proxy_for(base_url: &str, setting: Option<&str>) -> Result<Option<Proxy>, String> {
    use hyper_util::client::proxy::matcher::Matcher;
    let target = completions_uri(base_url)
        .ok_or_else(|| "base_url is not an http:// or https:// URL".to_owned())?;
    let (matcher, source) = match setting {
        Some("direct") => return Ok(None),
        Some(url) => (Matcher::builder().all(url.to_owned()).build(), "proxy"),
        None => (
            Matcher::from_env(),
            "the environment's HTTPS_PROXY / HTTP_PROXY / ALL_PROXY",
        ),
    };
    let Some(intercept) = matcher.intercept(&target) else {
        return match setting {
            Some(_) => Err(
                "proxy is not a proxy URL (http://[user:password@]host:port, or \"direct\")"
                    .to_owned(),
            ),
            None => Ok(None),
        };
    };
    if intercept.uri().scheme_str() != Some("http") {
        return Err(format!(
            "{source} names a {} proxy; only http:// proxies are supported \
             (set the provider's proxy = \"direct\" to go without)",
            intercept.uri().scheme_str().unwrap_or("non-HTTP")
        ));
    }
    Ok(Some(Proxy {
        uri: intercept.uri().clone(),
        authorization: intercept.basic_auth().cloned().map(|mut auth| {
            auth.set_sensitive(true);
            auth
        }),
    }))
}

/// `{base_url}/chat/completions`, if `base_url` is an http:// or https:// URL with a host.
pub fn completions_uri(base_url: &str) -> Option<http::Uri> {
    endpoint_uri(base_url, Wire::OpenAi)
}

/// Where calls go on `wire`: `{base_url}/chat/completions` or `{base_url}/messages`, if
/// `base_url` is an http:// or https:// URL with a host.
pub fn endpoint_uri(base_url: &str, wire: Wire) -> Option<http::Uri> {
    let uri = format!("{}/{}", base_url.trim_end_matches('/'), wire.path())
        .parse::<http::Uri>()
        .ok()?;
    let usable = matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some();
    usable.then_some(uri)
}

/// The certificates in the PEM file at `path`: at least one, or why not.
pub fn read_roots(
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate in it".to_owned());
    }
    Ok(certs)
}

type HttpConnector = hyper_util::client::legacy::connect::HttpConnector;

/// What opens a provider's connections: `dial`, then TLS (ring) trusting `roots` for an
/// https:// upstream. HTTP/1.1 only: the pool drives each connection from the call using it
/// ([`crate::upstream`]), which HTTP/2's shared connections would not allow.
pub fn https_connector(
    dial: Dial,
    roots: rustls::RootCertStore,
) -> Result<hyper_rustls::HttpsConnector<Dial>, rustls::Error> {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(dial))
}
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a provider's connections are opened: a TCP connection to the upstream, or one to its
/// proxy with a CONNECT tunnel through it. Only a new connection comes here; pooled ones are
/// reused as they are.
#[derive(Clone)]
pub enum Dial {
    Direct(HttpConnector),
    Tunnel(hyper_util::client::legacy::connect::proxy::Tunnel<HttpConnector>),
}

impl tower_service::Service<http::Uri> for Dial {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        match self {
            Dial::Direct(c) => c.poll_ready(cx).map_err(Into::into),
            Dial::Tunnel(t) => t.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        match self {
            Dial::Direct(c) => {
                let connecting = c.call(dst);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
            Dial::Tunnel(t) => {
                // The tunnel asks for port 443 when the destination names none, whatever its
                // scheme: an http:// upstream on its default port must say 80.
                let connecting = t.call(with_default_port(dst));
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
        }
    }
}

/// `dst` with its scheme's default port written out, if it had none.
fn with_default_port(dst: http::Uri) -> http::Uri {
    let port = match dst.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        _ => return dst,
    };
    // `host()` keeps an IPv6 address's brackets, so `host:port` is well formed either way.
    let (Some(host), None) = (dst.host(), dst.port_u16()) else {
        return dst;
    };
    let Ok(authority) = format!("{host}:{port}").parse() else {
        return dst;
    };
    let mut parts = dst.clone().into_parts();
    parts.authority = Some(authority);
    http::Uri::from_parts(parts).unwrap_or(dst)
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProviderError {
    #[error("provider `{provider}` is at its concurrency limit ({limit})")]
    Saturated { provider: String, limit: usize },
    /// Over one of the provider's limits a minute; there is room again after `retry_after`.
    #[error("provider `{provider}` is at its limit of {limit} {what} a minute")]
    OverRate {
        provider: String,
        what: &'static str,
        limit: NonZeroU32,
        retry_after: Duration,
    },
    /// A call needing more tokens than the provider takes in a minute: it can never pass.
    #[error("this call may use {tokens} tokens (its prompt and max_tokens), more than provider `{provider}` takes in a minute ({limit}); lower max_tokens")]
    OverTokenLimit {
        provider: String,
        tokens: u64,
        limit: NonZeroU32,
    },
    #[error("provider `{0}` HTTP client could not be built")]
    Client(String),
    /// The provider is `down` and its cooldown has not passed: a call with another route to
    /// take is sent there instead.
    #[error("provider `{0}` is down (it failed its last calls)")]
    Resting(String),
}

/// Permission to make one upstream call, with everything needed to make it.
pub struct Lease {
    pub pool: Arc<Pool>,
    pub spec: Arc<ProviderSpec>,
    /// The path of the provider's endpoint ([`endpoint_uri`]; origin form, as the request
    /// line carries it), parsed once when the provider starts.
    pub endpoint_path: http::Uri,
    /// The key's header: `authorization: Bearer {api_key}`, or `x-api-key` for Anthropic;
    /// built once (and marked sensitive, so that it is never logged).
    pub auth: Option<(http::HeaderName, http::HeaderValue)>,
    pub wire: Wire,
    health: Arc<Health>,
    _permit: OwnedSemaphorePermit,
    _in_flight: InFlightGuard,
}

impl Lease {
    /// How the call went, as far as the provider is concerned: `false` for an upstream that
    /// failed, timed out, could not be reached or broke off (not for a client's own 4xx).
    pub fn report(&self, ok: bool) {
        self.health.record(ok);
    }
}

/// Outcomes of a provider's calls, written by the calls' leases, read by `Status`.
#[derive(Debug, Default)]
struct Health {
    consecutive_failures: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    last_failure_ms: std::sync::atomic::AtomicI64,
    /// When a call last went to the provider while it was `down`, to see whether it is back.
    last_probe_ms: std::sync::atomic::AtomicI64,
}

/// A provider is `down` after this many failures in a row.
const DOWN_AFTER: u64 = 5;

impl Health {
    fn record(&self, ok: bool) {
        if ok {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.successes.fetch_add(1, Ordering::Relaxed);
        } else {
            self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
            self.failures.fetch_add(1, Ordering::Relaxed);
            self.last_failure_ms
                .store(crate::store::now_ms(), Ordering::Relaxed);
        }
    }

    /// Whether a call with somewhere else to go should skip the provider: it is `down`, and
    /// its last failure (or the last call sent to see whether it is back) was less than
    /// `cooldown` ago. Once the cooldown has passed, one call is let through (the first to
    /// claim the probe), and the rest keep skipping it until that call has failed its own
    /// cooldown away, or succeeded and made the provider healthy again.
    fn resting(&self, cooldown: Duration) -> bool {
        if self.consecutive_failures.load(Ordering::Relaxed) < DOWN_AFTER {
            return false;
        }
        let now = crate::store::now_ms();
        let cooldown = i64::try_from(cooldown.as_millis()).unwrap_or(i64::MAX);
        let failed = self.last_failure_ms.load(Ordering::Relaxed);
        let probed = self.last_probe_ms.load(Ordering::Relaxed);
        if now.saturating_sub(failed.max(probed)) < cooldown {
            return true;
        }
        // The cooldown has passed: this call is the probe if no other claimed it first.
        self.last_probe_ms
            .compare_exchange(probed, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    }

    fn state(&self) -> &'static str {
        match self.consecutive_failures.load(Ordering::Relaxed) {
            0 if self.successes.load(Ordering::Relaxed) == 0 => "unknown",
            0 => "healthy",
            n if n < DOWN_AFTER => "degraded",
            _ => "down",
        }
    }
}

struct InFlightGuard {
    count: Arc<AtomicU64>,
    gauge: metrics::Gauge,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.gauge.decrement(1.0);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderStatus {
    pub name: String,
    pub kind: String,
    pub in_flight: u64,
    pub max_concurrency: usize,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub leases_granted: u64,
    pub leases_refused: u64,
    /// `unknown` (no call yet), `healthy`, `degraded` (recent failures) or `down`.
    pub health: &'static str,
    pub consecutive_failures: u64,
    pub calls_succeeded: u64,
    pub calls_failed: u64,
    /// Unix milliseconds of the last failure, if any.
    pub last_failure_ms: Option<i64>,
    /// Upstream connections open and waiting for a call.
    pub idle_connections: u64,
    /// Upstream connections opened since the actor (re)started.
    pub connections_opened: u64,
    /// Attempts at this provider that were a call's retry after a failed one.
    pub retries: u64,
    /// Calls that left this provider for their model's next route.
    pub failovers: u64,
}

pub enum ProviderMsg {
    Status(RpcReplyPort<ProviderStatus>),
    /// Close the idle connections that expired or that the upstream closed (on a timer).
    Prune,
}

impl crate::metered::Kind for ProviderMsg {
    const KIND: &'static str = "provider";
}

/// Where a provider actor posts its current [`Leaser`]. It also keeps the provider's limits a
/// minute, so that a restart of the actor does not refill them.
#[derive(Clone)]
pub struct Desk {
    leaser: Arc<RwLock<Option<Arc<Leaser>>>>,
    limits: Arc<RateLimits>,
    moves: Arc<Moves>,
}

/// Calls that tried this provider again, or left it for another route. Kept by the desk, so
/// that a restart of the actor does not reset them.
struct Moves {
    retries: AtomicU64,
    failovers: AtomicU64,
    retries_counter: metrics::Counter,
    failovers_counter: metrics::Counter,
}

impl Desk {
    pub fn new(spec: &ProviderSpec) -> Desk {
        Desk {
            leaser: Arc::default(),
            limits: Arc::new(RateLimits {
                requests: spec.requests_per_minute.map(Limit::per_minute),
                tokens: spec.tokens_per_minute.map(Limit::per_minute),
            }),
            moves: Arc::new(Moves {
                retries: AtomicU64::new(0),
                failovers: AtomicU64::new(0),
                retries_counter: metrics::counter!("tollgate_provider_retries_total", "provider" => spec.name.clone()),
                failovers_counter: metrics::counter!("tollgate_provider_failovers_total", "provider" => spec.name.clone()),
            }),
        }
    }

    /// A lease from the posted leaser, for a call that may use `tokens` (its prompt's estimate
    /// and the most its answer may use); `None` before the actor's first start. A call that
    /// has another route to take (`elsewhere`) is refused while the provider rests after
    /// failing ([`ProviderError::Resting`]); one that has not is always let try.
    pub fn lease(&self, tokens: u64, elsewhere: bool) -> Option<Result<Lease, ProviderError>> {
        let leaser = self
            .leaser
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()?;
        if elsewhere && leaser.health.resting(leaser.spec.down_cooldown) {
            return Some(Err(ProviderError::Resting(leaser.spec.name.clone())));
        }
        Some(leaser.lease(&self.limits, tokens))
    }

    /// Counts a call that tries this provider again after a failed attempt.
    pub fn count_retry(&self) {
        self.moves.retries.fetch_add(1, Ordering::Relaxed);
        self.moves.retries_counter.increment(1);
    }

    /// Counts a call that leaves this provider for the model's next route.
    pub fn count_failover(&self) {
        self.moves.failovers.fetch_add(1, Ordering::Relaxed);
        self.moves.failovers_counter.increment(1);
    }

    /// The counts of [`Self::count_retry`] and [`Self::count_failover`].
    pub fn moves(&self) -> (u64, u64) {
        (
            self.moves.retries.load(Ordering::Relaxed),
            self.moves.failovers.load(Ordering::Relaxed),
        )
    }

    fn post(&self, leaser: Arc<Leaser>) {
        *self.leaser.write().unwrap_or_else(|p| p.into_inner()) = Some(leaser);
    }
}

/// A provider's limits a minute. Each is a GCRA bucket (governor's) that holds a minute's
/// worth and refills evenly over the minute.
struct RateLimits {
    requests: Option<Limit>,
    tokens: Option<Limit>,
}

struct Limit {
    per_minute: NonZeroU32,
    bucket: DefaultDirectRateLimiter,
}

impl Limit {
    fn per_minute(per_minute: NonZeroU32) -> Limit {
        Limit {
            per_minute,
            bucket: RateLimiter::direct(Quota::per_minute(per_minute)),
        }
    }
}

impl RateLimits {
    /// Takes one request and `tokens` tokens from the buckets, or says why not. A call too
    /// large for the token limit ever to take is refused first, taking nothing. A call the
    /// token bucket refuses for now has taken its request already (GCRA gives nothing back):
    /// the request limit then errs on the side of the upstream.
    fn admit(&self, provider: &str, tokens: u64) -> Result<(), ProviderError> {
        let over =
            |limit: &Limit, what, not_until: governor::NotUntil<_>| ProviderError::OverRate {
                provider: provider.to_owned(),
                what,
                limit: limit.per_minute,
                retry_after: not_until.wait_time_from(limit.bucket.clock().now()),
            };
        // At least one token: a bucket cannot be asked for none.
        let n = u32::try_from(tokens.max(1)).ok().and_then(NonZeroU32::new);
        let tokens_limit = match (&self.tokens, n) {
            (Some(limit), Some(n)) if n <= limit.per_minute => Some((limit, n)),
            (Some(limit), _) => {
                return Err(ProviderError::OverTokenLimit {
                    provider: provider.to_owned(),
                    tokens,
                    limit: limit.per_minute,
                })
            }
            (None, _) => None,
        };
        if let Some(limit) = &self.requests {
            limit
                .bucket
                .check()
                .map_err(|n| over(limit, "requests", n))?;
        }
        if let Some((limit, n)) = tokens_limit {
            // Within the bucket's capacity (checked above), so the outer result is Ok.
            if let Ok(Err(not_until)) = limit.bucket.check_n(n) {
                return Err(over(limit, "tokens", not_until));
            }
        }
        Ok(())
    }
}

/// Everything needed to grant a lease: the client, the cap, the counters.
pub struct Leaser {
    spec: Arc<ProviderSpec>,
    pool: Arc<Pool>,
    endpoint_path: http::Uri,
    auth: Option<(http::HeaderName, http::HeaderValue)>,
    /// The spec's kind, read once.
    wire: Wire,
    permits: Arc<Semaphore>,
    in_flight: Arc<AtomicU64>,
    in_flight_gauge: metrics::Gauge,
    refused_counter: metrics::Counter,
    health: Arc<Health>,
    granted: AtomicU64,
    refused: AtomicU64,
}

impl Leaser {
    fn new(spec: ProviderSpec) -> Result<Leaser, ProviderError> {
        let failed = || ProviderError::Client(spec.name.clone());
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(spec.connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(false);
        let dial = match &spec.proxy {
            None => Dial::Direct(http),
            Some(proxy) => {
                let tunnel = hyper_util::client::legacy::connect::proxy::Tunnel::new(
                    proxy.uri.clone(),
                    http,
                );
                Dial::Tunnel(match &proxy.authorization {
                    Some(auth) => tunnel.with_auth(auth.clone()),
                    None => tunnel,
                })
            }
        };
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        if let Some(path) = &spec.ca_file {
            for cert in read_roots(path).map_err(|_| failed())? {
                roots.add(cert).map_err(|_| failed())?;
            }
        }
        let https = https_connector(dial, roots).map_err(|_| failed())?;
        let wire = spec.wire();
        let endpoint_uri = endpoint_uri(&spec.base_url, wire).ok_or_else(failed)?;
        // What the request line carries; the pool knows where to send it.
        let endpoint_path = endpoint_uri.path_and_query().map_or_else(
            || http::Uri::from_static("/"),
            |p| http::Uri::from(p.clone()),
        );
        let pool = Pool::new(
            https,
            endpoint_uri,
            spec.max_concurrency.min(1024),
            spec.idle_connection_timeout,
            metrics::counter!("tollgate_provider_connections_opened_total", "provider" => spec.name.clone()),
        )
        .ok_or_else(failed)?;
        let auth = match (&spec.api_key, wire) {
            (None, _) => None,
            (Some(key), wire) => {
                let (name, value) = match wire {
                    Wire::OpenAi => (http::header::AUTHORIZATION, format!("Bearer {key}")),
                    Wire::Anthropic => (http::HeaderName::from_static("x-api-key"), key.clone()),
                };
                let mut value = http::HeaderValue::try_from(value).map_err(|_| failed())?;
                value.set_sensitive(true);
                Some((name, value))
            }
        };
        metrics::gauge!("tollgate_provider_max_concurrency", "provider" => spec.name.clone())
            .set(spec.max_concurrency as f64);
        Ok(Leaser {
            in_flight_gauge: metrics::gauge!("tollgate_provider_in_flight", "provider" => spec.name.clone()),
            refused_counter: metrics::counter!("tollgate_provider_leases_refused_total", "provider" => spec.name.clone()),
            health: Arc::new(Health::default()),
            permits: Arc::new(Semaphore::new(spec.max_concurrency)),
            spec: Arc::new(spec),
            pool: Arc::new(pool),
            endpoint_path,
            auth,
            wire,
            in_flight: Arc::new(AtomicU64::new(0)),
            granted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    fn lease(&self, limits: &RateLimits, tokens: u64) -> Result<Lease, ProviderError> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                if let Err(e) = limits.admit(&self.spec.name, tokens) {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    self.refused_counter.increment(1);
                    return Err(e);
                }
                self.granted.fetch_add(1, Ordering::Relaxed);
                self.in_flight.fetch_add(1, Ordering::Relaxed);
                self.in_flight_gauge.increment(1.0);
                Ok(Lease {
                    pool: self.pool.clone(),
                    spec: self.spec.clone(),
                    endpoint_path: self.endpoint_path.clone(),
                    auth: self.auth.clone(),
                    wire: self.wire,
                    health: self.health.clone(),
                    _permit: permit,
                    _in_flight: InFlightGuard {
                        count: self.in_flight.clone(),
                        gauge: self.in_flight_gauge.clone(),
                    },
                })
            }
            Err(_) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                self.refused_counter.increment(1);
                Err(ProviderError::Saturated {
                    provider: self.spec.name.clone(),
                    limit: self.spec.max_concurrency,
                })
            }
        }
    }

    fn status(&self) -> ProviderStatus {
        ProviderStatus {
            name: self.spec.name.clone(),
            kind: self.spec.kind.clone(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            max_concurrency: self.spec.max_concurrency,
            requests_per_minute: self.spec.requests_per_minute.map(NonZeroU32::get),
            tokens_per_minute: self.spec.tokens_per_minute.map(NonZeroU32::get),
            leases_granted: self.granted.load(Ordering::Relaxed),
            leases_refused: self.refused.load(Ordering::Relaxed),
            health: self.health.state(),
            consecutive_failures: self.health.consecutive_failures.load(Ordering::Relaxed),
            calls_succeeded: self.health.successes.load(Ordering::Relaxed),
            calls_failed: self.health.failures.load(Ordering::Relaxed),
            last_failure_ms: Some(self.health.last_failure_ms.load(Ordering::Relaxed))
                .filter(|t| *t > 0),
            idle_connections: self.pool.idle() as u64,
            connections_opened: self.pool.opened(),
            // Kept by the desk; the supervisor fills them in.
            retries: 0,
            failovers: 0,
        }
    }
}

pub struct ProviderArgs {
    pub spec: ProviderSpec,
    pub desk: Desk,
}

pub struct ProviderState {
    leaser: Arc<Leaser>,
    pruning: Option<tokio::task::JoinHandle<()>>,
}

pub struct ProviderActor;

impl Actor for ProviderActor {
    type Msg = ProviderMsg;
    type State = ProviderState;
    type Arguments = ProviderArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ProviderMsg>,
        args: ProviderArgs,
    ) -> Result<ProviderState, ActorProcessingErr> {
        let leaser = Arc::new(Leaser::new(args.spec)?);
        args.desk.post(leaser.clone());
        Ok(ProviderState {
            leaser,
            pruning: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<ProviderMsg>,
        state: &mut ProviderState,
    ) -> Result<(), ActorProcessingErr> {
        // A few looks per timeout: an idle connection outlives its timeout by at most a
        // quarter of it.
        let every = (state.leaser.spec.idle_connection_timeout / 4).max(Duration::from_millis(50));
        state.pruning = Some(myself.send_interval(every, || ProviderMsg::Prune));
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ProviderMsg>,
        state: &mut ProviderState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(timer) = state.pruning.take() {
            timer.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<ProviderMsg>,
        msg: ProviderMsg,
        state: &mut ProviderState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ProviderMsg::Status(reply) => {
                let _ = reply.send(state.leaser.status());
            }
            ProviderMsg::Prune => state.leaser.pool.prune(),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(requests: Option<u32>, tokens: Option<u32>) -> RateLimits {
        RateLimits {
            requests: requests.and_then(NonZeroU32::new).map(Limit::per_minute),
            tokens: tokens.and_then(NonZeroU32::new).map(Limit::per_minute),
        }
    }

    #[test]
    fn a_token_limit_takes_a_minutes_worth_then_says_when_there_is_room() {
        let l = limits(None, Some(600));
        assert_eq!(l.admit("p", 400), Ok(()));
        assert_eq!(l.admit("p", 200), Ok(()));
        // 600 a minute refill 10 a second: 100 more are there in about 10 s.
        let refused = l.admit("p", 100);
        let wait = match &refused {
            Err(ProviderError::OverRate {
                what: "tokens",
                retry_after,
                ..
            }) => Some(*retry_after),
            _ => None,
        };
        assert!(
            wait.is_some_and(|w| w > Duration::from_secs(9) && w <= Duration::from_secs(10)),
            "{refused:?}"
        );
        // More than a minute's worth can never pass; a call of no tokens counts one.
        assert!(matches!(
            l.admit("p", 601),
            Err(ProviderError::OverTokenLimit { tokens: 601, .. })
        ));
        assert!(matches!(
            l.admit("p", u64::MAX),
            Err(ProviderError::OverTokenLimit { .. })
        ));
    }

    fn spec(backoff_ms: u64, max_wait_ms: u64) -> ProviderSpec {
        ProviderSpec {
            name: "p".to_owned(),
            kind: "openai".to_owned(),
            base_url: "http://127.0.0.1:9/v1".to_owned(),
            api_key: None,
            max_concurrency: 1,
            connect_timeout: Duration::from_secs(1),
            ca_file: None,
            request_timeout: Duration::from_secs(1),
            proxy: None,
            idle_connection_timeout: Duration::from_secs(1),
            requests_per_minute: None,
            tokens_per_minute: None,
            retries: 3,
            retry_backoff: Duration::from_millis(backoff_ms),
            retry_max_wait: Duration::from_millis(max_wait_ms),
            down_cooldown: Duration::from_secs(5),
            stream_idle_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn retries_back_off_doubling_half_at_random_and_wait_for_the_upstream_briefly() {
        let s = spec(200, 2_000);
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis());
        // Half the backoff, plus up to as much again at random.
        for random in [0, 1, 99_999_999, u64::MAX] {
            let first = ms(s.retry_wait_with(1, None, random));
            assert!(first.is_some_and(|w| (100..=200).contains(&w)), "{first:?}");
            let third = ms(s.retry_wait_with(3, None, random));
            assert!(third.is_some_and(|w| (400..=800).contains(&w)), "{third:?}");
        }
        assert_eq!(ms(s.retry_wait_with(1, None, 0)), Some(100));
        assert_eq!(ms(s.retry_wait_with(1, None, 100_000_000)), Some(200));
        // The backoff never waits longer than the most; a late retry waits that long.
        assert_eq!(ms(s.retry_wait_with(9, None, u64::MAX)), Some(2_000));
        assert_eq!(ms(s.retry_wait_with(u32::MAX, None, 0)), Some(2_000));
        // What the upstream asks for, where that is longer, up to the most.
        let asks = |ms: u64| Some(Duration::from_millis(ms));
        assert_eq!(ms(s.retry_wait_with(1, asks(1_500), 0)), Some(1_500));
        assert_eq!(ms(s.retry_wait_with(1, asks(2_000), 0)), Some(2_000));
        assert_eq!(ms(s.retry_wait_with(1, asks(2_001), 0)), None);
        assert_eq!(ms(s.retry_wait_with(1, asks(10), 0)), Some(100));
        // No backoff: straight away.
        assert_eq!(ms(spec(0, 0).retry_wait_with(1, None, 7)), Some(0));
    }

    #[test]
    fn a_down_provider_rests_then_lets_one_call_see_whether_it_is_back() {
        let health = Health::default();
        // Long enough that a busy machine does not pass it between two lines here.
        let cooldown = Duration::from_millis(1_000);
        for _ in 0..DOWN_AFTER - 1 {
            health.record(false);
        }
        assert!(!health.resting(cooldown), "degraded is not down");
        health.record(false);
        assert_eq!(health.state(), "down");
        assert!(health.resting(cooldown));
        std::thread::sleep(Duration::from_millis(1_050));
        // The first to ask after the cooldown is the probe; the rest keep away.
        assert!(!health.resting(cooldown));
        assert!(health.resting(cooldown));
        assert!(health.resting(cooldown));
        // The probe failed: another cooldown, another single probe.
        health.record(false);
        assert!(health.resting(cooldown));
        std::thread::sleep(Duration::from_millis(1_050));
        assert!(!health.resting(cooldown));
        assert!(health.resting(cooldown));
        // It succeeded: healthy, and nobody keeps away.
        health.record(true);
        assert_eq!(health.state(), "healthy");
        assert!(!health.resting(cooldown));
        assert!(!health.resting(cooldown));
    }

    #[test]
    fn an_oversized_call_takes_no_request_and_no_limit_takes_nothing() {
        let l = limits(Some(1), Some(10));
        assert!(matches!(
            l.admit("p", 11),
            Err(ProviderError::OverTokenLimit { .. })
        ));
        assert_eq!(l.admit("p", 0), Ok(()));
        assert!(matches!(
            l.admit("p", 1),
            Err(ProviderError::OverRate {
                what: "requests",
                ..
            })
        ));
        let none = limits(None, None);
        for _ in 0..1000 {
            assert_eq!(none.admit("p", u64::MAX), Ok(()));
        }
    }
}
