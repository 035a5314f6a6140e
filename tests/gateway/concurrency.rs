//! Hundreds of simultaneous requests on one account funded for only some of them: the balance
//! never goes below zero, and what left the balance is exactly what the usage records charge.

use crate::both_stores;
use crate::common::*;
use futures::future::join_all;
use serde_json::json;
use tollgate_actors::Amount;

async fn concurrent_requests_never_overdraw(backend: Backend) {
    let Some(h) = Harness::start(backend).await else {
        return;
    };
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]});
    let body_len = serde_json::to_vec(&body).unwrap().len() as u128;
    let worst = (body_len * 150_000_000 + 16 * 600_000_000).div_ceil(1_000_000) as i64;
    let funds = Amount(worst * 100);
    let account = h.account("crowd@example.com").await;
    h.credit(&account, &funds.to_string()).await;
    let (_, key) = h.key(&account, json!({})).await;

    const N: usize = 300;
    let requests = (0..N).map(|i| {
        let mut b = body.clone();
        if i % 2 == 1 {
            b["stream"] = json!(true);
        }
        let h = &h;
        let key = key.clone();
        async move {
            let resp = h.chat(&key, &b).await;
            let status = resp.status().as_u16();
            let complete = if status == 200 {
                let text = resp.text().await.unwrap();
                i % 2 == 0 || text.ends_with("data: [DONE]\n\n")
            } else {
                false
            };
            (status, complete)
        }
    });
    let results = join_all(requests).await;
    let ok = results.iter().filter(|(s, c)| *s == 200 && *c).count();
    let refused = results.iter().filter(|(s, _)| *s == 402).count();
    assert_eq!(
        ok + refused,
        N,
        "only 200 or 402: {:?}",
        results
            .iter()
            .filter(|(s, _)| *s != 200 && *s != 402)
            .collect::<Vec<_>>()
    );
    assert!(ok >= 50, "most funded requests succeed: {ok}");
    assert!(refused > 0, "the account was not funded for all {N}");

    let after = h.balance(&account).await;
    assert!(after.nanos() >= 0, "balance below zero: {after}");
    let usage = h.usage(&account).await;
    assert_eq!(usage.len(), ok);
    let billed = billed(&usage);
    assert_eq!(
        funds.nanos() - after.nanos(),
        billed,
        "balance change = sum of usage costs, exactly"
    );
    assert!(usage.iter().all(|u| u["uncollected"] == "0"));

    let l = h.ledger(&account).await;
    assert_eq!(l.balance, after.nanos());
    assert_eq!(l.ledger_sum, l.balance);
    assert_eq!(l.charges, billed);
    assert_eq!(l.charge_count as usize, ok);
    h.stop().await;
}
both_stores!(concurrent_requests_never_overdraw);
