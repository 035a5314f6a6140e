//! Account actors passivate when idle and come back from the store; provider concurrency caps
//! answer 429; the `serve --demo` and `mock-upstream` commands work as the README says.

use crate::both_stores;
use crate::common::*;
use futures::future::join_all;
use serde_json::{json, Value};
use std::time::Duration;
use tollgate::mock::MockOptions;
use tollgate_actors::Amount;

async fn account_children(h: &Harness) -> usize {
    h.directory("").await["children"]
        .as_array()
        .map_or(0, Vec::len)
}

async fn idle_account_actors_passivate_and_reload(backend: Backend) {
    let Some(h) = Harness::start_with(backend, MockOptions::default(), |c| {
        c.accounts.idle_secs = 1
    })
    .await
    else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 4, "messages": [{"role": "user", "content": "idle"}]});
    assert_eq!(h.chat(&key, &body).await.status(), 200);
    let before = h.balance(&account).await;
    assert_eq!(account_children(&h).await, 1);

    let mut gone = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if account_children(&h).await == 0 {
            gone = true;
            break;
        }
    }
    assert!(gone, "idle account actor stopped");
    assert_eq!(h.gateway.app().system.billing.live_accounts(), 0);

    // The next request starts a fresh actor from the store.
    let resp = h.chat(&key, &body).await;
    assert_eq!(resp.status(), 200);
    let cost = charged(&resp);
    assert_eq!(
        h.balance(&account).await,
        Amount(before.nanos() - cost.nanos())
    );
    h.stop().await;
}
both_stores!(idle_account_actors_passivate_and_reload);

/// The idle sweep asks only actors idle long enough whether to stop: a busy account's actor
/// handles its calls' messages and nothing else (BENCHMARKS item 54).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_sweep_leaves_busy_account_actors_alone() {
    let Some(h) = Harness::start_with(Backend::Sqlite, MockOptions::default(), |c| {
        c.accounts.idle_secs = 2
    })
    .await
    else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 4, "messages": [{"role": "user", "content": "busy"}]});
    let handled = || async {
        h.directory(&format!("?account={account}")).await["children"][0]["messages"]
            .as_u64()
            .expect("the account's actor")
    };
    let before = handled().await;
    // A sweep every second for 3.5 s; the account is never idle for 2 of them.
    let mut calls = 0;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(3500) {
        assert_eq!(h.chat(&key, &body).await.status(), 200);
        calls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each call is a reservation and a settlement: two messages, and no idle check.
    assert_eq!(handled().await - before, 2 * calls, "{calls} calls");

    // Left alone, it is asked, and stops.
    let mut gone = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if h.gateway.app().system.billing.live_accounts() == 0 {
            gone = true;
            break;
        }
    }
    assert!(gone, "the idle account's actor stopped");
    h.stop().await;
}

async fn provider_concurrency_cap_answers_429(backend: Backend) {
    let mock = MockOptions {
        latency: Duration::from_millis(400),
        ..Default::default()
    };
    let Some(h) = Harness::start_with(backend, mock, |c| c.providers[0].max_concurrency = 2).await
    else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 4, "messages": [{"role": "user", "content": "busy"}]});
    let results = join_all((0..6).map(|_| async {
        let r = h.chat(&key, &body).await;
        let status = r.status().as_u16();
        let retry = ["retry-after", "retry-after-ms"]
            .map(|h| r.headers().get(h).map(|v| v.to_str().unwrap().to_owned()));
        (status, r.json::<Value>().await.unwrap(), retry)
    }))
    .await;
    let ok = results.iter().filter(|(s, ..)| *s == 200).count();
    let limited: Vec<_> = results.iter().filter(|(s, ..)| *s == 429).collect();
    assert_eq!(ok, 2, "{results:?}");
    assert_eq!(limited.len(), 4);
    for (_, v, retry) in limited {
        assert_error_shape(v, "rate_limit_exceeded");
        assert_eq!(retry, &[Some("1".to_owned()), Some("1000".to_owned())]);
    }
    assert_eq!(
        h.usage(&account).await.len(),
        2,
        "limited requests leave no charge"
    );
    let p: Value = h
        .admin(reqwest::Method::GET, "/admin/providers")
        .send_json()
        .await;
    assert_eq!(p["data"][0]["leases_refused"], 4);
    assert_eq!(p["data"][0]["in_flight"], 0);
    h.stop().await;
}
both_stores!(provider_concurrency_cap_answers_429);

