//! Every refusal has the OpenAI error shape and the right status, and charges nothing.

use crate::both_stores;
use crate::common::*;
use serde_json::{json, Value};
use tollgate_actors::Amount;

async fn refused_requests_charge_nothing(backend: Backend) {
    let Some(h) = Harness::start_with(backend, Default::default(), |c| {
        c.limits.max_body_bytes = 2048
    })
    .await
    else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let empty = h.account("empty@example.com").await;
    let (_, empty_key) = h.key(&empty, json!({})).await;
    let url = format!("{}/v1/chat/completions", h.base);
    let ok_body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});

    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (h.http.post(&url).json(&ok_body), 401, "invalid_api_key"),
        (h.http.post(&url).bearer_auth("sk-tg-not-a-key").json(&ok_body), 401, "invalid_api_key"),
        (h.http.post(&url).header("authorization", "Basic abc").json(&ok_body), 401, "invalid_api_key"),
        (h.http.post(&url).bearer_auth(&empty_key).json(&ok_body), 402, "insufficient_balance"),
        (h.http.post(&url).bearer_auth(&key).body("{not json"), 400, "invalid_request_error"),
        (h.http.post(&url).bearer_auth(&key).body(vec![0xff, 0xfe, 0x00]), 400, "invalid_request_error"),
        (h.http.post(&url).bearer_auth(&key).json(&json!([1, 2])), 400, "invalid_request_error"),
        (h.http.post(&url).bearer_auth(&key).json(&json!({"messages": [{"role": "user", "content": "x"}]})), 400, "invalid_request_error"),
        (h.http.post(&url).bearer_auth(&key).json(&json!({"model": "gpt-4o-mini"})), 400, "invalid_request_error"),
        (h.http.post(&url).bearer_auth(&key).json(&json!({"model": "gpt-4o-mini", "messages": []})), 400, "invalid_request_error"),
        (h.http.post(&url).bearer_auth(&key).json(&json!({"model": 7, "messages": [{"role": "user", "content": "x"}]})), 400, "invalid_request_error"),
        (h.http.post(&url).bearer_auth(&key).json(&json!({"model": "gpt-4o-mini", "stream": "yes", "messages": [{"role": "user", "content": "x"}]})), 400, "invalid_request_error"),
        (h.http.post(&url).bearer_auth(&key).json(&json!({"model": "gpt-4o-mini", "max_tokens": -1, "messages": [{"role": "user", "content": "x"}]})), 400, "invalid_request_error"),
        (h.http.post(&url).bearer_auth(&key).json(&json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]})), 404, "model_not_found"),
        (h.http.post(&url).bearer_auth(&key).json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x".repeat(5000)}]})), 413, "request_too_large"),
        (h.http.get(&url).bearer_auth(&key), 405, "method_not_allowed"),
        (h.http.get(format!("{}/v1/nothing", h.base)).bearer_auth(&key), 404, "not_found"),
    ];
    for (i, (req, status, code)) in cases.into_iter().enumerate() {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "case {i}");
        assert!(
            resp.headers().contains_key("x-request-id")
                || status == 405
                || status == 404 && code == "not_found",
            "case {i} request id"
        );
        let v: Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("case {i}: body is not JSON: {e}"));
        assert_error_shape(&v, code);
    }
    // A chunked body over the limit (no content-length to refuse it by) is refused too.
    let chunks = futures::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1000])));
    let resp = h
        .http
        .post(&url)
        .bearer_auth(&key)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);

    assert_eq!(h.balance(&account).await, Amount(1_000_000_000));
    assert_eq!(h.balance(&empty).await, Amount::ZERO);
    assert!(h.usage(&account).await.is_empty());
    let l = h.ledger(&account).await;
    assert_eq!((l.charge_count, l.usage_count), (0, 0));
    h.stop().await;
}
both_stores!(refused_requests_charge_nothing);

