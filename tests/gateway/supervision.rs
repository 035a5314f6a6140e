//! The supervisor restarts what fails: an account actor killed mid-traffic comes back with its
//! balance intact, a killed ledger writer loses no charge, and an account whose start is held
//! up holds up no other account.

use crate::both_stores;
use crate::common::*;
use futures::future::join_all;
use serde_json::{json, Value};
use std::time::Duration;
use tollgate_actors::supervisor::ChildKind;
use tollgate_actors::Amount;

fn restarts_of(tree: &Value, name: &str) -> Option<u64> {
    node(tree, name)?["restarts"].as_u64()
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
    let cost = charged(&resp);
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

/// Account A's actor is restarted while a charge of A's cannot reach the store (a test
/// transaction holds the store's write lock), so its start waits for that charge (the ledger's
/// barrier, docs/guarantees.md). Meanwhile account B's actor restarts and B's call is answered:
/// the directory starts accounts side by side. Once the lock goes, A's waiting call is
/// answered too, and both ledgers add up.
async fn a_held_up_account_start_holds_up_no_other_account(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let (a, key_a) = h.funded("1").await;
    let (b, key_b) = h.funded("1").await;
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": "side by side"}]});
    assert_eq!(h.chat(&key_a, &body).await.status(), 200);
    h.flush().await;

    // Shipments block on this lock; reading an account does not.
    let pool = h.db.pool().await;
    let mut lock = pool.begin().await.expect("begin");
    let take_lock = match backend {
        Backend::Postgres => "LOCK TABLE usage_records IN ACCESS EXCLUSIVE MODE",
        Backend::Sqlite => "DELETE FROM usage_records WHERE request_id = ''",
    };
    sqlx::query(take_lock)
        .execute(&mut *lock)
        .await
        .expect("take the write lock");

    assert_eq!(
        h.chat(&key_a, &body).await.status(),
        200,
        "journaled, not shipped"
    );
    let billing = &h.gateway.app().system.billing;
    assert!(billing.kill_account_actor(&a).await);
    let a_call = tokio::spawn({
        let (h_chat, base, key, body) =
            (h.http.clone(), h.base.clone(), key_a.clone(), body.clone());
        async move {
            h_chat
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        }
    });
    // The listing comes from the directory itself, so it answering at all shows the directory
    // is not waiting on A's start.
    let a_name = format!("account:{a}");
    let a_starting = async {
        loop {
            let tree: Value = h
                .admin(reqwest::Method::GET, "/admin/actors")
                .send_json()
                .await;
            let status = node(&tree, &a_name).map_or(Value::Null, |n| n["status"].clone());
            if status == "Starting" {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    let a_status = tokio::time::timeout(Duration::from_secs(10), a_starting)
        .await
        .expect("the directory lists A as starting while A's start is held up");
    assert_eq!(a_status, "Starting", "A's start waits for its charge");

    assert!(billing.kill_account_actor(&b).await);
    // Well inside the 30 s A's start may wait before it gives up.
    let b_status = tokio::time::timeout(Duration::from_secs(15), h.chat(&key_b, &body))
        .await
        .expect("B answered while A's start is held up")
        .status();
    assert_eq!(b_status, 200);
    assert!(!a_call.is_finished(), "A's call waits for A's start");

    lock.rollback().await.expect("release the lock");
    let a_status = a_call.await.expect("task").expect("A's call");
    assert_eq!(a_status, 200);
    pool.close().await;

    for (account, calls) in [(&a, 3), (&b, 1)] {
        let l = h.ledger(account).await;
        assert_eq!(l.ledger_sum, l.balance, "{account}");
        assert_eq!(l.charge_count, calls, "{account}");
        assert_eq!(h.balance(account).await.nanos(), l.balance, "{account}");
    }
    h.stop().await;
}
both_stores!(a_held_up_account_start_holds_up_no_other_account);

/// With many accounts live, `/admin/actors` lists a few, worst off first, and counts them all
/// (listing 100,000 accounts took 14.7 MB of JSON: BENCHMARKS item 53).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_actor_listing_shows_the_worst_off_accounts_first_and_counts_the_rest() {
    let Some(h) = Harness::start(Backend::Sqlite).await else {
        return;
    };
    let mut accounts = Vec::new();
    for _ in 0..5 {
        accounts.push(h.funded("1").await.0);
    }
    let killed = &accounts[3];
    assert!(
        h.gateway
            .app()
            .system
            .billing
            .kill_account_actor(killed)
            .await
    );
    // Back after its restart's backoff.
    let mut restarted = false;
    for _ in 0..200 {
        let dir = h.directory("").await;
        if dir["children"].as_array().unwrap().iter().any(|c| {
            c["name"] == format!("account:{killed}")
                && c["restarts"] == 1
                && c["status"] == "Running"
        }) {
            restarted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(restarted, "{}", h.directory("").await);

    let names = |dir: &Value| -> Vec<String> {
        dir["children"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let all = h.directory("").await;
    assert_eq!(all["children_total"], 5);
    assert_eq!(names(&all).len(), 5);
    assert_eq!(
        names(&all)[0],
        format!("account:{killed}"),
        "most restarts first"
    );
    let two = h.directory("?accounts=2").await;
    assert_eq!(two["children_total"], 5);
    assert_eq!(names(&two), names(&all)[..2]);
    let none = h.directory("?accounts=0").await;
    assert_eq!(
        (none["children_total"].as_u64(), names(&none).len()),
        (Some(5), 0)
    );
    let one = h.directory(&format!("?account={}", accounts[1])).await;
    assert_eq!(names(&one), [format!("account:{}", accounts[1])]);
    assert_eq!(one["children_total"], 1);
    let nobody = h.directory("?account=acct_nope").await;
    assert_eq!(
        (nobody["children_total"].as_u64(), names(&nobody).len()),
        (Some(0), 0)
    );

    for bad in ["1001", "-1", "many", ""] {
        let r = h
            .admin(
                reqwest::Method::GET,
                &format!("/admin/actors?accounts={bad}"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        assert_error_shape(&r.json().await.unwrap(), "invalid_request_error");
    }
    h.stop().await;
}