/// A provider's limits a minute: a call over the request limit is answered 429 with when to
/// retry, a call that needs more tokens than the limit takes in a minute 400; neither reaches
/// the upstream or costs anything.
async fn provider_rate_limits_answer_429_with_when_to_retry(backend: Backend) {
    let Some(h) = Harness::start_with(backend, Default::default(), |c| {
        c.providers[0].requests_per_minute = std::num::NonZeroU32::new(2);
        c.providers[0].tokens_per_minute = std::num::NonZeroU32::new(1000);
    })
    .await
    else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let call = |max_tokens: u64| {
        let body = json!({"model": "gpt-4o-mini", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "per minute"}]});
        let h = &h;
        let key = &key;
        async move {
            let r = h.chat(key, &body).await;
            let status = r.status().as_u16();
            let retry = ["retry-after", "retry-after-ms"].map(|n| {
                r.headers()
                    .get(n)
                    .map(|v| v.to_str().unwrap().parse::<u64>().unwrap())
            });
            (status, retry, r.json::<Value>().await.unwrap())
        }
    };
    // Within the token limit only if the prompt is counted too (about 30 tokens).
    let (status, _, v) = call(990).await;
    assert_eq!(status, 400, "{v}");
    assert_error_shape(&v, "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("lower max_tokens"),
        "{v}"
    );

    assert_eq!(call(8).await.0, 200);
    // The 400 above took one of the two requests a minute: this is the second.
    assert_eq!(call(8).await.0, 200);
    let (status, [secs, ms], v) = call(8).await;
    assert_eq!(status, 429, "{v}");
    assert_error_shape(&v, "rate_limit_exceeded");
    let (secs, ms) = (secs.unwrap(), ms.unwrap());
    // Two a minute: the next one is free within 30 s.
    assert!(
        (1..=30).contains(&secs) && ms <= 30_000 && secs == ms.div_ceil(1000),
        "{secs} {ms}"
    );

    assert_eq!(
        h.usage(&account).await.len(),
        2,
        "refused calls leave no record"
    );
    let l = h.ledger(&account).await;
    assert_eq!(l.charge_count, 2);
    let p: Value = h
        .admin(reqwest::Method::GET, "/admin/providers")
        .send_json()
        .await;
    assert_eq!(p["data"][0]["requests_per_minute"], 2);
    assert_eq!(p["data"][0]["tokens_per_minute"], 1000);
    assert_eq!(p["data"][0]["leases_refused"], 2);
    h.stop().await;
}
both_stores!(provider_rate_limits_answer_429_with_when_to_retry);

