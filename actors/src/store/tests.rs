#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

async fn sqlite() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(&format!("sqlite://{}/t.db", dir.path().display()))
        .await
        .unwrap();
    (store, dir)
}

fn charge(id: &str, account: &str, nanos: i64) -> Record {
    Record {
        ledger: Some(LedgerEntry {
            entry_id: id.to_owned(),
            account_id: account.to_owned(),
            kind: EntryKind::Charge,
            amount: Amount(-nanos),
            key_id: None,
            reason: None,
            created_at: now_ms(),
        }),
        usage: None,
    }
}

#[tokio::test]
async fn an_entry_counts_once_however_often_it_is_written() {
    let (store, _dir) = sqlite().await;
    store.create_account("a", "a@example.com").await.unwrap();
    let credit = Record {
        ledger: Some(LedgerEntry {
            entry_id: "c1".to_owned(),
            account_id: "a".to_owned(),
            kind: EntryKind::Credit,
            amount: Amount(1000),
            key_id: None,
            reason: Some("test".to_owned()),
            created_at: now_ms(),
        }),
        usage: None,
    };
    assert_eq!(
        store
            .commit_batch(std::slice::from_ref(&credit))
            .await
            .unwrap(),
        vec![true]
    );
    // The same charge twice in one batch, then again in a later batch, and the credit again.
    let flags = store
        .commit_batch(&[
            charge("r1", "a", 100),
            charge("r1", "a", 100),
            charge("r2", "a", 7),
        ])
        .await
        .unwrap();
    assert_eq!(flags, vec![true, false, true]);
    let flags = store
        .commit_batch(&[charge("r1", "a", 100), credit])
        .await
        .unwrap();
    assert_eq!(flags, vec![false, false]);
    assert_eq!(
        store.account("a").await.unwrap().unwrap().balance,
        Amount(1000 - 107)
    );
    let found = store
        .committed_entries(&["r1".to_owned(), "r3".to_owned(), "c1".to_owned()])
        .await
        .unwrap();
    assert_eq!(
        found,
        ["r1".to_owned(), "c1".to_owned()].into_iter().collect()
    );
}

#[tokio::test]
async fn duplicate_email_is_its_own_error() {
    let (store, _dir) = sqlite().await;
    store.create_account("a", "a@example.com").await.unwrap();
    assert!(matches!(
        store.create_account("b", "a@example.com").await,
        Err(StoreError::DuplicateEmail(_))
    ));
}
