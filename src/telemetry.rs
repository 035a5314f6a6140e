//! Metrics: one Prometheus recorder per process, rendered at `GET /metrics`.
//!
//! Names follow Prometheus conventions (`_total` counters, `_seconds` durations, base units).
//! No label ever carries user content or key material: `model` is a configured model id or
//! `unknown`, `route` is the route's template.

use dashmap::DashMap;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

const LATENCY: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
const BATCH: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Installs the recorder (once per process) and returns the handle that renders it.
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets(LATENCY).and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("tollgate_ledger_batch_size".to_owned()),
                    BATCH,
                )
            });
            match builder.and_then(|b| b.install_recorder()) {
                Ok(h) => {
                    spawn_upkeep(h.clone());
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// Histogram samples wait in a queue until something drains them into their buckets: a
/// scrape does, and so does this upkeep, so that a gateway nobody scrapes does not grow by
/// every sample it records. A thread of its own, not a task: the recorder is per process and
/// outlives any one runtime (the tests start many).
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".to_owned())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "metrics upkeep thread not started; histograms drain only when scraped");
    }
}

const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A model's metric handles, resolved once at start: looking a labelled metric up by name on
/// every call (allocating its labels, hashing, locking the registry) costs more than the
/// update itself.
#[derive(Clone)]
pub struct ModelMeters {
    pub input_tokens: Counter,
    pub output_tokens: Counter,
    pub billed_nanos: Counter,
    pub time_to_first_token: Histogram,
    pub upstream_response: Histogram,
    /// `tollgate_http_requests_total` and `_duration_seconds` of the chat route, by status.
    requests: DashMap<u16, (Counter, Histogram)>,
    model: String,
    provider: String,
}

impl ModelMeters {
    pub fn new(model: &str, provider: &str) -> ModelMeters {
        let (m, p) = (model.to_owned(), provider.to_owned());
        ModelMeters {
            input_tokens: metrics::counter!("tollgate_tokens_total", "model" => m.clone(), "provider" => p.clone(), "direction" => "input"),
            output_tokens: metrics::counter!("tollgate_tokens_total", "model" => m.clone(), "provider" => p.clone(), "direction" => "output"),
            billed_nanos: metrics::counter!("tollgate_billed_nanousdt_total", "model" => m.clone(), "provider" => p.clone()),
            time_to_first_token: metrics::histogram!("tollgate_time_to_first_token_seconds", "model" => m.clone(), "provider" => p.clone()),
            upstream_response: metrics::histogram!("tollgate_upstream_response_seconds", "provider" => p.clone()),
            requests: DashMap::new(),
            model: m,
            provider: p,
        }
    }

    /// The request counter and duration histogram of a chat call that ended with `status`.
    pub fn request(&self, route: &'static str, status: u16) -> (Counter, Histogram) {
        if let Some(h) = self.requests.get(&status) {
            return h.clone();
        }
        let s = status.to_string();
        let handles = (
            metrics::counter!("tollgate_http_requests_total", "route" => route, "status" => s.clone(),
                "model" => self.model.clone(), "provider" => self.provider.clone()),
            metrics::histogram!("tollgate_http_request_duration_seconds", "route" => route, "status" => s),
        );
        self.requests.insert(status, handles.clone());
        handles
    }
}

impl std::fmt::Debug for ModelMeters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ModelMeters")
    }
}

pub fn render() -> String {
    prometheus()
        .map(PrometheusHandle::render)
        .unwrap_or_default()
}
