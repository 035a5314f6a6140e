//! The ledger writer: the one actor that writes money down.
//!
//! Three ways in (see `docs/guarantees.md`, section 3):
//! - The inbox, for charges: the settlement has appended the record to the journal itself
//!   (through the [`JournalSlot`] the writer posts) and leaves it in the writer's inbox. It
//!   rings [`LedgerMsg::Doorbell`] only when the writer has nothing coming that would make it
//!   look there anyway (a `Ship` timer or a shipment's `Shipped`), or when the inbox holds a
//!   full batch. Nobody waits for the writer, and while it ships, settlements send it nothing.
//! - [`LedgerMsg::Append`], for charges when that is not possible (`fsync` mode, or the writer
//!   restarting): the writer journals the record and answers.
//! - [`LedgerMsg::Commit`], for credits and adjustments: the sender is answered once the store
//!   has committed the record, with whether the entry was new.
//!
//! Shipping to the store runs beside the actor, one batch at a time, so a slow store never
//! delays an append. A batch holds everything queued when the previous one finished (at most
//! `max_batch` records): under load batches grow by themselves, and a lone request waits for
//! no timer. A segment of the journal is deleted once the store holds all its records.

use crate::journal::{Journal, JournalError, JournalSync, Replayed};
use crate::metered::Mailbox;
use crate::store::{Record, Store, StoreError};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

/// Where the ledger writer posts its open journal, together with itself, so that a settlement
/// can append its record and tell that very writer to ship it, instead of sending the record
/// and waiting for the answer (two task wake-ups on every call). Posted as a pair because the
/// record must go to the writer whose journal holds it: a successor learns of a predecessor's
/// records by replaying the files, not by messages. Empty while the writer is restarting:
/// appends then go through the writer's mailbox.
#[derive(Clone, Default)]
pub struct JournalSlot(Arc<RwLock<Option<Posted>>>);

/// What [`JournalSlot::append`] did with a record; the record comes back when it was not
/// journaled.
#[derive(Debug)]
pub enum Appended {
    /// In the journal, and on its way to the store.
    Done,
    /// No journal is posted (the writer is starting or restarting, or syncs each record
    /// itself): the writer has to be asked.
    NotPosted(Record),
    /// The journal could not be written.
    Failed(Record, JournalError),
}

#[derive(Clone)]
struct Posted {
    journal: Arc<Mutex<Journal>>,
    writer: ActorRef<LedgerMsg>,
    inbox: Inbox,
    /// The writer's `max_batch`: an inbox this full rings even while the writer ships.
    full: usize,
    /// Records not yet in the store, which `max_buffer` bounds: a record counts from the
    /// moment it is in the inbox, not only once the writer has taken it.
    backlog: Arc<AtomicUsize>,
}

/// Records journaled through the slot, waiting for their writer to queue them for the store.
/// The writer empties it before it handles any message, so a barrier sent after a settlement
/// returned finds that settlement's record queued (a settlement returns only once its record
/// is in here).
type Inbox = Arc<Mutex<InboxState>>;

struct InboxState {
    /// Each record with its journal segment and when it arrived.
    records: Vec<Arrived>,
    /// The writer has nothing coming that would make it look here: the next record rings it.
    /// A ring clears it (one ring is enough); the writer sets it again after each message,
    /// when it is left with no `Ship` or `Shipped` on its way.
    ring: bool,
}

type Arrived = (Record, u64, Instant);

impl Default for InboxState {
    fn default() -> Self {
        InboxState {
            records: Vec::new(),
            ring: true,
        }
    }
}

thread_local! {
    /// Each thread's buffer for encoding a journal line, reused from call to call.
    static LINE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(1024));
}

