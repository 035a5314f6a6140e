//! The admin API: accounts, audited adjustments, keys shown once and stored as SHA-256.

use crate::both_stores;
use crate::common::*;
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use sqlx::Row;
use tollgate_actors::Amount;

async fn admin_api(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let url = |p: &str| format!("{}{p}", h.base);

    // Authentication.
    for req in [
        h.http.get(url("/admin/actors")),
        h.http.get(url("/admin/actors")).bearer_auth("wrong"),
    ] {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_error_shape(&r.json().await.unwrap(), "invalid_admin_token");
    }

    // Accounts.
    let r = h
        .admin(Method::POST, "/admin/accounts")
        .json(&json!({"email": "Ada@Example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let acct: Value = r.json().await.unwrap();
    let id = acct["id"].as_str().unwrap().to_owned();
    assert_eq!(acct["email"], "ada@example.com");
    assert_eq!(acct["balance"], "0");
    for (body, status) in [
        (json!({"email": "ada@example.com"}), 409),
        (json!({"email": "not-an-email"}), 400),
        (json!({"email": "x@y.z", "admin": true}), 400),
        (json!({}), 400),
    ] {
        let r = h
            .admin(Method::POST, "/admin/accounts")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{body}");
        assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    }
    let r = h
        .admin(Method::GET, "/admin/accounts/acct_nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Credits: decimal strings only, audited, idempotent on request.
    let credit = |body: Value| {
        h.admin(Method::POST, &format!("/admin/accounts/{id}/credits"))
            .json(&body)
            .send()
    };
    for body in [
        json!({"amount": 10, "reason": "x"}),
        json!({"amount": "0", "reason": "x"}),
        json!({"amount": "1.0000000001", "reason": "x"}),
        json!({"amount": "abc", "reason": "x"}),
        json!({"amount": "1"}),
    ] {
        assert_eq!(credit(body.clone()).await.unwrap().status(), 400, "{body}");
    }
    let r = credit(json!({"amount": "12.5", "reason": "wire 42", "idempotency_key": "wire-42"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["balance"], "12.5");
    let r = credit(json!({"amount": "12.5", "reason": "wire 42", "idempotency_key": "wire-42"}))
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap()["balance"],
        "12.5",
        "applied once"
    );
    let r = credit(json!({"amount": "-20", "reason": "too much"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 402);
    assert_error_shape(&r.json().await.unwrap(), "insufficient_balance");
    let r = credit(json!({"amount": "-2.5", "reason": "refund reversal"}))
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["balance"], "10");
    assert_eq!(h.balance(&id).await, Amount(10_000_000_000));

    // Keys: shown once, stored as SHA-256 only.
    let r = h
        .admin(Method::POST, &format!("/admin/accounts/{id}/keys"))
        .json(&json!({"name": "laptop"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let k: Value = r.json().await.unwrap();
    let full = k["key"].as_str().unwrap().to_owned();
    assert!(
        full.starts_with("sk-tg-") && full.len() == 6 + 64,
        "256 bits of hex"
    );
    let pool = h.pool().await;
    let row = sqlx::query("SELECT key_hash, prefix, name FROM api_keys WHERE id = $1")
        .bind(k["id"].as_str().unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        row.get::<String, _>("key_hash"),
        hex::encode(Sha256::digest(full.as_bytes()))
    );
    assert!(
        !full.starts_with(&row.get::<String, _>("prefix"))
            || row.get::<String, _>("prefix").len() < 16
    );
    let rows = sqlx::query("SELECT id, account_id, name, key_hash, prefix FROM api_keys")
        .fetch_all(&pool)
        .await
        .unwrap();
    for r in rows {
        for i in 0..5 {
            assert!(
                !r.get::<String, _>(i).contains(&full[6..]),
                "full key stored"
            );
        }
    }
    for body in [
        json!({}),
        json!({"name": ""}),
        json!({"name": "x", "spend_cap": "-1"}),
        json!({"name": "x", "allowed_models": ["nope"]}),
    ] {
        let r = h
            .admin(Method::POST, &format!("/admin/accounts/{id}/keys"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
    }
    assert_eq!(
        h.admin(Method::DELETE, "/admin/keys/key_nope")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // /v1/models lists prices; needs a key.
    assert_eq!(
        h.http.get(url("/v1/models")).send().await.unwrap().status(),
        401
    );
    let models: Value = h
        .http
        .get(url("/v1/models"))
        .bearer_auth(&full)
        .send_json()
        .await;
    let mini = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "gpt-4o-mini")
        .unwrap()
        .clone();
    assert_eq!(mini["pricing"]["input_per_mtok"], "0.15");
    assert_eq!(mini["pricing"]["output_per_mtok"], "0.6");

    // Usage: newest first, limited.
    for i in 0..3 {
        let r = h.chat(&full, &json!({"model": "gpt-4o-mini", "max_tokens": i + 1, "messages": [{"role": "user", "content": "u"}]})).await;
        assert_eq!(r.status(), 200);
    }
    let v: Value = h
        .admin(Method::GET, &format!("/admin/accounts/{id}/usage?limit=2"))
        .send_json()
        .await;
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[0]["completion_tokens"], 3);
    assert_eq!(data[1]["completion_tokens"], 2);
    assert_eq!(
        h.admin(Method::GET, &format!("/admin/accounts/{id}/usage?limit=0"))
            .send()
            .await
            .unwrap()
            .status(),
        400
    );

    // Operators' views.
    let p: Value = h.admin(Method::GET, "/admin/providers").send_json().await;
    assert_eq!(p["data"][0]["name"], "mock");
    assert_eq!(
        h.http.get(url("/readyz")).send().await.unwrap().status(),
        200
    );
    pool.close().await;
    h.stop().await;
}
both_stores!(admin_api);
