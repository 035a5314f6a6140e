//! The ledger writer: the one actor that writes money to the store.
//!
//! Records arrive one message each and are committed in groups, one transaction per batch
//! (see `docs/guarantees.md`, "Durability"). A batch closes when `max_batch` records are
//! waiting or when the flush tick fires, whichever comes first. With `flush_interval` zero the
//! tick is a message to itself, queued behind everything already in the mailbox: under load
//! batches grow by themselves, and at concurrency one nobody waits for a timer.
//!
//! Each sender's reply port is answered only after its record's transaction has committed.

use crate::metered::Mailbox;
use crate::store::{Record, Store, StoreError};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::time::Duration;

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
pub type CommitReply = RpcReplyPort<Result<bool, CommitError>>;

// Nearly every message is a Commit: boxing its record would add an allocation per record.
#[allow(clippy::large_enum_variant)]
pub enum LedgerMsg {
    Commit(Record, CommitReply),
    /// Answered once every record sent before it is durable.
    Barrier(RpcReplyPort<()>),
    Flush,
}

impl crate::metered::Kind for LedgerMsg {
    const KIND: &'static str = "ledger";
}

pub struct LedgerArgs {
    pub store: Store,
    pub max_batch: usize,
    pub flush_interval: Duration,
}

pub struct LedgerState {
    store: Store,
    max_batch: usize,
    flush_interval: Duration,
    pending: Vec<(Record, CommitReply)>,
    /// When the oldest pending record arrived.
    oldest: Option<std::time::Instant>,
    barriers: Vec<RpcReplyPort<()>>,
    flush_scheduled: bool,
}

pub struct LedgerWriter;

impl Actor for LedgerWriter {
    type Msg = LedgerMsg;
    type State = LedgerState;
    type Arguments = LedgerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<LedgerMsg>,
        args: LedgerArgs,
    ) -> Result<LedgerState, ActorProcessingErr> {
        Ok(LedgerState {
            store: args.store,
            max_batch: args.max_batch.max(1),
            flush_interval: args.flush_interval,
            pending: Vec::new(),
            oldest: None,
            barriers: Vec::new(),
            flush_scheduled: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<LedgerMsg>,
        msg: LedgerMsg,
        state: &mut LedgerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            LedgerMsg::Commit(record, reply) => {
                state.oldest.get_or_insert_with(std::time::Instant::now);
                state.pending.push((record, reply));
                metrics::gauge!("tollgate_ledger_queue_depth").set(state.pending.len() as f64);
                if state.pending.len() >= state.max_batch {
                    state.flush().await;
                } else {
                    state.schedule_flush(&myself);
                }
            }
            LedgerMsg::Barrier(reply) => {
                if state.pending.is_empty() {
                    let _ = reply.send(());
                } else {
                    state.barriers.push(reply);
                    state.schedule_flush(&myself);
                }
            }
            LedgerMsg::Flush => {
                state.flush_scheduled = false;
                state.flush().await;
            }
        }
        Ok(())
    }

    /// A draining stop (`drain`) reaches here after the mailbox is empty: commit what is left.
    async fn post_stop(
        &self,
        _myself: ActorRef<LedgerMsg>,
        state: &mut LedgerState,
    ) -> Result<(), ActorProcessingErr> {
        state.flush().await;
        Ok(())
    }
}

impl LedgerState {
    fn schedule_flush(&mut self, myself: &ActorRef<LedgerMsg>) {
        if self.flush_scheduled {
            return;
        }
        self.flush_scheduled = true;
        if self.flush_interval.is_zero() {
            let _ = myself.tell(LedgerMsg::Flush);
        } else {
            myself.send_after(self.flush_interval, || LedgerMsg::Flush);
        }
    }

    /// Commits everything pending, retrying until the store takes it. While it retries, new
    /// records wait in the mailbox: nothing is acknowledged that is not durable.
    async fn flush(&mut self) {
        if self.pending.is_empty() {
            for b in self.barriers.drain(..) {
                let _ = b.send(());
            }
            return;
        }
        let batch = std::mem::take(&mut self.pending);
        if let Some(oldest) = self.oldest.take() {
            metrics::histogram!("tollgate_ledger_record_wait_seconds")
                .record(oldest.elapsed().as_secs_f64());
        }
        metrics::histogram!("tollgate_ledger_batch_size").record(batch.len() as f64);
        let records: Vec<Record> = batch.iter().map(|(r, _)| r.clone()).collect();
        let mut backoff = Duration::from_millis(10);
        let started = std::time::Instant::now();
        let outcome: Vec<Result<bool, CommitError>> = loop {
            match self.store.commit_batch(&records).await {
                Ok(flags) => break flags.into_iter().map(Ok).collect(),
                // The server refused a statement: find the record(s) at fault, one by one, so
                // that one bad record cannot hold every other charge back.
                Err(e) if e.is_rejection() => break self.commit_one_by_one(&records).await,
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
        metrics::histogram!("tollgate_ledger_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::gauge!("tollgate_ledger_oldest_unflushed_seconds").set(0.0);
        metrics::gauge!("tollgate_ledger_queue_depth").set(0.0);
        tracing::trace!(
            batch = records.len(),
            micros = started.elapsed().as_micros() as u64,
            "ledger batch committed"
        );
        for ((_, reply), result) in batch.into_iter().zip(outcome) {
            let _ = reply.send(result);
        }
        for b in self.barriers.drain(..) {
            let _ = b.send(());
        }
    }
}

impl LedgerState {
    async fn commit_one_by_one(&self, records: &[Record]) -> Vec<Result<bool, CommitError>> {
        let mut out = Vec::with_capacity(records.len());
        for record in records {
            let mut backoff = Duration::from_millis(10);
            let result = loop {
                match self.store.commit_batch(std::slice::from_ref(record)).await {
                    Ok(flags) => break Ok(flags.first().copied().unwrap_or(false)),
                    Err(e) if e.is_rejection() => {
                        metrics::counter!("tollgate_ledger_rejected_records_total").increment(1);
                        tracing::error!(error = %e, "the store rejected a ledger record; its sender is told");
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
}

fn log_commit_failure(e: &StoreError, batch: usize, retry_in: Duration) {
    tracing::error!(error = %e, batch, retry_in_ms = retry_in.as_millis() as u64, "ledger commit failed; retrying");
}

#[cfg(test)]
mod tests;