impl JournalSlot {
    /// Appends `record` if a journal is posted, and hands it to the journal's writer to ship.
    pub fn append(&self, record: Record) -> Appended {
        let posted = self.0.read().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(posted) = posted else {
            return Appended::NotPosted(record);
        };
        // Encoded before the lock is taken, so that the lock is held for the copy alone.
        let written = LINE.with_borrow_mut(|line| {
            Journal::encode(&record, line);
            let mut journal = posted.journal.lock().unwrap_or_else(|p| p.into_inner());
            journal.append_encoded(line)
        });
        let segment = match written {
            Ok(segment) => segment,
            Err(e) => return Appended::Failed(record, e),
        };
        let arrived = Instant::now();
        // Counted before the writer can see it, so that its shipment can never be subtracted
        // from the backlog before it was added.
        posted.backlog.fetch_add(1, Ordering::Relaxed);
        let ring = {
            let mut inbox = posted.inbox.lock().unwrap_or_else(|p| p.into_inner());
            inbox.records.push((record, segment, arrived));
            let ring = inbox.ring || inbox.records.len() == posted.full;
            inbox.ring = false;
            ring
        };
        // If the writer is gone, its successor finds the records in the journal at start.
        if ring {
            let _ = posted.writer.tell(LedgerMsg::Doorbell);
        }
        Appended::Done
    }

    fn post(
        &self,
        journal: Arc<Mutex<Journal>>,
        writer: ActorRef<LedgerMsg>,
        inbox: Inbox,
        full: usize,
        backlog: Arc<AtomicUsize>,
    ) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(Posted {
            journal,
            writer,
            inbox,
            full,
            backlog,
        });
    }

    fn clear(&self) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Why a record was not committed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CommitError {
    #[error("the ledger writer stopped before committing")]
    WriterGone,
    /// The store refused this record itself (not a lost connection): retrying cannot help.
    #[error("the store rejected the record: {0}")]
    Rejected(String),
}

/// `Ok(true)`: the record is new and now durable. `Ok(false)`: it was committed before.
/// An append is answered `Ok(true)` once journaled: newness is the store's to tell.
pub type CommitReply = RpcReplyPort<Result<bool, CommitError>>;

// Nearly every message is an Append: boxing its record would add an allocation per record.
#[allow(clippy::large_enum_variant)]
pub enum LedgerMsg {
    /// Records are waiting in the inbox and the writer had nothing coming (it empties the
    /// inbox before every message anyway).
    Doorbell,
    /// Journal the record; answer once it is in the journal.
    Append(Record, CommitReply),
    /// Commit the record to the store; answer once it is committed there.
    Commit(Record, CommitReply),
    /// Answered once every record sent before it is in the store.
    Barrier(RpcReplyPort<()>),
    /// For an account about to read its balance: its calls that may not be in the store yet.
    /// When every record of the account not yet shipped is a call from the journal replayed
    /// at start, answered at once with those (the account asks the store which it has and
    /// counts the rest itself); otherwise answered, empty, once every record of the account
    /// sent before it is in the store.
    BarrierFor(String, RpcReplyPort<Vec<UnshippedCall>>),
    /// Start a shipment if none is running.
    Ship,
    /// A shipment finished.
    Shipped(Shipment),
    /// `fsync` mode: sync the journal, then answer the appends waiting for it.
    Sync,
}

impl crate::metered::Kind for LedgerMsg {
    const KIND: &'static str = "ledger";
}

pub struct LedgerArgs {
    pub store: Store,
    pub journal_dir: PathBuf,
    pub journal_sync: JournalSync,
    pub segment_bytes: u64,
    pub max_batch: usize,
    /// Pause before a shipment starts, to let it gather more records. Zero: none.
    pub ship_interval: Duration,
    /// How long a stopping writer keeps shipping before it leaves the rest to the next start.
    pub drain_timeout: Duration,
    /// Records written but not yet in the store, shared with whoever applies backpressure.
    pub backlog: Arc<AtomicUsize>,
    /// Where the open journal is posted for settlements to append to.
    pub slot: JournalSlot,
}

/// A call whose record may not be in the store yet: what its account's balance owes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnshippedCall {
    pub request_id: crate::RequestId,
    pub key_id: Option<String>,
    /// What the balance paid (the record's `cost`).
    pub charged: crate::money::Amount,
}

/// An account's records in the journal replayed at start.
#[derive(Default)]
struct ReplayedRecords {
    calls: Vec<UnshippedCall>,
    /// Whether any of them is a ledger entry: the account then waits for the replay.
    entries: bool,
}

/// Who waits for records to reach the store.
enum Waiter {
    All(RpcReplyPort<()>),
    Account(RpcReplyPort<Vec<UnshippedCall>>),
}

impl Waiter {
    fn answer(self) {
        match self {
            Waiter::All(reply) => {
                let _ = reply.send(());
            }
            Waiter::Account(reply) => {
                let _ = reply.send(Vec::new());
            }
        }
    }
}

