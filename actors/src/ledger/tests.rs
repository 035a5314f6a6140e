#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::money::Amount;
use crate::store::tests::{charge, entry};
use crate::store::EntryKind;
use ractor::rpc::CallResult;

struct Setup {
    dir: tempfile::TempDir,
    store: Store,
    backlog: Arc<AtomicUsize>,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::connect(&format!("sqlite://{}/l.db", dir.path().display()))
        .await
        .unwrap();
    store.create_account("a", "a@example.com").await.unwrap();
    Setup {
        dir,
        store,
        backlog: Arc::new(AtomicUsize::new(0)),
    }
}

impl Setup {
    fn journal_dir(&self) -> PathBuf {
        self.dir.path().join("journal")
    }

    fn args(&self) -> LedgerArgs {
        LedgerArgs {
            store: self.store.clone(),
            journal_dir: self.journal_dir(),
            journal_sync: JournalSync::Write,
            segment_bytes: 1 << 20,
            max_batch: 64,
            ship_interval: Duration::from_millis(20),
            drain_timeout: Duration::from_secs(5),
            backlog: self.backlog.clone(),
            slot: JournalSlot::default(),
        }
    }

    async fn writer(&self) -> ActorRef<LedgerMsg> {
        Actor::spawn(None, LedgerWriter, self.args())
            .await
            .unwrap()
            .0
    }

    async fn balance(&self) -> Amount {
        self.store.account("a").await.unwrap().unwrap().balance
    }
}

fn send(
    ledger: &ActorRef<LedgerMsg>,
    msg: impl FnOnce(CommitReply) -> LedgerMsg,
) -> tokio::sync::oneshot::Receiver<Result<bool, CommitError>> {
    let (tx, rx) = ractor::concurrency::oneshot();
    ledger.send_message(msg(tx.into())).unwrap();
    rx
}

async fn barrier(ledger: &ActorRef<LedgerMsg>) {
    let done = ledger.call(LedgerMsg::Barrier, None).await.unwrap();
    assert!(matches!(done, CallResult::Success(())));
}

/// One record the store refuses (here: an unknown account) fails alone; the rest of its
/// batch commits.
#[tokio::test]
async fn a_rejected_record_does_not_hold_back_its_batch() {
    let s = setup().await;
    let ledger = s.writer().await;
    let replies: Vec<_> = [
        entry("ok1", "a", EntryKind::Credit, 5),
        entry("bad", "nobody", EntryKind::Credit, 7),
        entry("ok2", "a", EntryKind::Credit, 11),
    ]
    .into_iter()
    .map(|r| send(&ledger, |port| LedgerMsg::Commit(r, port)))
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
    assert_eq!(s.balance().await, Amount(16));
    // A repeated entry is committed, and says it was not new.
    let again = send(&ledger, |port| {
        LedgerMsg::Commit(entry("ok1", "a", EntryKind::Credit, 5), port)
    });
    assert!(matches!(again.await.unwrap(), Ok(false)));
    assert_eq!(s.balance().await, Amount(16));

    // The writer is still healthy.
    barrier(&ledger).await;
    ledger.stop(None);
}

/// An append is answered from the journal; the store has it after a barrier, and the backlog
/// counts it until then.
#[tokio::test]
async fn appends_are_answered_from_the_journal_then_shipped() {
    let s = setup().await;
    let ledger = s.writer().await;
    let credit = send(&ledger, |port| {
        LedgerMsg::Commit(entry("credit", "a", EntryKind::Credit, 1_000), port)
    });
    assert!(matches!(credit.await.unwrap(), Ok(true)));
    for i in 0..10 {
        let rx = send(&ledger, |port| {
            LedgerMsg::Append(charge(&format!("c{i}"), "a", 7), port)
        });
        assert!(matches!(rx.await.unwrap(), Ok(true)));
    }
    barrier(&ledger).await;
    assert_eq!(s.backlog.load(Ordering::Relaxed), 0);
    assert_eq!(s.balance().await, Amount(1_000 - 70));
    ledger.stop(None);
}

