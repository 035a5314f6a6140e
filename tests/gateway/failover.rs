//! Retries and failover (docs/billing.md, "Retries and failover"): an attempt that failed in
//! a way that may pass is tried again at its provider, then at the model's next route; the
//! client sees one answer and pays for one call, at the model's price, whichever route
//! answered. Failures that would fail anywhere are not retried.
//!
//! The upstreams are `Recorder`s (tests/gateway/forwarding.rs), which answer as scripted and
//! keep the model each body asked for.

use crate::both_stores;
use crate::common::*;
use crate::forwarding::{Recorder, Reply};
use crate::proxy::plain_provider;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tollgate::config::{ModelConfig, ProviderConfig, RouteConfig};
use tollgate::mock::MockOptions;
use tollgate_actors::Amount;

/// What every call here costs: the recorder's usage (7 prompt and 1 completion tokens) at
/// 1,000 USDT per million tokens either way.
const COST: Amount = Amount(8_000_000);

fn provider(name: &str, upstream: std::net::SocketAddr) -> ProviderConfig {
    ProviderConfig {
        retries: 1,
        retry_backoff_ms: 20,
        ..plain_provider(name, upstream, Some("direct".to_owned()))
    }
}

fn model(
    id: &str,
    provider: &str,
    upstream_model: &str,
    fallbacks: &[(&str, &str)],
) -> ModelConfig {
    ModelConfig {
        id: id.to_owned(),
        provider: provider.to_owned(),
        upstream_model: upstream_model.to_owned(),
        input_per_mtok: "1000".to_owned(),
        output_per_mtok: "1000".to_owned(),
        fallbacks: fallbacks
            .iter()
            .map(|(provider, upstream_model)| RouteConfig {
                provider: (*provider).to_owned(),
                upstream_model: Some((*upstream_model).to_owned()),
            })
            .collect(),
        ..Default::default()
    }
}

fn ask(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "once more"}]})
}

/// `/admin/providers`' entry for `name`.
async fn provider_status(h: &Harness, name: &str) -> Value {
    let all: Value = h
        .admin(reqwest::Method::GET, "/admin/providers")
        .send_json()
        .await;
    all["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no provider {name} in {all}"))
        .clone()
}

