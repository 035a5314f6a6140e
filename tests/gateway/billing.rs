//! Exact billing: what is charged is the upstream's usage at the model's price, rounded up
//! once to 1e-9 USDT, and balance, ledger and usage records agree to the unit.

use crate::both_stores;
use crate::common::*;
use serde_json::{json, Value};
use std::time::Duration;
use tollgate::mock::MockOptions;
use tollgate_actors::Amount;

async fn exact_billing_non_streamed(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let before = h.balance(&account).await;
    assert_eq!(before, Amount(1_000_000_000));

    let prompt = "the quick brown fox jumps";
    let resp = h
        .chat(&key, &json!({"model": "pricey", "messages": [{"role": "user", "content": prompt}], "max_tokens": 7}))
        .await;
    assert_eq!(resp.status(), 200);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let header_cost = charged(&resp);
    let body: Value = resp.json().await.unwrap();
    let prompt_tokens = body["usage"]["prompt_tokens"].as_u64().unwrap();
    let completion_tokens = body["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(prompt_tokens, mock_prompt_tokens(&[prompt]));
    assert_eq!(completion_tokens, 7, "max_tokens reaches the upstream");
    // pricey: 3 USDT in, 15.000000001 USDT out per Mtok.
    let expected = expected_cost(
        3_000_000_000,
        15_000_000_001,
        prompt_tokens,
        completion_tokens,
    );
    assert_eq!(header_cost, expected);

    let after = h.balance(&account).await;
    assert_eq!(before.nanos() - after.nanos(), expected.nanos());

    let usage = h.usage(&account).await;
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0]["request_id"], request_id.as_str());
    assert_eq!(usage[0]["cost"], expected.to_string());
    assert_eq!(usage[0]["prompt_tokens"], prompt_tokens);
    assert_eq!(usage[0]["completion_tokens"], completion_tokens);
    assert_eq!(usage[0]["status"], 200);
    assert_eq!(usage[0]["usage_source"], "upstream");

    let l = h.ledger(&account).await;
    assert_eq!(l.balance, after.nanos());
    assert_eq!(l.ledger_sum, l.balance, "balance = credits - charges");
    assert_eq!(l.charges, expected.nanos());
    h.stop().await;
}
both_stores!(exact_billing_non_streamed);

/// A client that hangs up while the upstream works on its call does not get the call for free:
/// the call runs to its end and is charged what the upstream reports (docs/billing.md).
async fn hanging_up_before_the_answer_is_still_charged(backend: Backend) {
    let mock = MockOptions {
        latency: Duration::from_millis(400),
        ..Default::default()
    };
    let Some(h) = Harness::start_with(backend, mock, |_| {}).await else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "are you there"}], "max_tokens": 5});
    let call = h.chat(&key, &body);
    // Gone long before the upstream answers: dropping the request closes its connection.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), call)
            .await
            .is_err(),
        "the mock answers after 400 ms"
    );
    assert!(h.usage(&account).await.is_empty(), "not settled yet");

    let usage = h.usage_once_settled(&account).await;
    assert_eq!(usage.len(), 1, "settled after the client left");
    let u = &usage[0];
    assert_eq!(u["status"], 200);
    assert_eq!(u["usage_source"], "upstream");
    assert_eq!(u["completion_tokens"], 5);
    let cost: Amount = u["cost"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        cost,
        expected_cost(
            150_000_000,
            600_000_000,
            u["prompt_tokens"].as_u64().unwrap(),
            5
        )
    );
    h.assert_charged_once_from_one_usdt(&account, cost).await;
    h.stop().await;
}
both_stores!(hanging_up_before_the_answer_is_still_charged);

