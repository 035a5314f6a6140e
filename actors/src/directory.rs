//! The account directory: supervisor of the account actors.
//!
//! It starts an account's actor on first use, restarts one that fails (with backoff, up to the
//! restart intensity; beyond it the directory fails and its own supervisor takes over), and
//! forgets one that passivated. It alone decides to start an account actor, and starts at most
//! one at a time for an account, so there is never more than one live actor per account.
//! Requests find live actors in a shared map without a message; only a miss comes here.
//!
//! A start reads the account from the store (a round trip or three), so it runs in a task of
//! its own and reports back with [`DirectoryMsg::Started`]: the directory goes on serving
//! other accounts meanwhile, and requests for the account being started wait for that one
//! start. Started one after another, 100,000 accounts took a minute to load on Postgres.

use crate::account::{
    AccountActor, AccountArgs, AccountMsg, NoSuchAccount, ReservationBook, PASSIVATED,
};
use crate::billing::BillingError;
use crate::ledger::LedgerMsg;
use crate::metered::Mailbox;
use crate::metered::{record_restart, Metered};
use crate::restart::{RestartHistory, RestartPolicy};
use crate::slot::Slot;
use crate::store::Store;
use dashmap::DashMap;
use ractor::{
    Actor, ActorId, ActorProcessingErr, ActorRef, ActorStatus, RpcReplyPort, SpawnErr,
    SupervisionEvent,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub type LiveAccounts = Arc<DashMap<String, ActorRef<AccountMsg>, crate::IdHasher>>;
/// Reservation books outlive both account actors and the directory itself.
pub type Books = Arc<DashMap<String, Arc<ReservationBook>, crate::IdHasher>>;

type GetReply = RpcReplyPort<Result<ActorRef<AccountMsg>, BillingError>>;

pub enum DirectoryMsg {
    Get(String, GetReply),
    Restart(String),
    /// A start this directory began has finished, one way or the other.
    Started(String, Result<ActorRef<AccountMsg>, SpawnErr>),
    /// Operators and fault-injection tests: kill an account's actor as a crash would.
    Kill(String, RpcReplyPort<bool>),
    /// Operators: the account actors, as many as the query asks for, worst off first.
    Children(ChildQuery, RpcReplyPort<ChildList>),
    /// Asks each account actor that has been idle long enough whether to stop. One timer for
    /// all of them rather than one each: at 100,000 accounts that is 100,000 fewer tasks. Only
    /// those idle by their book's stamp get the message: asking all 100,000 held the directory
    /// 0.1–0.25 s and woke every actor (BENCHMARKS item 54).
    IdleSweep,
}

impl crate::metered::Kind for DirectoryMsg {
    const KIND: &'static str = "account_directory";
}

/// Which account actors a listing shows.
#[derive(Clone, Debug)]
pub struct ChildQuery {
    /// At most this many, worst off first: not running, then most restarts, then deepest
    /// mailbox, then by account id.
    pub limit: usize,
    /// Only this account's.
    pub account: Option<String>,
}

/// A listing: the account actors it shows, and how many there are in all.
#[derive(Clone, Debug, Default)]
pub struct ChildList {
    pub total: usize,
    pub listed: Vec<ChildInfo>,
}

#[derive(Clone, Debug)]
pub struct ChildInfo {
    pub account_id: String,
    pub status: String,
    pub restarts: u64,
    pub started_at: std::time::Instant,
    pub mailbox_depth: i64,
    pub messages: u64,
}

#[derive(Clone)]
pub struct DirectoryArgs {
    pub store: Store,
    pub ledger: Slot<LedgerMsg>,
    pub live: LiveAccounts,
    pub books: Books,
    pub idle_after: Duration,
    pub policy: RestartPolicy,
}

pub struct DirectoryState {
    args: DirectoryArgs,
    children: HashMap<String, Child>,
    by_actor: HashMap<ActorId, String>,
}

struct Child {
    actor: Option<ActorRef<AccountMsg>>,
    /// The account's book, shared with its actor: when the actor was last busy.
    book: Arc<ReservationBook>,
    /// Some while a start is in flight: the requests waiting for it.
    starting: Option<Vec<GetReply>>,
    history: RestartHistory,
    started_at: std::time::Instant,
}

pub struct AccountDirectory;

impl Actor for AccountDirectory {
    type Msg = DirectoryMsg;
    type State = DirectoryState;
    type Arguments = DirectoryArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<DirectoryMsg>,
        args: DirectoryArgs,
    ) -> Result<DirectoryState, ActorProcessingErr> {
        // A previous directory's actors are gone with it; requests must come back here.
        args.live.clear();
        if !args.idle_after.is_zero() {
            myself.send_interval(args.idle_after / 2 + Duration::from_millis(1), || {
                DirectoryMsg::IdleSweep
            });
        }
        Ok(DirectoryState {
            args,
            children: HashMap::new(),
            by_actor: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<DirectoryMsg>,
        msg: DirectoryMsg,
        state: &mut DirectoryState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DirectoryMsg::Get(account_id, reply) => state.get(&myself, account_id, reply),
            DirectoryMsg::Restart(account_id) => {
                let needs_start = state
                    .children
                    .get(&account_id)
                    .is_some_and(|c| c.actor.is_none() && c.starting.is_none());
                if needs_start {
                    record_restart("account");
                    state.start(&myself, account_id, Vec::new());
                }
            }
            DirectoryMsg::Started(account_id, result) => state.started(account_id, result),
            DirectoryMsg::IdleSweep => {
                let idle_after = state.args.idle_after;
                for c in state.children.values() {
                    if let Some(actor) = &c.actor {
                        if c.book.idle_for() >= idle_after {
                            let _ = actor.tell(AccountMsg::IdleCheck);
                        }
                    }
                }
            }
            DirectoryMsg::Kill(account_id, reply) => {
                let actor = state
                    .children
                    .get(&account_id)
                    .and_then(|c| c.actor.clone());
                if let Some(a) = &actor {
                    a.kill();
                }
                let _ = reply.send(actor.is_some());
            }
            DirectoryMsg::Children(query, reply) => {
                let _ = reply.send(state.list(&query));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<DirectoryMsg>,
        event: SupervisionEvent,
        state: &mut DirectoryState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match &event {
            SupervisionEvent::ActorTerminated(cell, _, reason) => (cell, reason.clone()),
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(format!("failed: {err}"))),
            _ => return Ok(()),
        };
        let Some(account_id) = state.by_actor.remove(&cell.get_id()) else {
            return Ok(());
        };
        state
            .args
            .live
            .remove_if(&account_id, |_, a| a.get_id() == cell.get_id());
        let passivated = reason.as_deref() == Some(PASSIVATED);
        let Some(child) = state.children.get_mut(&account_id) else {
            return Ok(());
        };
        // A request may already have started a successor, or be starting one (it found this
        // one dead before its termination reached us). Then the successor stands: never clear
        // or double it.
        let successor_running = child.starting.is_some()
            || child
                .actor
                .as_ref()
                .is_some_and(|a| a.get_id() != cell.get_id());
        if child
            .actor
            .as_ref()
            .is_some_and(|a| a.get_id() == cell.get_id())
        {
            child.actor = None;
        }
        if passivated {
            metrics::counter!("tollgate_accounts_passivated_total").increment(1);
            if !successor_running {
                state.children.remove(&account_id);
                state.args.books.remove_if(&account_id, |_, b| b.is_empty());
            }
            return Ok(());
        }
        tracing::warn!(account = %account_id, reason = reason.as_deref().unwrap_or("unknown"), "account actor died");
        match child.history.next_delay(&state.args.policy) {
            Some(_) if successor_running => Ok(()),
            Some(delay) => {
                let id = account_id.clone();
                myself.send_after(delay, move || DirectoryMsg::Restart(id));
                Ok(())
            }
            None => {
                Err(format!("account actor {account_id} exceeded its restart intensity").into())
            }
        }
    }

    async fn post_stop(
        &self,
        myself: ActorRef<DirectoryMsg>,
        state: &mut DirectoryState,
    ) -> Result<(), ActorProcessingErr> {
        state.args.live.clear();
        myself.stop_children(None);
        Ok(())
    }
}

impl DirectoryState {
    /// With 100,000 accounts live, listing them all took 14.7 MB of JSON and left the gateway
    /// 184 MB larger; so a listing picks its few with a heap as long as it, and describes
    /// only those.
    fn list(&self, query: &ChildQuery) -> ChildList {
        use std::cmp::Reverse;
        use std::collections::BinaryHeap;
        let matching: Box<dyn Iterator<Item = (&String, &Child)>> = match &query.account {
            Some(account) => Box::new(self.children.get_key_value(account).into_iter()),
            None => Box::new(self.children.iter()),
        };
        let mut total = 0;
        let mut worst = BinaryHeap::with_capacity(query.limit.saturating_add(1).min(1024));
        for (id, child) in matching {
            total += 1;
            let running = child
                .actor
                .as_ref()
                .is_some_and(|a| a.get_status() == ActorStatus::Running);
            let depth = child
                .actor
                .as_ref()
                .map_or(0, |a| crate::metered::mailbox_depth(a.get_id()));
            worst.push((running, Reverse(child.history.total), Reverse(depth), id));
            if worst.len() > query.limit {
                worst.pop();
            }
        }
        let listed = worst
            .into_sorted_vec()
            .into_iter()
            .map(|(_, _, Reverse(mailbox_depth), id)| {
                let c = &self.children[id];
                ChildInfo {
                    account_id: id.clone(),
                    status: match (&c.actor, &c.starting) {
                        (Some(a), _) => format!("{:?}", a.get_status()),
                        (None, Some(_)) => "Starting".to_owned(),
                        (None, None) => "Restarting".to_owned(),
                    },
                    restarts: c.history.total,
                    started_at: c.started_at,
                    mailbox_depth,
                    messages: c
                        .actor
                        .as_ref()
                        .map_or(0, |a| crate::metered::messages_handled(a.get_id())),
                }
            })
            .collect();
        ChildList { total, listed }
    }

    fn get(&mut self, myself: &ActorRef<DirectoryMsg>, account_id: String, reply: GetReply) {
        let child = self.children.get_mut(&account_id);
        if let Some(actor) = child.as_ref().and_then(|c| c.actor.as_ref()) {
            if matches!(
                actor.get_status(),
                ActorStatus::Running | ActorStatus::Starting
            ) {
                let _ = reply.send(Ok(actor.clone()));
                return;
            }
        }
        if let Some(waiting) = child.and_then(|c| c.starting.as_mut()) {
            waiting.push(reply);
            return;
        }
        self.start(myself, account_id, vec![reply]);
    }

    /// Begins a start of the account's actor in a task of its own; [`DirectoryMsg::Started`]
    /// brings the outcome back. The caller has made sure none is in flight.
    fn start(
        &mut self,
        myself: &ActorRef<DirectoryMsg>,
        account_id: String,
        waiting: Vec<GetReply>,
    ) {
        let book = self
            .args
            .books
            .entry(account_id.clone())
            .or_default()
            .clone();
        let args = AccountArgs {
            account_id: account_id.clone(),
            store: self.args.store.clone(),
            ledger: self.args.ledger.clone(),
            book: book.clone(),
            idle_after: self.args.idle_after,
        };
        let child = self
            .children
            .entry(account_id.clone())
            .or_insert_with(|| Child {
                actor: None,
                book: book.clone(),
                starting: None,
                history: RestartHistory::default(),
                started_at: std::time::Instant::now(),
            });
        child.book = book;
        child.starting = Some(waiting);
        let directory = myself.clone();
        tokio::spawn(async move {
            let result =
                Actor::spawn_linked(None, Metered::new(AccountActor), args, directory.get_cell())
                    .await
                    .map(|(actor, _)| actor);
            if let Err(ractor::MessagingErr::SendErr(DirectoryMsg::Started(_, Ok(actor)))) =
                directory.send_message(DirectoryMsg::Started(account_id, result))
            {
                // The directory stopped while this one started: nobody would ever find it.
                actor.stop(None);
            }
        });
    }

    fn started(&mut self, account_id: String, result: Result<ActorRef<AccountMsg>, SpawnErr>) {
        let Some(child) = self.children.get_mut(&account_id) else {
            // Not possible while a start is in flight (the child stays); never leave one running.
            if let Ok(actor) = result {
                actor.stop(None);
            }
            return;
        };
        let waiting = child.starting.take().unwrap_or_default();
        let answer = match result {
            // If it has died already and its notice came first, the notice found no entry;
            // the next request finds it dead and starts another.
            Ok(actor) => {
                metrics::counter!("tollgate_accounts_loaded_total").increment(1);
                self.by_actor.insert(actor.get_id(), account_id.clone());
                child.actor = Some(actor.clone());
                child.started_at = std::time::Instant::now();
                self.args.live.insert(account_id, actor.clone());
                Ok(actor)
            }
            Err(SpawnErr::StartupFailed(e)) if e.downcast_ref::<NoSuchAccount>().is_some() => {
                self.children.remove(&account_id);
                self.args.books.remove_if(&account_id, |_, b| b.is_empty());
                Err(BillingError::NoSuchAccount(account_id))
            }
            Err(e) => {
                tracing::error!(account = %account_id, error = %e, "account actor failed to start");
                // One that never ran is not a child to list; one that did waits for the next
                // request, as after a failed restart.
                if child.history.total == 0 {
                    self.children.remove(&account_id);
                }
                Err(BillingError::Unavailable("account actor"))
            }
        };
        for reply in waiting {
            let _ = reply.send(answer.clone());
        }
    }
}