/// One record on its way to the store.
struct Queued {
    record: Record,
    /// The journal segment holding it; `None` for a record only the store will hold.
    segment: Option<u64>,
    /// Answered after the store commit (`Commit` messages only).
    reply: Option<CommitReply>,
    queued_at: Instant,
}

/// The outcome of one shipment, as the writer learns it.
#[derive(Clone)]
pub struct Shipment {
    /// Sequence number of the last record it shipped.
    through: u64,
    /// Per journal segment, how many of its records are now in the store.
    segments: BTreeMap<u64, u64>,
    /// The accounts whose records it shipped.
    accounts: Vec<String>,
}

pub struct LedgerState {
    store: Store,
    journal: Arc<Mutex<Journal>>,
    slot: JournalSlot,
    sync: JournalSync,
    max_batch: usize,
    ship_interval: Duration,
    drain_timeout: Duration,
    backlog: Arc<AtomicUsize>,
    queue: VecDeque<Queued>,
    /// Records queued since start; the last one queued has this sequence number.
    queued: u64,
    /// Every record up to this sequence number is in the store.
    shipped_through: u64,
    in_flight: Option<tokio::task::JoinHandle<Shipment>>,
    /// A `Ship` is on its way, by timer or by message.
    ship_scheduled: bool,
    /// A `Ship` message (not a timer) is in the mailbox.
    ship_told: bool,
    /// Someone waits for the store (a barrier, a credit) or a batch is full: the shipment
    /// after the running one starts without the pause.
    urgent: bool,
    /// Where settlements leave the records they journaled.
    inbox: Inbox,
    /// The inbox's records while they are being queued (kept for its allocation).
    arrived: Vec<Arrived>,
    barriers: Vec<(u64, Waiter)>,
    /// Per account with records not yet in the store: the sequence number of its last one.
    last_queued: HashMap<String, u64>,
    /// The journal replayed at start, per account, until all of it is in the store: its
    /// records are sequence numbers 1 to `replayed_through`. An account starting meanwhile
    /// takes its calls out of here rather than wait for the replay to reach them (`BarrierFor`).
    replayed: HashMap<String, ReplayedRecords>,
    replayed_through: u64,
    /// `fsync` mode: appends written but not yet synced.
    unsynced: Vec<CommitReply>,
    sync_scheduled: bool,
    backlog_gauge: metrics::Gauge,
}

pub struct LedgerWriter;