async fn exact_billing_streamed(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let (account, key) = h.funded("0.5").await;
    let prompt = "stream me some words please";
    let resp = h
        .chat(&key, &json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": prompt}]}))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let events = sse_events(resp).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    // The client did not ask for usage: the usage-only chunk Tollgate requested is not shown.
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(
            v["usage"].is_null(),
            "usage chunk leaked to a client that did not ask: {e}"
        );
    }
    let words: usize = events
        .iter()
        .filter(|e| e.contains("\"content\":\"") && !e.contains("\"content\":\"\""))
        .count();
    assert_eq!(words, 16);

    let usage = h.usage(&account).await;
    assert_eq!(usage.len(), 1);
    let u = &usage[0];
    assert_eq!(u["request_id"], request_id.as_str());
    assert_eq!(u["stream"], true);
    assert_eq!(u["prompt_tokens"], mock_prompt_tokens(&[prompt]));
    assert_eq!(u["completion_tokens"], 16);
    let expected = expected_cost(150_000_000, 600_000_000, mock_prompt_tokens(&[prompt]), 16);
    assert_eq!(u["cost"], expected.to_string());
    assert_eq!(
        h.balance(&account).await,
        Amount(500_000_000 - expected.nanos())
    );

    // A client that asks for usage gets the usage chunk.
    let resp = h
        .chat(&key, &json!({"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": prompt}]}))
        .await;
    let events = sse_events(resp).await;
    let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 16);

    let l = h.ledger(&account).await;
    assert_eq!(l.ledger_sum, l.balance);
    assert_eq!(l.charge_count, 2);
    h.stop().await;
}
both_stores!(exact_billing_streamed);

/// A balance that cannot pay for the requested max_tokens lowers max_tokens instead of refusing.
async fn max_tokens_lowered_to_what_balance_covers(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let body = json!({"model": "pricey", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]});
    let body_len = serde_json::to_vec(&body).unwrap().len() as u64;
    // Enough for the input bound and exactly 5 output tokens at 15.000000001 USDT/Mtok.
    let input_cost = (body_len as u128 * 3_000_000_000u128).div_ceil(1_000_000) as i64;
    let five_out = (5u128 * 15_000_000_001u128).div_ceil(1_000_000) as i64;
    let funds = Amount(input_cost + five_out + 1);
    let account = h.account("lowered@example.com").await;
    h.credit(&account, &funds.to_string()).await;
    let (_, key) = h.key(&account, json!({})).await;

    let resp = h.chat(&key, &body).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=5).contains(&completion), "lowered to {completion}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let after = h.balance(&account).await;
    assert!(after.nanos() >= 0);
    let charged = funds.nanos() - after.nanos();
    assert_eq!(
        charged,
        expected_cost(
            3_000_000_000,
            15_000_000_001,
            v["usage"]["prompt_tokens"].as_u64().unwrap(),
            completion
        )
        .nanos()
    );

    // Now too little for even one output token: 402, and nothing charged.
    let poor = h.account("poor@example.com").await;
    h.credit(&poor, "0.000000001").await;
    let (_, poor_key) = h.key(&poor, json!({})).await;
    let resp = h.chat(&poor_key, &body).await;
    assert_eq!(resp.status(), 402);
    assert_error_shape(&resp.json().await.unwrap(), "insufficient_balance");
    assert_eq!(h.balance(&poor).await, Amount(1));
    assert!(h.usage(&poor).await.is_empty());
    h.stop().await;
}
both_stores!(max_tokens_lowered_to_what_balance_covers);

/// An upstream with no usage figures is billed from Tollgate's own count, marked "estimated".
async fn upstream_without_usage_is_estimated(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let resp = h.chat(&key, &json!({"model": "no-usage", "messages": [{"role": "user", "content": "count these tokens"}]})).await;
    assert_eq!(resp.status(), 200);
    let cost = charged(&resp);
    assert!(cost.nanos() > 0);
    let u = &h.usage(&account).await[0];
    assert_eq!(u["usage_source"], "estimated");
    assert_eq!(u["cost"], cost.to_string());
    assert!(u["completion_tokens"].as_u64().unwrap() > 0);
    h.stop().await;
}
both_stores!(upstream_without_usage_is_estimated);
