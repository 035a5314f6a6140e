#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::money::Amount;
use crate::store::{now_ms, EntryKind, LedgerEntry};
use ractor::rpc::CallResult;

fn credit(id: &str, account: &str, nanos: i64) -> Record {
    Record {
        ledger: Some(LedgerEntry {
            entry_id: id.to_owned(),
            account_id: account.to_owned(),
            kind: EntryKind::Credit,
            amount: Amount(nanos),
            key_id: None,
            reason: None,
            created_at: now_ms(),
        }),
        usage: None,
    }
}

/// One record the store refuses (here: an unknown account) fails alone; the rest of its
/// batch commits.
#[tokio::test]
async fn a_rejected_record_does_not_hold_back_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(&format!("sqlite://{}/l.db", dir.path().display()))
        .await
        .unwrap();
    store.create_account("a", "a@example.com").await.unwrap();
    let args = LedgerArgs {
        store: store.clone(),
        max_batch: 64,
        flush_interval: Duration::from_millis(20),
    };
    let (ledger, _) = Actor::spawn(None, LedgerWriter, args).await.unwrap();

    let records = [
        credit("ok1", "a", 5),
        credit("bad", "nobody", 7),
        credit("ok2", "a", 11),
    ];
    let replies: Vec<_> = records
        .into_iter()
        .map(|r| {
            let (tx, rx) = ractor::concurrency::oneshot();
            ledger
                .send_message(LedgerMsg::Commit(r, tx.into()))
                .unwrap();
            rx
        })
        .collect();
    let mut results = Vec::new();
    for rx in replies {
        results.push(rx.await.unwrap());
    }
    assert!(matches!(results[0], Ok(true)));
    assert!(
        matches!(results[1], Err(CommitError::Rejected(_))),
        "{:?}",
        results[1]
    );
    assert!(matches!(results[2], Ok(true)));
    assert_eq!(
        store.account("a").await.unwrap().unwrap().balance,
        Amount(16)
    );

    // The writer is still healthy.
    let barrier = ledger.call(LedgerMsg::Barrier, None).await.unwrap();
    assert!(matches!(barrier, CallResult::Success(())));
    ledger.stop(None);
}