impl Actor for LedgerWriter {
    type Msg = LedgerMsg;
    type State = LedgerState;
    type Arguments = LedgerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<LedgerMsg>,
        args: LedgerArgs,
    ) -> Result<LedgerState, ActorProcessingErr> {
        // A previous incarnation's journal must be closed (its lock released) before this one
        // can open it; a settlement still appending holds it for microseconds.
        args.slot.clear();
        let (journal, replayed) = open_journal(&args).await?;
        let journal = Arc::new(Mutex::new(journal));
        let inbox = Inbox::default();
        // Set before the journal is posted: from then on settlements count their own records.
        args.backlog.store(replayed.len(), Ordering::Relaxed);
        if args.journal_sync == JournalSync::Write {
            args.slot.post(
                journal.clone(),
                myself.clone(),
                inbox.clone(),
                args.max_batch.max(1),
                args.backlog.clone(),
            );
        }
        if !replayed.is_empty() {
            tracing::info!(
                records = replayed.len(),
                journal = %args.journal_dir.display(),
                "shipping the records a previous run left in the journal"
            );
        }
        let now = Instant::now();
        let queue: VecDeque<Queued> = replayed
            .into_iter()
            .map(|r| Queued {
                record: r.record,
                segment: Some(r.segment),
                reply: None,
                queued_at: now,
            })
            .collect();
        // Counters of rare events exist from the start, at zero, so that dashboards and alerts
        // see a series rather than nothing.
        for name in [
            "tollgate_ledger_commit_failures_total",
            "tollgate_ledger_rejected_records_total",
            "tollgate_ledger_batches_rechecked_total",
            "tollgate_journal_write_failures_total",
            "tollgate_journal_damaged_records_total",
        ] {
            metrics::counter!(name).increment(0);
        }
        // Per account: its last replayed record, and its replayed calls (see `replayed`).
        let mut last_queued = HashMap::new();
        let mut replayed: HashMap<String, ReplayedRecords> = HashMap::new();
        for (i, q) in queue.iter().enumerate() {
            let account = q.record.account_id();
            last_queued.insert(account.to_owned(), i as u64 + 1);
            let of_account = match replayed.get_mut(account) {
                Some(r) => r,
                None => replayed.entry(account.to_owned()).or_default(),
            };
            match &q.record {
                // A call that cost nothing owes the balance nothing.
                Record::Call(u) if u.cost.nanos() == 0 => {}
                Record::Call(u) => of_account.calls.push(UnshippedCall {
                    request_id: u.request_id.clone(),
                    key_id: u.key_id.clone(),
                    charged: u.cost,
                }),
                Record::Entry(_) => of_account.entries = true,
            }
        }
        let mut state = LedgerState {
            store: args.store,
            journal,
            slot: args.slot,
            sync: args.journal_sync,
            max_batch: args.max_batch.max(1),
            ship_interval: args.ship_interval,
            drain_timeout: args.drain_timeout,
            backlog: args.backlog,
            queued: queue.len() as u64,
            replayed_through: queue.len() as u64,
            queue,
            shipped_through: 0,
            in_flight: None,
            ship_scheduled: false,
            ship_told: false,
            urgent: false,
            inbox,
            arrived: Vec::new(),
            barriers: Vec::new(),
            last_queued,
            replayed,
            unsynced: Vec::new(),
            sync_scheduled: false,
            backlog_gauge: metrics::gauge!("tollgate_ledger_queue_depth"),
        };
        state.publish();
        if !state.queue.is_empty() {
            state.schedule_ship(&myself);
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<LedgerMsg>,
        msg: LedgerMsg,
        state: &mut LedgerState,
    ) -> Result<(), ActorProcessingErr> {
        if state.take_inbox() {
            state.schedule_ship(&myself);
        }
        match msg {
            LedgerMsg::Doorbell => {}
            LedgerMsg::Append(record, reply) => state.append(&myself, record, reply),
            LedgerMsg::Commit(record, reply) => {
                state.enqueue(record, None, Some(reply));
                state.ship_now(&myself);
            }
            LedgerMsg::Barrier(reply) => {
                let through = state.queued;
                state.barrier(&myself, through, Waiter::All(reply));
            }
            LedgerMsg::BarrierFor(account, reply) => {
                let through = state.last_queued.get(&account).copied().unwrap_or(0);
                match state.replayed_calls(&account, through) {
                    Some(calls) => {
                        let _ = reply.send(calls);
                    }
                    None => state.barrier(&myself, through, Waiter::Account(reply)),
                }
            }
            LedgerMsg::Ship => {
                state.ship_scheduled = false;
                state.ship_told = false;
                state.start_shipment(&myself);
            }
            LedgerMsg::Shipped(shipment) => {
                state.in_flight = None;
                state.shipped(shipment);
                if state.urgent || state.queue.len() >= state.max_batch {
                    state.start_shipment(&myself);
                } else if !state.queue.is_empty() {
                    state.schedule_ship(&myself);
                }
            }
            LedgerMsg::Sync => {
                state.sync_scheduled = false;
                state.sync_journal();
            }
        }
        state.rearm(&myself);
        Ok(())
    }

    /// A draining stop reaches here after the mailbox is empty: ship what is left, for as long
    /// as the store lets us. Whatever does not make it stays in the journal for the next start.
    async fn post_stop(
        &self,
        _myself: ActorRef<LedgerMsg>,
        state: &mut LedgerState,
    ) -> Result<(), ActorProcessingErr> {
        // Settlements from now on go through the writer's mailbox, which is closed: they fall
        // back to committing their records to the store.
        state.slot.clear();
        state.take_inbox();
        state.sync_journal();
        let deadline = tokio::time::Instant::now() + state.drain_timeout;
        loop {
            if let Some(task) = state.in_flight.take() {
                match tokio::time::timeout_at(deadline, task).await {
                    Ok(Ok(shipment)) => state.shipped(shipment),
                    Ok(Err(_)) => break,
                    Err(_) => break,
                }
            }
            if state.queue.is_empty() {
                break;
            }
            let batch = state.take_batch();
            state.in_flight = Some(tokio::spawn(ship(state.store.clone(), batch, None)));
        }
        if let Some(task) = state.in_flight.take() {
            task.abort();
        }
        let journal = state.journal();
        let left = journal.unshipped();
        if left > 0 {
            tracing::warn!(
                records = left,
                journal = %journal.dir().display(),
                "the store did not take every journaled record before shutdown; the next start ships them"
            );
        }
        Ok(())
    }
}