async fn upstream_failures_are_502_504_429_and_free(backend: Backend) {
    let Some(h) = Harness::start_with(backend, Default::default(), |c| {
        c.providers[0].request_timeout_ms = 400
    })
    .await
    else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let msg = json!([{"role": "user", "content": "hello"}]);

    let resp = h
        .chat(&key, &json!({"model": "broken", "messages": msg}))
        .await;
    assert_eq!(resp.status(), 502);
    assert_error_shape(&resp.json().await.unwrap(), "upstream_error");

    let resp = h
        .chat(&key, &json!({"model": "hangs", "messages": msg}))
        .await;
    assert_eq!(resp.status(), 504);
    assert_error_shape(&resp.json().await.unwrap(), "upstream_timeout");

    // The upstream's rate limit reaches the client with its `retry-after`, which the SDKs
    // wait for before they retry.
    let resp = h
        .chat(&key, &json!({"model": "throttled", "messages": msg}))
        .await;
    assert_eq!(resp.status(), 429);
    let retry =
        ["retry-after", "retry-after-ms"].map(|n| resp.headers()[n].to_str().unwrap().to_owned());
    assert_eq!(retry, ["7", "7000"]);
    assert_error_shape(&resp.json().await.unwrap(), "rate_limit_exceeded");

    let resp = h
        .chat(&key, &json!({"model": "refuses", "messages": msg}))
        .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_error_shape(&v, "invalid_request_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("mock says"));

    assert_eq!(h.balance(&account).await, Amount(1_000_000_000));
    let usage = h.usage(&account).await;
    assert_eq!(usage.len(), 4, "failed calls are recorded as metadata");
    let mut statuses: Vec<u64> = usage
        .iter()
        .map(|u| u["status"].as_u64().unwrap())
        .collect();
    statuses.sort();
    assert_eq!(statuses, vec![400, 429, 500, 504]);
    assert!(usage.iter().all(|u| u["cost"] == "0"));
    h.stop().await;
}
both_stores!(upstream_failures_are_502_504_429_and_free);

/// An answer larger than `limits.max_upstream_answer_bytes` is not held: 502, free, recorded
/// with the upstream's work as a failure. An answer under the limit passes as ever.
async fn an_answer_larger_than_the_limit_is_502_and_free(backend: Backend) {
    const LIMIT: usize = 4096;
    let mock = tollgate::mock::MockOptions {
        chunks: 2000,
        ..Default::default()
    };
    let Some(h) = Harness::start_with(backend, mock, |c| {
        c.limits.max_upstream_answer_bytes = LIMIT
    })
    .await
    else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let msg = json!([{"role": "user", "content": "hello"}]);

    let resp = h
        .chat(
            &key,
            &json!({"model": "gpt-4o-mini", "max_tokens": 16, "messages": msg}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let small = resp.bytes().await.unwrap().len();
    assert!(small < LIMIT);

    // The mock answers 2,000 words: about 12 KB.
    let resp = h
        .chat(
            &key,
            &json!({"model": "gpt-4o-mini", "max_tokens": 2000, "messages": msg}),
        )
        .await;
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    assert_error_shape(&v, "upstream_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("4096 bytes"),
        "{v}"
    );

    let usage = h.usage_once_n_settled(&account, 2).await;
    let mut statuses: Vec<u64> = usage
        .iter()
        .map(|u| u["status"].as_u64().unwrap())
        .collect();
    statuses.sort();
    assert_eq!(statuses, vec![200, 502]);
    let failed = usage.iter().find(|u| u["status"] == 502).unwrap();
    assert_eq!(failed["cost"], "0");
    let paid = usage.iter().find(|u| u["status"] == 200).unwrap();
    let paid: Amount = paid["cost"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        h.balance(&account).await,
        Amount(1_000_000_000 - paid.nanos())
    );
    h.stop().await;
}
both_stores!(an_answer_larger_than_the_limit_is_502_and_free);

async fn key_limits(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let account = h.account("keys@example.com").await;
    h.credit(&account, "5").await;
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]});

    // Model allow-list.
    let (_, only_pricey) = h.key(&account, json!({"allowed_models": ["pricey"]})).await;
    let resp = h.chat(&only_pricey, &body).await;
    assert_eq!(resp.status(), 403);
    assert_error_shape(&resp.json().await.unwrap(), "model_not_allowed");

    // Expiry.
    let (_, expired) = h.key(&account, json!({"expires_at": 1_000_000})).await;
    let resp = h.chat(&expired, &body).await;
    assert_eq!(resp.status(), 401);
    assert_error_shape(&resp.json().await.unwrap(), "invalid_api_key");

    // Revocation takes effect at once.
    let (key_id, revoked) = h.key(&account, json!({})).await;
    assert_eq!(h.chat(&revoked, &body).await.status(), 200);
    let r = h
        .admin(reqwest::Method::DELETE, &format!("/admin/keys/{key_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(h.chat(&revoked, &body).await.status(), 401);

    // Spend cap: the key stops at its cap although the account has money.
    let (_, capped) = h.key(&account, json!({"spend_cap": "0.00002"})).await;
    let mut ok = 0;
    let mut refused = 0;
    for _ in 0..10 {
        match h.chat(&capped, &body).await.status().as_u16() {
            200 => ok += 1,
            402 => refused += 1,
            s => panic!("unexpected {s}"),
        }
    }
    assert!(ok >= 1 && refused >= 1, "ok {ok} refused {refused}");
    let usage = h.usage(&account).await;
    let capped_spend: i64 = usage
        .iter()
        .filter(|u| u["status"] == 200)
        .map(|u| cost_of(u).nanos())
        .sum();
    let pool = h.pool().await;
    let spent: i64 = sqlx::Row::try_get(
        &sqlx::query("SELECT spent FROM api_keys WHERE spend_cap IS NOT NULL")
            .fetch_one(&pool)
            .await
            .unwrap(),
        0,
    )
    .unwrap();
    assert!(spent <= 20_000, "key spent {spent} over its cap");
    assert!(capped_spend >= spent);
    pool.close().await;
    h.stop().await;
}
both_stores!(key_limits);

/// The chat route is found however its path is spelled, with or without a query string (the
/// common spelling takes a filter of its own, every other the general router), and only for
/// POST; every spelling charges one call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_route_answers_every_spelling_of_its_path() {
    let Some(h) = Harness::start(Backend::Sqlite).await else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let spellings = [
        "/v1/chat/completions",
        "/v1/chat/completions/",
        "/v1/chat/completions?trace=1",
        "//v1/chat/completions",
    ];
    let send = |method: reqwest::Method, path: &str| {
        h.http
            .request(method, format!("{}{path}", h.base))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };
    for path in spellings {
        let resp = send(reqwest::Method::POST, path).await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        assert!(resp.headers().contains_key("x-tollgate-cost"), "{path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion", "{path}");
    }
    for method in [reqwest::Method::GET, reqwest::Method::PUT] {
        let resp = send(method.clone(), "/v1/chat/completions").await.unwrap();
        assert_eq!(resp.status(), 405, "{method}");
        assert_error_shape(&resp.json().await.unwrap(), "method_not_allowed");
    }
    let resp = send(reqwest::Method::POST, "/v1/chat/completion")
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(h.usage(&account).await.len(), spellings.len());
    h.stop().await;
}