/// The README's first command, as a user runs it: `tollgate serve --demo` in a fresh folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_and_mock_upstream_commands() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--demo", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = demo.stdout.take().unwrap();
    let mut printed = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !printed.contains("curl -s http://") || !printed.contains("/admin/accounts/") {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, stdout.read(&mut buf))
            .await
            .expect("demo printed its key")
            .unwrap();
        assert!(n > 0, "demo exited: {printed}");
        printed.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let key = printed
        .split_whitespace()
        .find(|w| w.starts_with("sk-tg-"))
        .unwrap()
        .trim_end_matches('\'');
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello tollgate"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-tollgate-cost"));
    assert!(
        dir.path().join("data/tollgate.db").exists(),
        "embedded store under data/"
    );
    let _ = demo.start_kill();

    let mock_port = free_port();
    let mut mock = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "mock-upstream",
            "--listen",
            &format!("127.0.0.1:{mock_port}"),
            "--chunks",
            "3",
            "--latency-ms",
            "5",
        ])
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut answer = None;
    for _ in 0..200 {
        if let Ok(r) = http
            .post(format!("http://127.0.0.1:{mock_port}/v1/chat/completions"))
            .json(&json!({"model": "m", "messages": [{"role": "user", "content": "a b c d"}]}))
            .send()
            .await
        {
            answer = Some(r.json::<Value>().await.unwrap());
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let answer = answer.expect("mock-upstream answered");
    assert_eq!(answer["usage"]["completion_tokens"], 3);
    assert_eq!(answer["choices"][0]["message"]["content"], "a b c");
    let _ = mock.start_kill();
}

/// `/admin/providers` reports health from the calls' outcomes: failures in a row make a
/// provider degraded, then down; one success makes it healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_health_follows_outcomes() {
    let Some(h) = Harness::start(Backend::Sqlite).await else {
        return;
    };
    let (_, key) = h.funded("1").await;
    let health = || async {
        let v: Value = h
            .admin(reqwest::Method::GET, "/admin/providers")
            .send_json()
            .await;
        v["data"][0].clone()
    };
    assert_eq!(health().await["health"], "unknown");
    let msg = json!([{"role": "user", "content": "x"}]);
    assert_eq!(
        h.chat(&key, &json!({"model": "gpt-4o-mini", "messages": msg}))
            .await
            .status(),
        200
    );
    assert_eq!(health().await["health"], "healthy");
    assert_eq!(
        h.chat(&key, &json!({"model": "refuses", "messages": msg}))
            .await
            .status(),
        400
    );
    assert_eq!(
        health().await["health"],
        "healthy",
        "a client's bad request is not the provider's failure"
    );
    assert_eq!(
        h.chat(&key, &json!({"model": "broken", "messages": msg}))
            .await
            .status(),
        502
    );
    // The attempt and its one retry (the provider's default) both failed.
    let p = health().await;
    assert_eq!(p["health"], "degraded");
    assert_eq!(p["consecutive_failures"], 2);
    assert_eq!(p["retries"], 1);
    assert!(p["last_failure_ms"].as_i64().unwrap() > 0);
    for _ in 0..2 {
        assert_eq!(
            h.chat(&key, &json!({"model": "broken", "messages": msg}))
                .await
                .status(),
            502
        );
    }
    assert_eq!(health().await["health"], "down");
    assert_eq!(
        h.chat(&key, &json!({"model": "gpt-4o-mini", "messages": msg}))
            .await
            .status(),
        200
    );
    let p = health().await;
    assert_eq!(p["health"], "healthy");
    assert_eq!(p["calls_failed"], 6);
    h.stop().await;
}

/// With `log_format = "json"` every log line is a JSON object, and a request's lines carry its
/// request id (the one in its `x-request-id` header).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_request_ids() {
    let Some(db) = TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let mock = Mock::start(MockOptions::default()).await;
    let config = db.dir.path().join("tollgate.toml");
    let toml = config_toml(&db.url, db.dir.path(), mock.addr).replacen(
        "admin_token",
        "log_format = \"json\"\nadmin_token",
        1,
    );
    std::fs::write(&config, toml).unwrap();
    let log = db.dir.path().join("tollgate.log");
    // One line per call is logged at debug (at info it would cost every call a write).
    let server = Server::spawn(&config, free_port(), &log, "tollgate=debug").await;
    let http = reqwest::Client::new();
    let (_, key) = seed_account(&http, &server.base, "logs@example.com", "1").await;
    let resp = http
        .post(format!("{}/v1/chat/completions", server.base))
        .bearer_auth(&key)
        .json(&json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "log me"}]}))
        .send()
        .await
        .unwrap();
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(resp.status(), 200);
    assert!(server.terminate().await.success());
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.len() >= 2);
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["request_id"] == request_id.as_str()),
        "no line carries {request_id}: {text}"
    );
    db.drop_db().await;
}