impl LedgerState {
    /// Queues for the store what settlements left in the inbox; false if there was nothing.
    fn take_inbox(&mut self) -> bool {
        {
            let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
            if inbox.records.is_empty() {
                return false;
            }
            std::mem::swap(&mut inbox.records, &mut self.arrived);
        }
        let mut arrived = std::mem::take(&mut self.arrived);
        for (record, segment, at) in arrived.drain(..) {
            // Counted in the backlog when it was left in the inbox.
            self.push_queued(record, Some(segment), None, at);
        }
        self.arrived = arrived;
        self.backlog_gauge
            .set(self.backlog.load(Ordering::Relaxed) as f64);
        true
    }

    /// After each message: if a `Ship` or a shipment's `Shipped` is on its way, the writer
    /// will look in the inbox then, and settlements need not ring; otherwise the next record
    /// rings. Decided under the inbox's lock, so a record cannot slip in unrung between the
    /// look and the decision.
    fn rearm(&mut self, myself: &ActorRef<LedgerMsg>) {
        let coming = self.ship_scheduled || self.in_flight.is_some();
        let waiting = {
            let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
            inbox.ring = !coming && inbox.records.is_empty();
            !coming && !inbox.records.is_empty()
        };
        // Records came after this message's look and nothing is scheduled: schedule it now
        // (which leaves a `Ship` coming, so the inbox stays unrung).
        if waiting && self.take_inbox() {
            self.schedule_ship(myself);
        }
    }

