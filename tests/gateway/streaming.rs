//! Streams pass through chunk by chunk; a client that hangs up stops the upstream call and is
//! charged for what was delivered (docs/billing.md).

use crate::both_stores;
use crate::common::*;
use futures::StreamExt;
use serde_json::json;
use std::time::{Duration, Instant};
use tollgate::mock::MockOptions;
use tollgate_actors::Amount;

fn slow_mock() -> MockOptions {
    MockOptions {
        chunks: 40,
        chunk_interval: Duration::from_millis(50),
        ..Default::default()
    }
}

async fn chunks_arrive_as_they_are_produced(backend: Backend) {
    let Some(h) = Harness::start_with(backend, slow_mock(), |_| {}).await else {
        return;
    };
    let (_, key) = h.funded("1").await;
    let started = Instant::now();
    let resp = h
        .chat(&key, &json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "one two three"}]}))
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    // The whole stream takes ~2 s upstream; the first chunk must not wait for it.
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "first chunk after {:?}",
        started.elapsed()
    );
    assert!(first.starts_with(b"data: "));
    let mut rest = Vec::new();
    while let Some(c) = body.next().await {
        rest.extend_from_slice(&c.unwrap());
    }
    assert!(String::from_utf8_lossy(&rest).ends_with("data: [DONE]\n\n"));
    h.stop().await;
}
both_stores!(chunks_arrive_as_they_are_produced);

async fn client_disconnect_settles_what_was_delivered(backend: Backend) {
    let Some(h) = Harness::start_with(backend, slow_mock(), |_| {}).await else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let prompt = "alpha beta gamma delta";
    let resp = h
        .chat(&key, &json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": prompt}]}))
        .await;
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    while seen.matches("\"content\":\"").count() < 6 {
        seen.push_str(&String::from_utf8_lossy(
            &body.next().await.unwrap().unwrap(),
        ));
    }
    drop(body); // hang up

    // The relay notices, stops the upstream call and settles.
    let usage = h.usage_once_settled(&account).await;
    assert_eq!(usage.len(), 1, "settled after disconnect");
    let u = &usage[0];
    assert_eq!(u["request_id"], request_id.as_str());
    assert_eq!(u["status"], 499);
    assert_eq!(u["usage_source"], "estimated");
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert!(
        (5..40).contains(&completion),
        "delivered tokens {completion}"
    );
    let cost: Amount = u["cost"].as_str().unwrap().parse().unwrap();
    assert!(cost.nanos() > 0);
    h.assert_charged_once_from_one_usdt(&account, cost).await;
    h.stop().await;
}
both_stores!(client_disconnect_settles_what_was_delivered);

async fn upstream_breaking_off_is_charged_for_what_arrived(backend: Backend) {
    let Some(h) = Harness::start_with(backend, MockOptions::default(), |c| {
        c.models.push(tollgate::config::ModelConfig {
            id: "breaks".to_owned(),
            provider: "mock".to_owned(),
            upstream_model: "mock-break".to_owned(),
            input_per_mtok: "1".to_owned(),
            output_per_mtok: "1".to_owned(),
            max_output_tokens: 100,
        })
    })
    .await
    else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let resp = h
        .chat(&key, &json!({"model": "breaks", "stream": true, "messages": [{"role": "user", "content": "x y"}]}))
        .await;
    assert_eq!(resp.status(), 200);
    let events = sse_events(resp).await;
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_error");
    assert!(!events.iter().any(|e| e == "[DONE]"));
    let u = &h.usage(&account).await[0];
    assert_eq!(u["status"], 502);
    assert_eq!(u["completion_tokens"], 1);
    h.stop().await;
}
both_stores!(upstream_breaking_off_is_charged_for_what_arrived);