/// The usage records' (status, provider, cost), oldest first.
async fn records(h: &Harness, account: &str) -> Vec<(u64, String, Amount)> {
    let mut usage = h.usage(account).await;
    usage.reverse();
    usage
        .iter()
        .map(|u| {
            (
                u["status"].as_u64().unwrap(),
                u["provider"].as_str().unwrap().to_owned(),
                u["cost"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

async fn a_failed_attempt_is_retried_and_the_call_charged_once(backend: Backend) {
    let recorder = Recorder::start().await;
    let Some(h) = Harness::start_with(backend, MockOptions::default(), |c| {
        c.providers.push(provider("flaky", recorder.upstream.addr));
        c.models.push(model("flaky", "flaky", "flaky-up", &[]));
    })
    .await
    else {
        return;
    };
    let (account, key) = h.funded("1").await;

    // A 503, then an answer: the client sees the answer, and pays for it once.
    recorder.then(&[Reply::Fail(503)]);
    let r = h.chat(&key, &ask("flaky", false)).await;
    assert_eq!(r.status(), 200);
    let cost = charged(&r);
    assert_eq!(cost, COST);
    assert_eq!(
        r.json::<Value>().await.unwrap()["choices"][0]["message"]["content"],
        "ok"
    );

    // Streamed: a 502 before the stream began, then the stream, whole.
    recorder.then(&[Reply::Fail(502)]);
    let r = h.chat(&key, &ask("flaky", true)).await;
    assert_eq!(r.status(), 200);
    let events = sse_events(r).await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );

    // A failure and its one retry's failure: the client gets the last one, and pays nothing.
    recorder.then(&[Reply::Fail(500), Reply::Fail(503)]);
    let r = h.chat(&key, &ask("flaky", false)).await;
    assert_eq!(r.status(), 502);
    assert_error_shape(&r.json().await.unwrap(), "upstream_error");

    assert_eq!(recorder.models(), vec!["flaky-up"; 6]);
    assert_eq!(
        records(&h, &account).await,
        vec![
            (200, "flaky".to_owned(), COST),
            (200, "flaky".to_owned(), COST),
            (503, "flaky".to_owned(), Amount::ZERO),
        ]
    );
    h.assert_charged_once_from_one_usdt(&account, Amount(2 * COST.nanos()))
        .await;
    let p = provider_status(&h, "flaky").await;
    assert_eq!(
        (
            &p["retries"],
            &p["failovers"],
            &p["calls_failed"],
            &p["calls_succeeded"]
        ),
        (&json!(3), &json!(0), &json!(4), &json!(2)),
        "{p}"
    );
    h.stop().await;
}
both_stores!(a_failed_attempt_is_retried_and_the_call_charged_once);

async fn a_call_fails_over_to_the_next_route_and_a_down_provider_rests(backend: Backend) {
    let recorder = Recorder::start().await;
    // Nothing listens on the discard port: every connection there is refused.
    let dead: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let Some(h) = Harness::start_with(backend, MockOptions::default(), |c| {
        c.providers.push(ProviderConfig {
            // Long enough that a busy machine does not pass it between two calls here.
            down_cooldown_ms: 3_000,
            ..provider("dead", dead)
        });
        c.providers.push(provider("backup", recorder.upstream.addr));
        c.providers.push(ProviderConfig {
            requests_per_minute: std::num::NonZeroU32::new(1),
            ..provider("one-a-minute", recorder.upstream.addr)
        });
        c.models.push(model(
            "resilient",
            "dead",
            "dead-up",
            &[("backup", "backup-up")],
        ));
        c.models.push(model(
            "spills",
            "one-a-minute",
            "first-up",
            &[("backup", "backup-up")],
        ));
    })
    .await
    else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let call = |model: &'static str| {
        let (h, key) = (&h, &key);
        async move { h.chat(key, &ask(model, false)).await.status().as_u16() }
    };
    let dead_failures = || async {
        let p = provider_status(&h, "dead").await;
        (
            p["calls_failed"].as_u64().unwrap(),
            p["retries"].as_u64().unwrap(),
            p["failovers"].as_u64().unwrap(),
        )
    };

    // Refused, retried once, refused again: the backup answers, under its own model name.
    assert_eq!(call("resilient").await, 200);
    assert_eq!(dead_failures().await, (2, 1, 1));
    assert_eq!(call("resilient").await, 200);
    // The fifth failure in a row makes the provider down: its retry is not tried.
    assert_eq!(call("resilient").await, 200);
    assert_eq!(dead_failures().await, (5, 2, 3));
    assert_eq!(provider_status(&h, "dead").await["health"], "down");
    // While it rests, calls go straight to the backup.
    assert_eq!(call("resilient").await, 200);
    assert_eq!(dead_failures().await, (5, 2, 4));
    // After its cooldown, one call tries it again (and fails over once more).
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    assert_eq!(call("resilient").await, 200);
    assert_eq!(dead_failures().await, (6, 2, 5));
    assert_eq!(recorder.models(), vec!["backup-up"; 5]);

    // A provider at its limit a minute sends the call on instead of answering 429.
    assert_eq!(call("spills").await, 200);
    assert_eq!(call("spills").await, 200);
    assert_eq!(recorder.models()[5..], ["first-up", "backup-up"]);
    let p = provider_status(&h, "one-a-minute").await;
    assert_eq!(
        (&p["leases_refused"], &p["failovers"]),
        (&json!(1), &json!(1)),
        "{p}"
    );

    // Seven calls, each charged once at the model's price, and recorded with who answered.
    let r = records(&h, &account).await;
    let providers: Vec<&str> = r.iter().map(|(_, p, _)| p.as_str()).collect();
    assert_eq!(
        providers,
        [
            "backup",
            "backup",
            "backup",
            "backup",
            "backup",
            "one-a-minute",
            "backup"
        ]
    );
    assert!(r.iter().all(|(s, _, c)| *s == 200 && *c == COST), "{r:?}");
    h.assert_charged_once_from_one_usdt(&account, Amount(7 * COST.nanos()))
        .await;
    // At least these: the Prometheus recorder is the test process's, and tests of both
    // stores name their providers alike.
    let metrics = h.metrics_text().await;
    for (name, least) in [
        (r#"tollgate_provider_failovers_total{provider="dead"}"#, 5),
        (r#"tollgate_provider_retries_total{provider="dead"}"#, 2),
    ] {
        let value = metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok());
        assert!(value.is_some_and(|v| v >= least), "{name} {value:?}");
    }
    h.stop().await;
}
both_stores!(a_call_fails_over_to_the_next_route_and_a_down_provider_rests);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_fails_anywhere_is_not_retried_and_a_429_is_waited_for_only_briefly() {
    let recorder = Recorder::start().await;
    let Some(h) = Harness::start_with(Backend::Sqlite, MockOptions::default(), |c| {
        c.providers.push(ProviderConfig {
            retries: 2,
            ..provider("front", recorder.upstream.addr)
        });
        c.providers.push(provider("backup", recorder.upstream.addr));
        c.models.push(model(
            "picky",
            "front",
            "front-up",
            &[("backup", "backup-up")],
        ));
    })
    .await
    else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let mut expected_models: Vec<&str> = Vec::new();
    let mut call = async |replies: &[Reply], models: &[&'static str]| {
        recorder.then(replies);
        let r = h.chat(&key, &ask("picky", false)).await;
        expected_models.extend(models);
        assert_eq!(recorder.models(), expected_models, "{replies:?}");
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap())
    };

    // The request itself is wrong: not retried, not sent elsewhere; the upstream's word passes.
    let (status, v) = call(&[Reply::Fail(400)], &["front-up"]).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["message"], "scripted 400");
    // The provider refuses our key: no retry there, but the backup may serve.
    assert_eq!(
        call(&[Reply::Fail(401)], &["front-up", "backup-up"])
            .await
            .0,
        200
    );
    // Busy for 7 s, longer than the 2 s the gateway waits: straight to the backup.
    assert_eq!(
        call(&[Reply::Busy(7)], &["front-up", "backup-up"]).await.0,
        200
    );
    // Busy for 1 s: waited for (at least as long as it asked), and retried there.
    let started = Instant::now();
    assert_eq!(
        call(&[Reply::Busy(1)], &["front-up", "front-up"]).await.0,
        200
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
    // Everything fails: three attempts at the front, two at the backup; the client gets the
    // last failure, the backup's 429 (not waited for, as the backup has no retry left).
    let (status, v) = call(
        &[
            Reply::Fail(500),
            Reply::Fail(502),
            Reply::Fail(500),
            Reply::Fail(503),
            Reply::Busy(7),
        ],
        &["front-up", "front-up", "front-up", "backup-up", "backup-up"],
    )
    .await;
    assert_eq!(status, 429, "{v}");
    assert_error_shape(&v, "rate_limit_exceeded");

    let r = records(&h, &account).await;
    let statuses: Vec<u64> = r.iter().map(|(s, _, _)| *s).collect();
    assert_eq!(statuses, [400, 200, 200, 200, 429]);
    h.assert_charged_once_from_one_usdt(&account, Amount(3 * COST.nanos()))
        .await;
    let (front, backup) = (
        provider_status(&h, "front").await,
        provider_status(&h, "backup").await,
    );
    assert_eq!(
        (&front["retries"], &front["failovers"]),
        (&json!(3), &json!(3)),
        "{front}"
    );
    assert_eq!(
        (&backup["retries"], &backup["failovers"]),
        (&json!(1), &json!(0)),
        "{backup}"
    );
    h.stop().await;
}