    fn journal(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn append(&mut self, myself: &ActorRef<LedgerMsg>, record: Record, reply: CommitReply) {
        let appended = self.journal().append(&record);
        match appended {
            Ok(segment) => {
                self.enqueue(record, Some(segment), None);
                match self.sync {
                    JournalSync::Write => {
                        let _ = reply.send(Ok(true));
                    }
                    JournalSync::Fsync => {
                        self.unsynced.push(reply);
                        if !self.sync_scheduled {
                            self.sync_scheduled = true;
                            let _ = myself.tell(LedgerMsg::Sync);
                        }
                    }
                }
            }
            // No journal to be had (disk full, say): the charge takes the slow road and is
            // answered once the store has it.
            Err(e) => {
                journal_write_failed(&e);
                self.enqueue(record, None, Some(reply));
            }
        }
        self.schedule_ship(myself);
    }

    fn sync_journal(&mut self) {
        if self.unsynced.is_empty() {
            return;
        }
        let result = self.journal().sync();
        if let Err(e) = &result {
            metrics::counter!("tollgate_journal_write_failures_total").increment(1);
            tracing::error!(error = %e, "journal sync failed");
        }
        for reply in self.unsynced.drain(..) {
            // A failed sync leaves the record in the page cache: still journaled, and still
            // shipped; the sender learns that the machine-crash promise does not hold for it.
            let _ = reply.send(match &result {
                Ok(()) => Ok(true),
                Err(_) => Err(CommitError::WriterGone),
            });
        }
    }

    fn barrier(&mut self, myself: &ActorRef<LedgerMsg>, through: u64, waiter: Waiter) {
        if self.shipped_through >= through {
            waiter.answer();
        } else {
            self.barriers.push((through, waiter));
            self.ship_now(myself);
        }
    }

    /// The account's calls from the replayed journal, if they are all it has not yet shipped
    /// (its last record not yet in the store, `through`, is one of them) and none of its
    /// replayed records is an entry. Some of them may be in the store already. Handed over
    /// once: the index shrinks as accounts load, and an account asking again waits.
    fn replayed_calls(&mut self, account: &str, through: u64) -> Option<Vec<UnshippedCall>> {
        if through <= self.shipped_through || through > self.replayed_through {
            return None;
        }
        let replayed = self.replayed.remove(account)?;
        (!replayed.entries).then_some(replayed.calls)
    }

    fn enqueue(&mut self, record: Record, segment: Option<u64>, reply: Option<CommitReply>) {
        self.push_queued(record, segment, reply, Instant::now());
        let backlog = self.backlog.fetch_add(1, Ordering::Relaxed) + 1;
        self.backlog_gauge.set(backlog as f64);
    }

    /// Queues a record for the store; the caller has counted it in the backlog.
    fn push_queued(
        &mut self,
        record: Record,
        segment: Option<u64>,
        reply: Option<CommitReply>,
        arrived: Instant,
    ) {
        self.queued += 1;
        let account = record.account_id();
        match self.last_queued.get_mut(account) {
            Some(seq) => *seq = self.queued,
            None => {
                self.last_queued.insert(account.to_owned(), self.queued);
            }
        }
        self.queue.push_back(Queued {
            record,
            segment,
            reply,
            queued_at: arrived,
        });
    }

    fn schedule_ship(&mut self, myself: &ActorRef<LedgerMsg>) {
        if self.in_flight.is_some() {
            return;
        }
        if self.queue.len() >= self.max_batch {
            // A full batch waits for no timer.
            self.ship_now(myself);
            return;
        }
        if self.ship_scheduled {
            return;
        }
        self.ship_scheduled = true;
        if self.ship_interval.is_zero() {
            let _ = myself.tell(LedgerMsg::Ship);
        } else {
            myself.send_after(self.ship_interval, || LedgerMsg::Ship);
        }
    }

    /// Someone waits for the store: ship without the pause `ship_interval` asks for.
    fn ship_now(&mut self, myself: &ActorRef<LedgerMsg>) {
        if self.in_flight.is_some() {
            self.urgent = true;
        } else if !self.ship_told {
            // A timer may also be pending; its `Ship` then finds nothing to do.
            self.ship_scheduled = true;
            self.ship_told = true;
            let _ = myself.tell(LedgerMsg::Ship);
        }
    }

    fn take_batch(&mut self) -> Batch {
        let n = self.queue.len().min(self.max_batch);
        let mut batch = Batch {
            records: Vec::with_capacity(n),
            waiting: Vec::with_capacity(n),
            queued_at: self.queue.front().map(|q| q.queued_at),
            // Shipments run one at a time, so this batch starts right after `shipped_through`.
            through: self.shipped_through + n as u64,
        };
        for q in self.queue.drain(..n) {
            batch.records.push(q.record);
            batch.waiting.push((q.segment, q.reply));
        }
        batch
    }

    fn start_shipment(&mut self, myself: &ActorRef<LedgerMsg>) {
        if self.in_flight.is_some() || self.queue.is_empty() {
            return;
        }
        self.urgent = false;
        let batch = self.take_batch();
        if let Some(oldest) = batch.queued_at {
            metrics::histogram!("tollgate_ledger_record_wait_seconds")
                .record(oldest.elapsed().as_secs_f64());
        }
        self.in_flight = Some(tokio::spawn(ship(
            self.store.clone(),
            batch,
            Some(myself.clone()),
        )));
    }

    fn shipped(&mut self, shipment: Shipment) {
        if shipment.through <= self.shipped_through {
            return;
        }
        let n = shipment.through.saturating_sub(self.shipped_through);
        self.shipped_through = shipment.through;
        let _ = self
            .backlog
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(n as usize))
            });
        for account in &shipment.accounts {
            if self
                .last_queued
                .get(account)
                .is_some_and(|s| *s <= shipment.through)
            {
                self.last_queued.remove(account);
            }
        }
        let mut journal = self.journal();
        for (segment, count) in shipment.segments {
            journal.shipped(segment, count);
        }
        drop(journal);
        let through = self.shipped_through;
        if through >= self.replayed_through && !self.replayed.is_empty() {
            self.replayed = HashMap::new();
        }
        let mut i = 0;
        while i < self.barriers.len() {
            if self.barriers[i].0 <= through {
                let (_, waiter) = self.barriers.swap_remove(i);
                waiter.answer();
            } else {
                i += 1;
            }
        }
        self.publish();
    }

    fn publish(&self) {
        self.backlog_gauge
            .set(self.backlog.load(Ordering::Relaxed) as f64);
        metrics::gauge!("tollgate_journal_segments").set(self.journal().segments() as f64);
    }
}

struct Batch {
    records: Vec<Record>,
    /// Per record, in the same order: its journal segment and who waits for its commit.
    waiting: Vec<(Option<u64>, Option<CommitReply>)>,
    /// When the oldest record was queued.
    queued_at: Option<Instant>,
    through: u64,
}

