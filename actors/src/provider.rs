//! Provider actors: one per configured upstream. Each owns its pooled HTTP client and its
//! concurrency cap, and hands out [`Lease`]s; a request holds its lease (and so its slot under
//! the cap) for as long as its upstream call lasts, streaming included.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Clone, Debug)]
pub struct ProviderSpec {
    pub name: String,
    pub kind: String,
    pub base_url: String,
    pub api_key: Option<String>,
    pub max_concurrency: usize,
    pub connect_timeout: Duration,
    /// Deadline for the upstream's response headers (and a whole non-streamed body).
    pub request_timeout: Duration,
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProviderError {
    #[error("provider `{provider}` is at its concurrency limit ({limit})")]
    Saturated { provider: String, limit: usize },
    #[error("provider `{0}` HTTP client could not be built")]
    Client(String),
}

/// Permission to make one upstream call, with everything needed to make it.
pub struct Lease {
    pub client: reqwest::Client,
    pub spec: Arc<ProviderSpec>,
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
    pub leases_granted: u64,
    pub leases_refused: u64,
    /// `unknown` (no call yet), `healthy`, `degraded` (recent failures) or `down`.
    pub health: &'static str,
    pub consecutive_failures: u64,
    pub calls_succeeded: u64,
    pub calls_failed: u64,
    /// Unix milliseconds of the last failure, if any.
    pub last_failure_ms: Option<i64>,
}

pub enum ProviderMsg {
    Lease(RpcReplyPort<Result<Lease, ProviderError>>),
    Status(RpcReplyPort<ProviderStatus>),
}

impl crate::metered::Kind for ProviderMsg {
    const KIND: &'static str = "provider";
}

pub struct ProviderState {
    spec: Arc<ProviderSpec>,
    client: reqwest::Client,
    permits: Arc<Semaphore>,
    in_flight: Arc<AtomicU64>,
    in_flight_gauge: metrics::Gauge,
    health: Arc<Health>,
    granted: u64,
    refused: u64,
}

pub struct ProviderActor;

impl Actor for ProviderActor {
    type Msg = ProviderMsg;
    type State = ProviderState;
    type Arguments = ProviderSpec;

    async fn pre_start(
        &self,
        _myself: ActorRef<ProviderMsg>,
        spec: ProviderSpec,
    ) -> Result<ProviderState, ActorProcessingErr> {
        let client = reqwest::Client::builder()
            .connect_timeout(spec.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(spec.max_concurrency.min(1024))
            .tcp_nodelay(true)
            .build()
            .map_err(|_| ProviderError::Client(spec.name.clone()))?;
        metrics::gauge!("tollgate_provider_max_concurrency", "provider" => spec.name.clone())
            .set(spec.max_concurrency as f64);
        Ok(ProviderState {
            in_flight_gauge: metrics::gauge!("tollgate_provider_in_flight", "provider" => spec.name.clone()),
            health: Arc::new(Health::default()),
            permits: Arc::new(Semaphore::new(spec.max_concurrency)),
            spec: Arc::new(spec),
            client,
            in_flight: Arc::new(AtomicU64::new(0)),
            granted: 0,
            refused: 0,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ProviderMsg>,
        msg: ProviderMsg,
        state: &mut ProviderState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ProviderMsg::Lease(reply) => {
                let lease = match state.permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        state.granted += 1;
                        state.in_flight.fetch_add(1, Ordering::Relaxed);
                        state.in_flight_gauge.increment(1.0);
                        Ok(Lease {
                            client: state.client.clone(),
                            spec: state.spec.clone(),
                            health: state.health.clone(),
                            _permit: permit,
                            _in_flight: InFlightGuard {
                                count: state.in_flight.clone(),
                                gauge: state.in_flight_gauge.clone(),
                            },
                        })
                    }
                    Err(_) => {
                        state.refused += 1;
                        metrics::counter!("tollgate_provider_leases_refused_total", "provider" => state.spec.name.clone())
                            .increment(1);
                        Err(ProviderError::Saturated {
                            provider: state.spec.name.clone(),
                            limit: state.spec.max_concurrency,
                        })
                    }
                };
                let _ = reply.send(lease);
            }
            ProviderMsg::Status(reply) => {
                let _ = reply.send(ProviderStatus {
                    name: state.spec.name.clone(),
                    kind: state.spec.kind.clone(),
                    in_flight: state.in_flight.load(Ordering::Relaxed),
                    max_concurrency: state.spec.max_concurrency,
                    leases_granted: state.granted,
                    leases_refused: state.refused,
                    health: state.health.state(),
                    consecutive_failures: state.health.consecutive_failures.load(Ordering::Relaxed),
                    calls_succeeded: state.health.successes.load(Ordering::Relaxed),
                    calls_failed: state.health.failures.load(Ordering::Relaxed),
                    last_failure_ms: Some(state.health.last_failure_ms.load(Ordering::Relaxed))
                        .filter(|t| *t > 0),
                });
            }
        }
        Ok(())
    }
}