/// Records a dead process left in the journal reach the store when the next writer starts,
/// once each, however often they are replayed.
#[tokio::test]
async fn a_new_writer_ships_what_the_journal_holds() {
    let s = setup().await;
    s.store
        .commit_batch(&[entry("credit", "a", EntryKind::Credit, 1_000)])
        .await
        .unwrap();
    // A previous run journaled three charges and died before shipping them; one of them
    // had reached the store anyway.
    {
        let (mut journal, _) = Journal::open(&s.journal_dir(), 1 << 20).unwrap();
        for i in 0..3 {
            journal.append(&charge(&format!("c{i}"), "a", 100)).unwrap();
        }
    }
    s.store
        .commit_batch(&[charge("c1", "a", 100)])
        .await
        .unwrap();
    assert_eq!(s.balance().await, Amount(900));

    let ledger = s.writer().await;
    barrier(&ledger).await;
    assert_eq!(s.balance().await, Amount(700));
    assert_eq!(s.backlog.load(Ordering::Relaxed), 0);
    ledger.stop_and_wait(None, None).await.unwrap();

    // Shipped segments were deleted: a second start ships nothing and moves nothing.
    let ledger = s.writer().await;
    barrier(&ledger).await;
    assert_eq!(s.balance().await, Amount(700));
    ledger.stop_and_wait(None, None).await.unwrap();
    let left: Vec<_> = std::fs::read_dir(s.journal_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".log"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// An account's barrier waits for that account's records only: starting one account's actor
/// is not held up by every other account's backlog.
#[tokio::test]
async fn an_account_barrier_waits_for_that_account_only() {
    let s = setup().await;
    s.store.create_account("b", "b@example.com").await.unwrap();
    let args = LedgerArgs {
        // Nothing ships on its own during this test.
        ship_interval: Duration::from_secs(3600),
        ..s.args()
    };
    let ledger = Actor::spawn(None, LedgerWriter, args).await.unwrap().0;
    let rx = send(&ledger, |port| {
        LedgerMsg::Append(entry("a1", "a", EntryKind::Credit, 5), port)
    });
    assert!(matches!(rx.await.unwrap(), Ok(true)));

    let barrier_for = async |account: &str| {
        let done = ledger
            .call(|port| LedgerMsg::BarrierFor(account.to_owned(), port), None)
            .await
            .unwrap();
        assert!(matches!(done, CallResult::Success(calls) if calls.is_empty()));
    };
    // b has nothing queued: answered at once, with a's record still unshipped.
    barrier_for("b").await;
    assert_eq!(s.balance().await, Amount(0));
    assert_eq!(s.backlog.load(Ordering::Relaxed), 1);

    // a's barrier ships a's record, whatever the pause.
    barrier_for("a").await;
    assert_eq!(s.balance().await, Amount(5));
    ledger.stop(None);
}

/// An account whose only unshipped records are calls from the replayed journal gets them at
/// once, to count itself, instead of waiting for the replay to reach them. An account with an
/// entry there, or with a record of this run, waits as before.
#[tokio::test]
async fn an_account_gets_its_replayed_calls_instead_of_waiting_for_the_replay() {
    let s = setup().await;
    s.store.create_account("b", "b@example.com").await.unwrap();
    let journal_then_start = async |records: &[Record]| {
        {
            let (mut journal, _) = Journal::open(&s.journal_dir(), 1 << 20).unwrap();
            for r in records {
                journal.append(r).unwrap();
            }
        }
        let args = LedgerArgs {
            // Nothing ships on its own during this test.
            ship_interval: Duration::from_secs(3600),
            ..s.args()
        };
        Actor::spawn(None, LedgerWriter, args).await.unwrap().0
    };
    let barrier_for = async |ledger: &ActorRef<LedgerMsg>, account: &str| match ledger
        .call(|port| LedgerMsg::BarrierFor(account.to_owned(), port), None)
        .await
        .unwrap()
    {
        CallResult::Success(calls) => calls
            .into_iter()
            .map(|c| (c.request_id.to_string(), c.charged.nanos()))
            .collect::<Vec<_>>(),
        _ => panic!("no answer"),
    };

    let ledger = journal_then_start(&[
        charge("c0", "a", 100),
        charge("free", "a", 0), // owes nothing, so not handed over
        entry("b1", "b", EntryKind::Credit, 5),
        charge("c1", "a", 30),
    ])
    .await;
    assert_eq!(
        barrier_for(&ledger, "a").await,
        [("c0".to_owned(), 100), ("c1".to_owned(), 30)]
    );
    assert_eq!(s.balance().await, Amount(0), "nothing was shipped for it");
    assert_eq!(s.backlog.load(Ordering::Relaxed), 4);
    // b's replayed record is an entry: b waits until it is in the store.
    assert!(barrier_for(&ledger, "b").await.is_empty());
    let b = s.store.account("b").await.unwrap().unwrap().balance;
    assert_eq!(b, Amount(5));
    assert_eq!(s.balance().await, Amount(-130));
    ledger.stop_and_wait(None, None).await.unwrap();

    // Handed over once: asked again (a second start of a's actor), a waits for them.
    let ledger = journal_then_start(&[charge("c2", "a", 7)]).await;
    assert_eq!(barrier_for(&ledger, "a").await, [("c2".to_owned(), 7)]);
    assert_eq!(s.balance().await, Amount(-130));
    assert!(barrier_for(&ledger, "a").await.is_empty());
    assert_eq!(s.balance().await, Amount(-137));
    ledger.stop_and_wait(None, None).await.unwrap();

    // A call of this run, after the replayed ones: a waits for all of them.
    let ledger = journal_then_start(&[charge("c3", "a", 1)]).await;
    let rx = send(&ledger, |port| {
        LedgerMsg::Append(charge("c4", "a", 1), port)
    });
    assert!(matches!(rx.await.unwrap(), Ok(true)));
    assert!(barrier_for(&ledger, "a").await.is_empty());
    assert_eq!(s.balance().await, Amount(-139));
    ledger.stop_and_wait(None, None).await.unwrap();
}

/// A record appended through the posted journal reaches the store through the writer that
/// posted it, with no message from the appender to any other writer.
#[tokio::test]
async fn a_record_appended_through_the_slot_is_shipped_by_its_writer() {
    let s = setup().await;
    let slot = JournalSlot::default();
    assert!(
        matches!(
            slot.append(entry("early", "a", EntryKind::Credit, 1)),
            Appended::NotPosted(_)
        ),
        "nothing posted before a writer starts"
    );
    let args = LedgerArgs {
        slot: slot.clone(),
        ..s.args()
    };
    let ledger = Actor::spawn(None, LedgerWriter, args).await.unwrap().0;
    for i in 0..3 {
        assert!(matches!(
            slot.append(entry(&format!("c{i}"), "a", EntryKind::Credit, 10)),
            Appended::Done
        ));
    }
    barrier(&ledger).await;
    assert_eq!(s.balance().await, Amount(30));
    ledger.stop_and_wait(None, None).await.unwrap();
    assert!(
        matches!(
            slot.append(entry("late", "a", EntryKind::Credit, 1)),
            Appended::NotPosted(_)
        ),
        "a stopped writer withdraws its journal"
    );
}

/// Settlements ring the writer only when it has nothing coming: records left in the inbox
/// reach the store with nobody asking, whether the writer was idle, had a `Ship` pending, or
/// was shipping when more than a batch arrived.
#[tokio::test]
async fn records_left_in_the_inbox_ship_without_being_asked() {
    let s = setup().await;
    let slot = JournalSlot::default();
    let args = LedgerArgs {
        slot: slot.clone(),
        ..s.args()
    };
    let ledger = Actor::spawn(None, LedgerWriter, args).await.unwrap().0;
    let append = |id: String| {
        assert!(matches!(
            slot.append(entry(&id, "a", EntryKind::Credit, 1)),
            Appended::Done
        ));
    };
    let until_balance = async |nanos: i64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.balance().await != Amount(nanos) {
            assert!(
                Instant::now() < deadline,
                "balance stuck at {}",
                s.balance().await
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    // Idle writer: the first record rings.
    append("first".to_owned());
    until_balance(1).await;
    // A burst of three batches and a bit: the first rings, the rest arrive while a `Ship` is
    // pending or a shipment runs.
    for i in 0..200 {
        append(format!("burst{i}"));
    }
    until_balance(201).await;
    // Idle again, after the burst's last shipment.
    tokio::time::sleep(Duration::from_millis(50)).await;
    append("last".to_owned());
    until_balance(202).await;
    // The store commits before the writer hears of it; a barrier waits for the writer's books.
    barrier(&ledger).await;
    assert_eq!(s.backlog.load(Ordering::Relaxed), 0);
    ledger.stop_and_wait(None, None).await.unwrap();
}

/// With no pause between shipments, more than a batch waiting at start ships in full batches,
/// one after another (this once recursed without end).
#[tokio::test]
async fn no_pause_and_more_than_a_batch_at_start() {
    let s = setup().await;
    {
        let (mut journal, _) = Journal::open(&s.journal_dir(), 1 << 20).unwrap();
        for i in 0..150 {
            journal
                .append(&entry(&format!("c{i}"), "a", EntryKind::Credit, 2))
                .unwrap();
        }
    }
    let args = LedgerArgs {
        ship_interval: Duration::ZERO,
        ..s.args()
    };
    let ledger = Actor::spawn(None, LedgerWriter, args).await.unwrap().0;
    barrier(&ledger).await;
    assert_eq!(s.balance().await, Amount(300));
    ledger.stop_and_wait(None, None).await.unwrap();
}

/// A record counts against `max_buffer` from the moment it is in the inbox, even while the
/// writer, shipping, has not looked there yet (during a store outage it would not for long).
#[tokio::test]
async fn the_backlog_counts_records_in_the_inbox() {
    let s = setup().await;
    let slot = JournalSlot::default();
    let args = LedgerArgs {
        slot: slot.clone(),
        ship_interval: Duration::from_secs(3600),
        ..s.args()
    };
    let ledger = Actor::spawn(None, LedgerWriter, args).await.unwrap().0;
    for i in 0..3 {
        assert!(matches!(
            slot.append(entry(&format!("c{i}"), "a", EntryKind::Credit, 1)),
            Appended::Done
        ));
        assert_eq!(s.backlog.load(Ordering::Relaxed), i + 1);
    }
    barrier(&ledger).await;
    assert_eq!(s.backlog.load(Ordering::Relaxed), 0);
    assert_eq!(s.balance().await, Amount(3));
    ledger.stop_and_wait(None, None).await.unwrap();
}