/// Commits one batch, retrying until the store takes it, then answers whoever waits for it and
/// tells the writer (if any). Records the store refuses are set aside (see below).
async fn ship(store: Store, batch: Batch, writer: Option<ActorRef<LedgerMsg>>) -> Shipment {
    let started = Instant::now();
    let records = batch.records;
    metrics::histogram!("tollgate_ledger_batch_size").record(records.len() as f64);
    let mut backoff = Duration::from_millis(10);
    let outcome: Vec<Result<bool, CommitError>> = loop {
        match store.commit_batch(&records).await {
            Ok(flags) => break flags.into_iter().map(Ok).collect(),
            // The server refused a statement: find the record(s) at fault, one by one, so
            // that one bad record cannot hold every other charge back.
            Err(e) if e.is_rejection() => break commit_one_by_one(&store, &records).await,
            Err(e) => {
                metrics::counter!("tollgate_ledger_commit_failures_total").increment(1);
                metrics::gauge!("tollgate_ledger_oldest_unflushed_seconds")
                    .set(started.elapsed().as_secs_f64());
                log_commit_failure(&e, records.len(), backoff);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    };
    metrics::histogram!("tollgate_ledger_commit_seconds").record(started.elapsed().as_secs_f64());
    metrics::gauge!("tollgate_ledger_oldest_unflushed_seconds").set(0.0);
    tracing::trace!(
        batch = records.len(),
        micros = started.elapsed().as_micros() as u64,
        "ledger batch committed"
    );
    let accounts: Vec<String> = records
        .iter()
        .map(Record::account_id)
        .collect::<std::collections::BTreeSet<&str>>()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let mut segments = BTreeMap::new();
    for ((record, (segment, reply)), result) in records.into_iter().zip(batch.waiting).zip(outcome)
    {
        if let Some(segment) = segment {
            *segments.entry(segment).or_default() += 1;
            if let Err(CommitError::Rejected(reason)) = &result {
                // Its client was answered when it was journaled. Nothing can be done now but
                // keep it where an operator finds it (`docs/guarantees.md` 3.7).
                tracing::error!(%reason, record = ?record, "the store rejected a journaled charge");
            }
        }
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }
    let shipment = Shipment {
        through: batch.through,
        segments,
        accounts,
    };
    // The writer owns the journal's bookkeeping; if it is gone, its successor ships the
    // journal again from the start.
    if let Some(w) = writer {
        let _ = w.tell(LedgerMsg::Shipped(shipment.clone()));
    }
    shipment
}

async fn commit_one_by_one(store: &Store, records: &[Record]) -> Vec<Result<bool, CommitError>> {
    let mut out = Vec::with_capacity(records.len());
    for record in records {
        let mut backoff = Duration::from_millis(10);
        let result = loop {
            match store.commit_batch(std::slice::from_ref(record)).await {
                Ok(flags) => break Ok(flags.first().copied().unwrap_or(false)),
                Err(e) if e.is_rejection() => {
                    metrics::counter!("tollgate_ledger_rejected_records_total").increment(1);
                    tracing::error!(error = %e, "the store rejected a ledger record");
                    break Err(CommitError::Rejected(e.to_string()));
                }
                Err(e) => {
                    log_commit_failure(&e, 1, backoff);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        };
        out.push(result);
    }
    out
}

/// Opens the journal, waiting a little for the previous incarnation's handle to close: a
/// settlement that took it just before it was withdrawn holds it for microseconds.
async fn open_journal(args: &LedgerArgs) -> Result<(Journal, Vec<Replayed>), JournalError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match Journal::open(&args.journal_dir, args.segment_bytes) {
            Err(JournalError::Locked(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            other => return other,
        }
    }
}

/// A journal write failed: the charge goes to the store directly instead, answered once it is
/// committed there (`docs/guarantees.md` 3.8).
pub(crate) fn journal_write_failed(e: &JournalError) {
    metrics::counter!("tollgate_journal_write_failures_total").increment(1);
    tracing::error!(error = %e, "journal write failed; committing the charge to the store directly");
}

fn log_commit_failure(e: &StoreError, batch: usize, retry_in: Duration) {
    tracing::error!(error = %e, batch, retry_in_ms = retry_in.as_millis() as u64, "ledger commit failed; retrying");
}

#[cfg(test)]
mod tests;
