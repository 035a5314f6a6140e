//! `GET /metrics`: Prometheus text with the actor, ledger, HTTP, billing and provider series.
//! (The recorder is per process, so other tests' traffic shows too: checks are for presence.)

use crate::common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_cover_actors_ledger_http_and_billing() {
    let Some(h) = Harness::start(Backend::Sqlite).await else {
        return;
    };
    let (account, key) = h.funded("1").await;
    let canary = "METRICSCANARY42";
    for stream in [false, true] {
        let r = h
            .chat(&key, &json!({"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": canary}]}))
            .await;
        assert_eq!(r.status(), 200);
        let _ = r.text().await;
    }
    assert!(
        h.gateway
            .app()
            .system
            .billing
            .kill_account_actor(&account)
            .await
    );
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(
        h.chat(
            &key,
            &json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
        )
        .await
        .status(),
        200
    );

    let unauthorized = h
        .http
        .get(format!("{}/metrics", h.base))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    let text = h.metrics_text().await;
    for needle in [
        "tollgate_actors_live{kind=\"account\"}",
        "tollgate_actors_live{kind=\"ledger\"}",
        "tollgate_actors_live{kind=\"provider\"}",
        "tollgate_actor_messages_total{kind=\"account\"}",
        "tollgate_actor_handler_seconds_bucket{kind=\"ledger\"",
        "tollgate_actor_restarts_total{kind=\"account\"}",
        "tollgate_accounts_loaded_total",
        "tollgate_ledger_batch_size_bucket",
        "tollgate_ledger_commit_seconds_bucket",
        "tollgate_ledger_record_wait_seconds_bucket",
        "tollgate_ledger_queue_depth",
        "tollgate_ledger_batches_rechecked_total",
        "tollgate_http_requests_total{route=\"/v1/chat/completions\",status=\"200\",model=\"gpt-4o-mini\",provider=\"mock\"}",
        "tollgate_http_request_duration_seconds_bucket{route=\"/v1/chat/completions\"",
        "tollgate_time_to_first_token_seconds_bucket{model=\"gpt-4o-mini\",provider=\"mock\"",
        "tollgate_upstream_response_seconds_bucket{provider=\"mock\"",
        "tollgate_tokens_total{model=\"gpt-4o-mini\",provider=\"mock\",direction=\"output\"}",
        "tollgate_billed_nanousdt_total{model=\"gpt-4o-mini\",provider=\"mock\"}",
        "tollgate_provider_in_flight{provider=\"mock\"}",
        "tollgate_provider_max_concurrency{provider=\"mock\"}",
        "tollgate_provider_connections_opened_total{provider=\"mock\"}",
        "tollgate_provider_retries_total{provider=\"mock\"}",
        "tollgate_provider_failovers_total{provider=\"mock\"}",
    ] {
        assert!(text.contains(needle), "missing {needle}");
    }
    // Every series the Grafana dashboard queries exists.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/ops/grafana/tollgate.json"
    ))
    .unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut names: Vec<&str> = dashboard
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("tollgate_"))
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() > 10);
    for name in names {
        assert!(
            text.contains(name)
                || name.contains("failures")
                || name.contains("passivated")
                || name.contains("refused"),
            "dashboard queries {name}, which /metrics does not have"
        );
    }
    assert!(!text.contains(canary), "content in a label");
    assert!(
        !text.contains(&key) && !text.contains(&key[6..20]),
        "key material in a label"
    );
    assert!(!text.contains(&account), "account ids are not labels");
    h.stop().await;
}
