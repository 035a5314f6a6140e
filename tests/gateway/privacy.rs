//! We never store or log the content of prompts or responses: a canary sent in prompts (and
//! echoed back by the upstream in responses) appears nowhere in the database or the logs.

use crate::both_stores;
use crate::common::*;
use futures::StreamExt;
use serde_json::json;
use sqlx::Row;
use std::time::Duration;
use tollgate::mock::MockOptions;

const CANARY: &str = "CANARY7f3a9cPRIVATE";

async fn canary_is_nowhere(backend: Backend) {
    let Some(db) = TestDb::new(backend).await else {
        return;
    };
    let mock = Mock::start(MockOptions {
        chunks: 12,
        chunk_interval: Duration::from_millis(10),
        ..Default::default()
    })
    .await;
    let config = db.dir.path().join("tollgate.toml");
    std::fs::write(&config, config_toml(&db.url, db.dir.path(), mock.addr)).unwrap();
    let log = db.dir.path().join("tollgate.log");
    let http = reqwest::Client::new();
    // The most verbose level there is: if content reached a log line, it shows here.
    let server = Server::spawn(&config, free_port(), &log, "trace").await;

    let (_, key) = seed_account(&http, &server.base, "p@example.com", "1").await;
    let url = format!("{}/v1/chat/completions", server.base);
    let msg = json!([{"role": "system", "content": format!("secret {CANARY}")}, {"role": "user", "content": format!("{CANARY} {CANARY}")}]);

    let mut seen_by_client = 0;
    for body in [
        json!({"model": "gpt-4o-mini", "messages": msg}),
        json!({"model": "gpt-4o-mini", "messages": msg, "stream": true}),
        json!({"model": "no-usage", "messages": msg}),
        json!({"model": "refuses", "messages": msg}),
        json!({"model": "broken", "messages": msg}),
        json!({"model": "gpt-4o-mini", "messages": msg, "max_tokens": CANARY}),
        json!({"model": CANARY, "messages": msg}),
    ] {
        let text = http
            .post(&url)
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        seen_by_client += text.matches(CANARY).count();
    }
    // Malformed JSON with the canary in it.
    let _ = http
        .post(&url)
        .bearer_auth(&key)
        .body(format!("{{\"model\": \"{CANARY}"))
        .send()
        .await
        .unwrap();
    // A stream the client abandons.
    let resp = http
        .post(&url)
        .bearer_auth(&key)
        .json(&json!({"model": "gpt-4o-mini", "messages": msg, "stream": true}))
        .send()
        .await
        .unwrap();
    let mut s = resp.bytes_stream();
    let _ = s.next().await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        seen_by_client >= 3,
        "the canary did travel through the gateway ({seen_by_client})"
    );
    // The charge journal holds metadata only. Read while the server runs: a clean stop ships
    // it to the store and deletes it.
    let journal = db.dir.path().join("journal");
    let mut journaled = 0;
    for entry in std::fs::read_dir(&journal).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        journaled += bytes.len();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(CANARY),
            "canary in the journal"
        );
    }
    assert!(journaled > 0, "the journal was written");
    assert!(server.terminate().await.success());

    let logs = std::fs::read(&log).unwrap();
    assert!(logs.len() > 1000, "trace logging was on");
    let logs = String::from_utf8_lossy(&logs);
    assert!(!logs.contains(CANARY), "canary in the logs");
    assert!(!logs.contains(&key[6..]), "API key in the logs");
    assert!(!logs.contains(ADMIN), "admin token in the logs");

    match backend {
        Backend::Sqlite => {
            for entry in std::fs::read_dir(db.dir.path()).unwrap() {
                let path = entry.unwrap().path();
                if path.to_string_lossy().contains("tollgate.db") {
                    let bytes = std::fs::read(&path).unwrap();
                    assert!(
                        !String::from_utf8_lossy(&bytes).contains(CANARY),
                        "canary in {}",
                        path.display()
                    );
                }
            }
        }
        Backend::Postgres => {
            let pool = db.pool().await;
            for table in [
                "accounts",
                "api_keys",
                "ledger",
                "usage_records",
                "_sqlx_migrations",
            ] {
                let rows = sqlx::query(&format!("SELECT CAST(t AS TEXT) FROM {table} t"))
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                for r in rows {
                    assert!(!r.get::<String, _>(0).contains(CANARY), "canary in {table}");
                }
            }
            pool.close().await;
        }
    }
    let pool = db.pool().await;
    let usage: i64 = sqlx::query("SELECT COUNT(*) FROM usage_records")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get(0);
    assert!(usage >= 5, "metadata was recorded ({usage})");
    pool.close().await;
    db.drop_db().await;
}
both_stores!(canary_is_nowhere);
