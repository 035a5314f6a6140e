//! The supervisor restarts what fails: an account actor killed mid-traffic comes back with its
//! balance intact, a killed ledger writer loses no charge.

use crate::both_stores;
use crate::common::*;
use futures::future::join_all;
use serde_json::{json, Value};
use std::time::Duration;
use tollgate_actors::supervisor::ChildKind;
use tollgate_actors::Amount;

fn restarts_of(tree: &Value, name: &str) -> Option<u64> {
    if tree["name"] == name {
        return tree["restarts"].as_u64();
    }
    tree["children"]
        .as_array()?
        .iter()
        .find_map(|c| restarts_of(c, name))
}

async fn killed_account_actor_restarts_with_balance_intact(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let (account, key) = h.funded("2").await;
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": "before the crash"}]});
    for _ in 0..5 {
        assert_eq!(h.chat(&key, &body).await.status(), 200);
    }
    let before = h.balance(&account).await;

    assert!(
        h.gateway
            .app()
            .system
            .billing
            .kill_account_actor(&account)
            .await
    );
    // Until the restart backoff passes, requests find the successor by themselves.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        h.balance(&account).await,
        before,
        "reloaded from the store, exactly"
    );

    let tree: Value = h
        .admin(reqwest::Method::GET, "/admin/actors")
        .send_json()
        .await;
    assert_eq!(
        restarts_of(&tree, &format!("account:{account}")),
        Some(1),
        "{tree}"
    );

    let resp = h.chat(&key, &body).await;
    assert_eq!(resp.status(), 200);
    let cost: Amount = resp.headers()["x-tollgate-cost"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        h.balance(&account).await,
        Amount(before.nanos() - cost.nanos())
    );

    let l = h.ledger(&account).await;
    assert_eq!(l.ledger_sum, l.balance);
    assert_eq!(l.charge_count, 6);
    h.stop().await;
}
both_stores!(killed_account_actor_restarts_with_balance_intact);

async fn kills_mid_traffic_lose_no_charge(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let (account, key) = h.funded("10").await;
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": "under fire"}]});
    let system = &h.gateway.app().system;
    let traffic = async {
        let mut statuses = Vec::new();
        for round in 0..10 {
            let batch = (0..20).map(|i| {
                let mut b = body.clone();
                if (round + i) % 2 == 0 {
                    b["stream"] = json!(true);
                }
                let key = key.clone();
                let h = &h;
                async move {
                    let r = h.chat(&key, &b).await;
                    let s = r.status().as_u16();
                    let _ = r.text().await;
                    s
                }
            });
            statuses.extend(join_all(batch).await);
        }
        statuses
    };
    let mut kills = 0;
    let chaos = async {
        for i in 0..8 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            // A kill can find its target already restarting; that is fine, most land.
            let landed = match i % 4 {
                0 => system.billing.kill_account_actor(&account).await,
                1 => system.kill(ChildKind::Ledger).await,
                2 => system.kill(ChildKind::Provider("mock".to_owned())).await,
                _ => system.kill(ChildKind::Directory).await,
            };
            kills += usize::from(landed);
        }
    };
    let (statuses, _) = tokio::join!(traffic, chaos);
    assert!(kills >= 4, "kills landed: {kills}");
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every request completed: {statuses:?}"
    );

    let after = h.balance(&account).await;
    let usage = h.usage(&account).await;
    assert_eq!(usage.len(), ok);
    let billed = billed(&usage);
    let odd: Vec<_> = usage
        .iter()
        .filter(|u| u["cost"] != usage[0]["cost"])
        .collect();
    assert_eq!(10_000_000_000 - after.nanos(), billed, "odd usage: {odd:?}");
    let l = h.ledger(&account).await;
    assert_eq!(l.balance, after.nanos());
    assert_eq!(l.ledger_sum, l.balance);
    assert_eq!(l.charge_count as usize, ok);
    h.stop().await;
}
both_stores!(kills_mid_traffic_lose_no_charge);
