//! `Billing`: how request handlers talk to the account actors and the ledger writer.
//!
//! One charge, end to end: [`Billing::reserve`] asks the account actor to hold the worst case;
//! the call goes upstream; [`Billing::settle`] sends the actual cost to the same actor, which
//! applies it and forwards the record to the ledger writer; `settle` returns once the record
//! is durable in the journal. See `docs/guarantees.md`.

use crate::account::{
    AccountMsg, BalanceView, CreditRequest, Reservation, ReserveRequest, SettleRequest,
};
use crate::directory::{Books, DirectoryMsg, LiveAccounts};
use crate::ledger::{Appended, JournalSlot};
use crate::ledger::{CommitError, LedgerMsg};
use crate::metered::Mailbox;
use crate::money::Amount;
use crate::slot::Slot;
use crate::store::{Record, UsageRecord};
use ractor::rpc::CallResult;
use ractor::{ActorRef, RpcReplyPort};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum BillingError {
    #[error("insufficient balance: {available} USDT available, at least {needed} USDT needed")]
    InsufficientBalance { available: Amount, needed: Amount },
    #[error("no account `{0}`")]
    NoSuchAccount(String),
    #[error("{0} unavailable")]
    Unavailable(&'static str),
    /// The store is not taking commits and the ledger's backlog is full: refuse new work
    /// rather than let the node's unshipped charges grow without bound.
    #[error("the ledger backlog is full ({0} charges awaiting the store)")]
    LedgerBufferFull(usize),
}

/// How often a message to an account whose actor just died is retried on its successor.
const ATTEMPTS: usize = 50;
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// How long a settlement keeps resending its record to a restarting ledger writer.
const COMMIT_PATIENCE: Duration = Duration::from_secs(120);

#[derive(Clone)]
pub struct Billing {
    live: LiveAccounts,
    books: Books,
    /// Records journaled (or queued) and not yet in the store; the ledger writer keeps it.
    backlog: Arc<AtomicUsize>,
    max_buffer: usize,
    directory: Slot<DirectoryMsg>,
    ledger: Slot<LedgerMsg>,
    journal: JournalSlot,
}

enum Attempt<T> {
    Done(T),
    /// The actor was gone before it handled the message; nothing was applied.
    Retry,
}

impl Billing {
    pub fn new(
        live: LiveAccounts,
        books: Books,
        directory: Slot<DirectoryMsg>,
        ledger: Slot<LedgerMsg>,
        journal: JournalSlot,
        backlog: Arc<AtomicUsize>,
        max_buffer: usize,
    ) -> Self {
        Billing {
            journal,
            live,
            books,
            backlog,
            max_buffer: max_buffer.max(1),
            directory,
            ledger,
        }
    }

    /// The live actor for an account, starting it if needed. No message on the common path.
    async fn account(&self, account_id: &str) -> Result<ActorRef<AccountMsg>, BillingError> {
        if let Some(actor) = self.live.get(account_id) {
            return Ok(actor.clone());
        }
        for _ in 0..ATTEMPTS {
            let reply = self
                .directory
                .get()
                .ask(
                    |port| DirectoryMsg::Get(account_id.to_owned(), port),
                    Some(Duration::from_secs(30)),
                )
                .await;
            match reply {
                // The actor could not start (its store or the ledger writer is restarting).
                Ok(CallResult::Success(Err(BillingError::Unavailable(_)))) => {}
                Ok(CallResult::Success(result)) => return result,
                // The directory is restarting.
                _ => {}
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        Err(BillingError::Unavailable("account directory"))
    }

    /// Sends one call to the account's actor; if the actor died before handling it, finds the
    /// successor and sends again. Safe because an unhandled message changed nothing.
    async fn ask<T: Send + 'static>(
        &self,
        account_id: &str,
        build: impl Fn(RpcReplyPort<T>) -> AccountMsg,
    ) -> Result<T, BillingError> {
        for _ in 0..ATTEMPTS {
            let actor = self.account(account_id).await?;
            match attempt(&actor, &build).await {
                Attempt::Done(v) => return Ok(v),
                Attempt::Retry => {
                    self.live
                        .remove_if(account_id, |_, a| a.get_id() == actor.get_id());
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
        Err(BillingError::Unavailable("account actor"))
    }

    pub async fn reserve(
        &self,
        account_id: &str,
        request: ReserveRequest,
    ) -> Result<Reservation, BillingError> {
        let backlog = self.backlog.load(Ordering::Relaxed);
        if backlog >= self.max_buffer {
            return Err(BillingError::LedgerBufferFull(backlog));
        }
        self.ask(account_id, |port| {
            AccountMsg::Reserve(Box::new(request.clone()), port)
        })
        .await?
    }

    /// Returns an unused reservation. Fire-and-forget: a lost release is recovered when the
    /// actor restarts, since reservations that nobody settles are dropped with the book.
    pub fn release(&self, account_id: &str, request_id: &crate::RequestId) {
        if let Some(actor) = self.live.get(account_id) {
            let _ = actor.tell(AccountMsg::Release(request_id.clone()));
        }
    }

    /// Charges `cost` for a finished request and waits until the charge is journaled, as the
    /// call's `usage` record with what was charged in it; returns what the balance paid (all of
    /// `cost`, unless the account ran dry: see [`crate::account::Settled`]).
    pub async fn settle(
        &self,
        account_id: &str,
        key_id: Option<&str>,
        cost: Amount,
        mut usage: UsageRecord,
    ) -> Result<Amount, BillingError> {
        let settled = self
            .ask(account_id, |port| {
                let request = SettleRequest {
                    request_id: usage.request_id.clone(),
                    key_id: key_id.map(str::to_owned),
                    cost,
                };
                AccountMsg::Settle(request, port)
            })
            .await?;
        usage.cost = settled.charged;
        usage.uncollected = settled.uncollected;
        let request_id = usage.request_id.clone();
        self.write_down(Record::Call(usage)).await?;
        if let Some(book) = self.books.get(account_id) {
            book.confirm(&request_id);
        }
        Ok(settled.charged)
    }

    /// Makes a settled charge durable: appended to the journal by this task when the writer
    /// has posted it (then the writer is told to ship it, and nobody waits for the writer);
    /// otherwise journaled by the writer (`fsync` mode), or, if the writer cannot, committed to
    /// the store directly. Every path is idempotent.
    async fn write_down(&self, record: Record) -> Result<(), BillingError> {
        let record = match self.journal.append(record) {
            Appended::Done => return Ok(()),
            Appended::Failed(record, e) => {
                crate::ledger::journal_write_failed(&e);
                self.commit(record).await?;
                return Ok(());
            }
            Appended::NotPosted(record) => record,
        };
        let reply = self
            .ledger
            .get()
            .ask(
                |port| LedgerMsg::Append(record.clone(), port),
                Some(Duration::from_secs(30)),
            )
            .await;
        match reply {
            Ok(CallResult::Success(Ok(_))) => Ok(()),
            Ok(CallResult::Success(Err(CommitError::Rejected(_)))) => {
                Err(BillingError::Unavailable("ledger (record rejected)"))
            }
            // The writer died before journaling the record, or could not sync it.
            _ => self.commit(record).await.map(|_| ()),
        }
    }

    /// Commits a record to the store (not just the journal), retrying across ledger writer
    /// restarts.
    pub async fn commit(&self, record: Record) -> Result<bool, BillingError> {
        let deadline = tokio::time::Instant::now() + COMMIT_PATIENCE;
        while tokio::time::Instant::now() < deadline {
            let reply = self
                .ledger
                .get()
                .ask(|port| LedgerMsg::Commit(record.clone(), port), None)
                .await;
            match reply {
                Ok(CallResult::Success(Ok(inserted))) => return Ok(inserted),
                Ok(CallResult::Success(Err(CommitError::Rejected(_)))) => {
                    return Err(BillingError::Unavailable("ledger (record rejected)"))
                }
                _ => {}
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        Err(BillingError::Unavailable("ledger writer"))
    }

    pub async fn credit(
        &self,
        account_id: &str,
        request: CreditRequest,
    ) -> Result<BalanceView, BillingError> {
        self.ask(account_id, |port| AccountMsg::Credit(request.clone(), port))
            .await?
    }

    pub async fn balance(&self, account_id: &str) -> Result<BalanceView, BillingError> {
        self.ask(account_id, AccountMsg::Balance).await
    }

    /// Waits until every record journaled or sent to the ledger writer so far is in the store.
    /// A writer that dies meanwhile leaves its records in the journal, and its successor ships
    /// them all before it answers, so the barrier is sent again to the successor.
    pub async fn flush(&self) -> Result<(), BillingError> {
        let deadline = tokio::time::Instant::now() + COMMIT_PATIENCE;
        while tokio::time::Instant::now() < deadline {
            if let Ok(CallResult::Success(())) =
                self.ledger.get().ask(LedgerMsg::Barrier, None).await
            {
                return Ok(());
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
        Err(BillingError::Unavailable("ledger writer"))
    }

    /// Kills an account's actor as a crash would (operators, fault injection).
    pub async fn kill_account_actor(&self, account_id: &str) -> bool {
        matches!(
            self.directory
                .get()
                .ask(|port| DirectoryMsg::Kill(account_id.to_owned(), port), None)
                .await,
            Ok(CallResult::Success(true))
        )
    }

    /// Records journaled or queued and not yet in the store.
    pub fn backlog(&self) -> usize {
        self.backlog.load(Ordering::Relaxed)
    }

    pub fn live_accounts(&self) -> usize {
        self.live.len()
    }
}

async fn attempt<T: Send + 'static>(
    actor: &ActorRef<AccountMsg>,
    build: impl FnOnce(RpcReplyPort<T>) -> AccountMsg,
) -> Attempt<T> {
    match actor.ask(build, None).await {
        Ok(CallResult::Success(v)) => Attempt::Done(v),
        _ => Attempt::Retry,
    }
}
