//! The account actor: one per active account, the only writer of its balance in memory.
//!
//! Every reservation, settlement and credit for the account is a message to this actor, so
//! they are applied one at a time and no interleaving of concurrent requests can spend money
//! the account does not have. What each message promises is written in `docs/guarantees.md`.
//!
//! Reservations live in a [`ReservationBook`] that the account directory keeps for the actor:
//! if the actor fails and is restarted, the new one reloads its balance from the store and
//! keeps honouring the reservations that in-flight requests still hold.

use crate::billing::BillingError;
use crate::ledger::LedgerMsg;
use crate::metered::Mailbox;
use crate::money::{Amount, Price};
use crate::slot::Slot;
use crate::store::{now_ms, EntryKind, LedgerEntry, Record, Store};
use crate::RequestId;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What a request asks to hold before it goes upstream.
#[derive(Clone, Debug)]
pub struct ReserveRequest {
    pub request_id: RequestId,
    pub key: Option<KeyLimit>,
    pub price: Price,
    /// An upper bound of the prompt's tokens.
    pub input_tokens: u64,
    /// The most output tokens the request may produce (its max_tokens, or the model's limit).
    pub max_output_tokens: u64,
}

#[derive(Clone, Debug)]
pub struct KeyLimit {
    pub key_id: String,
    pub spend_cap: Option<Amount>,
}

/// Money held for one request until it settles or is released.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub request_id: RequestId,
    pub amount: Amount,
    /// The max output tokens to send upstream: the request's own, or lower if that is all the
    /// balance (or the key's cap) can pay for.
    pub max_output_tokens: u64,
    pub lowered: bool,
}

/// The actual cost of a finished request. The call's metadata stays with the caller, which
/// writes it down with what the settlement charged.
#[derive(Clone, Debug)]
pub struct SettleRequest {
    pub request_id: RequestId,
    pub key_id: Option<String>,
    pub cost: Amount,
}

/// How a settlement came out.
#[derive(Clone, Copy, Debug)]
pub struct Settled {
    pub charged: Amount,
    /// Cost the balance could not cover (the upstream used more than was reserved and the
    /// account had nothing left). Recorded, never taken below zero.
    pub uncollected: Amount,
}

#[derive(Clone, Debug)]
pub struct CreditRequest {
    /// Idempotency: a second credit with the same id changes nothing.
    pub entry_id: String,
    pub kind: EntryKind,
    /// Signed: a negative adjustment is a debit.
    pub amount: Amount,
    pub reason: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalanceView {
    pub balance: Amount,
    pub reserved: Amount,
}

pub enum AccountMsg {
    // Requests are boxed: an actor's task is sized for its largest message, and there is a
    // task per live account.
    Reserve(
        Box<ReserveRequest>,
        RpcReplyPort<Result<Reservation, BillingError>>,
    ),
    // Not boxed: no larger than `Credit`.
    Settle(SettleRequest, RpcReplyPort<Settled>),
    Release(RequestId),
    Credit(
        CreditRequest,
        RpcReplyPort<Result<BalanceView, BillingError>>,
    ),
    Balance(RpcReplyPort<BalanceView>),
    IdleCheck,
}

// `Settle` carries its request unboxed; it must stay no larger than `Credit`'s.
const _: () = assert!(std::mem::size_of::<SettleRequest>() <= std::mem::size_of::<CreditRequest>());

impl crate::metered::Kind for AccountMsg {
    const KIND: &'static str = "account";
}

/// Reservations of one account, and its charges not yet confirmed durable. Kept across
/// restarts of the account's actor (see `docs/guarantees.md` 2.3 and 5.2).
#[derive(Debug, Default)]
pub struct ReservationBook {
    inner: Mutex<BookInner>,
    /// When the account's actor last handled a message other than an idle check, in ms
    /// since [`CLOCK_START`]: the directory reads it to ask only idle actors whether to stop.
    active_at: AtomicU64,
}

/// What [`ReservationBook::active_at`] counts from.
static CLOCK_START: LazyLock<Instant> = LazyLock::new(Instant::now);

fn clock_ms(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*CLOCK_START).as_millis()).unwrap_or(u64::MAX)
}

#[derive(Debug, Default)]
struct BookInner {
    holds: RequestMap<Hold>,
    total: i64,
    per_key: IdMap<i64>,
    /// Charges applied in memory whose commit nobody has confirmed yet: request id -> charge.
    settling: RequestMap<Charge>,
}

#[derive(Clone, Debug)]
struct Hold {
    amount: i64,
    key_id: Option<String>,
}

#[derive(Clone, Debug)]
struct Charge {
    amount: i64,
    key_id: Option<String>,
}

impl ReservationBook {
    fn lock(&self) -> MutexGuard<'_, BookInner> {
        // Never held across an await; a poisoned lock means a panic mid-update, and the
        // account's successor still needs what is in the book.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn total(&self) -> Amount {
        Amount(self.lock().total)
    }

    /// Outstanding reservations.
    pub fn len(&self) -> usize {
        self.lock().holds.len()
    }

    /// The account's actor is busy now.
    fn touch(&self, now: Instant) {
        self.active_at.store(clock_ms(now), Ordering::Relaxed);
    }

    /// How long since the account's actor last handled a call or a credit.
    pub fn idle_for(&self) -> Duration {
        let at = self.active_at.load(Ordering::Relaxed);
        Duration::from_millis(clock_ms(Instant::now()).saturating_sub(at))
    }

    /// No reservations and no unconfirmed charges: nothing a successor would need.
    pub fn is_empty(&self) -> bool {
        let inner = self.lock();
        inner.holds.is_empty() && inner.settling.is_empty()
    }

    /// The charge for `request_id` is durable; forget it. Called by whoever saw the commit.
    pub fn confirm(&self, request_id: &str) {
        let mut inner = self.lock();
        inner.settling.remove(request_id);
        release_if_empty(&mut inner.settling);
    }
}

/// An idle account's book holds no table memory: a map that empties gives its table back
/// (the next request allocates a small one again). A few hundred bytes an account, which
/// counts at 100,000 live accounts (BENCHMARKS.md, "Active accounts").
fn release_if_empty<K, V>(map: &mut HashMap<K, V, crate::IdHasher>) {
    if map.is_empty() && map.capacity() > 0 {
        *map = HashMap::default();
    }
}

/// A map keyed by key or account ids.
type IdMap<V> = HashMap<String, V, crate::IdHasher>;

/// A map keyed by request ids: the key is the call's own id, shared, not a copy.
type RequestMap<V> = HashMap<RequestId, V, crate::IdHasher>;

impl BookInner {
    fn key_reserved(&self, key_id: &str) -> i64 {
        self.per_key.get(key_id).copied().unwrap_or(0)
    }

    fn hold(&mut self, request_id: RequestId, hold: Hold) {
        self.total += hold.amount;
        if let Some(k) = &hold.key_id {
            *self.per_key.entry(k.clone()).or_default() += hold.amount;
        }
        if let Some(old) = self.holds.insert(request_id, hold) {
            self.drop_hold(&old);
        }
    }

    fn take(&mut self, request_id: &str) -> Option<Hold> {
        let hold = self.holds.remove(request_id)?;
        self.drop_hold(&hold);
        release_if_empty(&mut self.holds);
        Some(hold)
    }

    fn drop_hold(&mut self, hold: &Hold) {
        self.total -= hold.amount;
        if let Some(k) = &hold.key_id {
            if let Some(v) = self.per_key.get_mut(k) {
                *v -= hold.amount;
                if *v == 0 {
                    self.per_key.remove(k);
                    release_if_empty(&mut self.per_key);
                }
            }
        }
    }
}

pub struct AccountArgs {
    pub account_id: String,
    pub store: Store,
    pub ledger: Slot<LedgerMsg>,
    pub book: Arc<ReservationBook>,
    pub idle_after: Duration,
}

pub struct AccountState {
    account_id: String,
    balance: i64,
    key_spent: IdMap<i64>,
    book: Arc<ReservationBook>,
    ledger: Slot<LedgerMsg>,
    idle_after: Duration,
}

/// Why an account actor could not start.
#[derive(Debug, thiserror::Error)]
#[error("no account `{0}`")]
pub struct NoSuchAccount(pub String);

pub struct AccountActor;

impl Actor for AccountActor {
    type Msg = AccountMsg;
    type State = AccountState;
    type Arguments = AccountArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<AccountMsg>,
        args: AccountArgs,
    ) -> Result<AccountState, ActorProcessingErr> {
        // Charges the previous incarnation applied that its handlers had not yet confirmed
        // journaled. Read before the ledger is asked: a charge confirmed after this read was
        // journaled before, so the ledger has it in the account's records below; one
        // confirmed later is in this list. Either way it is counted.
        let unconfirmed: Vec<(RequestId, Charge)> = args
            .book
            .lock()
            .settling
            .iter()
            .map(|(id, c)| (id.clone(), c.clone()))
            .collect();
        // Everything of this account's sent to the ledger before now (by its previous
        // incarnation, or a journal replayed at start) must be in the store before the balance
        // is read, or the read would miss it; other accounts' records do not hold this up.
        // Calls from a replayed journal need not wait for the replay: the ledger hands them
        // over, and they are counted below like the unconfirmed ones.
        let replayed = match args
            .ledger
            .get()
            .ask(
                |port| LedgerMsg::BarrierFor(args.account_id.clone(), port),
                Some(Duration::from_secs(30)),
            )
            .await?
        {
            CallResult::Success(calls) => calls,
            _ => return Err("the ledger writer is restarting".into()),
        };
        let owed: Vec<(RequestId, Charge)> = unconfirmed
            .into_iter()
            .chain(replayed.into_iter().map(|c| {
                let charge = Charge {
                    amount: c.charged.nanos(),
                    key_id: c.key_id,
                };
                (c.request_id, charge)
            }))
            .collect();
        // Which of them the store has, and the balance, from one state of the store: a
        // shipment landing meanwhile is counted once, by the store or here.
        let ids: Vec<RequestId> = owed.iter().map(|(id, _)| id.clone()).collect();
        let (snapshot, durable) = args
            .store
            .account_snapshot(&args.account_id, &ids)
            .await?
            .ok_or_else(|| NoSuchAccount(args.account_id.clone()))?;
        let mut balance = snapshot.balance.nanos();
        let mut key_spent: IdMap<i64> = snapshot
            .key_spent
            .into_iter()
            .map(|(k, v)| (k, v.nanos()))
            .collect();
        // The rest are on their way to the store: count them now, as the store will.
        let mut book = args.book.lock();
        for (id, charge) in owed {
            if durable.contains(&*id) {
                book.settling.remove(&id);
            } else {
                balance -= charge.amount;
                if let Some(k) = &charge.key_id {
                    *key_spent.entry(k.clone()).or_default() += charge.amount;
                }
            }
        }
        drop(book);
        args.book.touch(Instant::now());
        Ok(AccountState {
            account_id: args.account_id,
            balance,
            key_spent,
            book: args.book,
            ledger: args.ledger,
            idle_after: args.idle_after,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<AccountMsg>,
        msg: AccountMsg,
        state: &mut AccountState,
    ) -> Result<(), ActorProcessingErr> {
        if !matches!(msg, AccountMsg::IdleCheck) {
            state.book.touch(Instant::now());
        }
        match msg {
            AccountMsg::Reserve(req, reply) => {
                let _ = reply.send(state.reserve(*req));
            }
            AccountMsg::Settle(req, reply) => {
                let settled = state.settle(req);
                let _ = reply.send(settled);
            }
            AccountMsg::Release(request_id) => {
                state.book.lock().take(&request_id);
            }
            AccountMsg::Credit(req, reply) => {
                // Boxed: this message's future (it waits for a commit) is by far the largest,
                // and every account actor's task is sized for its largest message. Credits
                // are rare; the box halves the handler future every live account carries.
                let result = Box::pin(state.credit(req)).await;
                let _ = reply.send(result);
            }
            AccountMsg::Balance(reply) => {
                let _ = reply.send(state.view());
            }
            AccountMsg::IdleCheck => {
                if state.book.is_empty() && state.book.idle_for() >= state.idle_after {
                    tracing::debug!(account = %state.account_id, "account actor passivated");
                    myself.stop(Some(PASSIVATED.to_owned()));
                }
            }
        }
        Ok(())
    }
}

/// The stop reason of an account actor that went idle; anything else is a failure.
pub const PASSIVATED: &str = "passivated";

impl AccountState {
    fn view(&self) -> BalanceView {
        BalanceView {
            balance: Amount(self.balance),
            reserved: self.book.total(),
        }
    }

    fn reserve(&mut self, req: ReserveRequest) -> Result<Reservation, BillingError> {
        let mut book = self.book.lock();
        let mut budget = self.balance - book.total;
        if let Some(KeyLimit {
            key_id,
            spend_cap: Some(cap),
        }) = &req.key
        {
            let spent = self.key_spent.get(key_id).copied().unwrap_or(0);
            let key_left = cap.nanos() - spent - book.key_reserved(key_id);
            if key_left < budget {
                budget = key_left;
            }
        }
        let full = req.price.cost(req.input_tokens, req.max_output_tokens);
        let (amount, max_output_tokens) = if full.nanos() <= budget {
            (full, req.max_output_tokens)
        } else {
            match req
                .price
                .affordable_output(Amount(budget), req.input_tokens)
            {
                Some(out) if out >= 1 => {
                    let out = out.min(req.max_output_tokens);
                    (req.price.cost(req.input_tokens, out), out)
                }
                _ => {
                    return Err(BillingError::InsufficientBalance {
                        available: Amount(budget.max(0)),
                        needed: req.price.cost(req.input_tokens, 1),
                    })
                }
            }
        };
        book.hold(
            req.request_id.clone(),
            Hold {
                amount: amount.nanos(),
                key_id: req.key.map(|k| k.key_id),
            },
        );
        Ok(Reservation {
            request_id: req.request_id,
            amount,
            lowered: max_output_tokens < req.max_output_tokens,
            max_output_tokens,
        })
    }

    /// Applies the charge in memory and says what it came to; the caller journals the call's
    /// record with it. The charge stays unconfirmed in the book until the caller has. Never
    /// awaits: a kill between messages cannot split it.
    fn settle(&mut self, req: SettleRequest) -> Settled {
        let mut book = self.book.lock();
        let held = book.take(&req.request_id).map(|h| h.amount).unwrap_or(0);
        // Money this request may use: its own hold (already back in the free balance) plus
        // whatever no other request holds. Holds never exceed the balance, so this is >= held.
        let payable = (self.balance - book.total).max(0);
        let charged = req.cost.nanos().clamp(0, payable);
        if charged > 0 {
            book.settling.insert(
                req.request_id.clone(),
                Charge {
                    amount: charged,
                    key_id: req.key_id.clone(),
                },
            );
        }
        drop(book);
        if held == 0 {
            tracing::warn!(request_id = %req.request_id, "settlement without a reservation");
        }
        let uncollected = req.cost.nanos() - charged;
        self.balance -= charged;
        if let Some(k) = &req.key_id {
            match self.key_spent.get_mut(k.as_str()) {
                Some(spent) => *spent += charged,
                None => {
                    self.key_spent.insert(k.clone(), charged);
                }
            }
        }
        Settled {
            charged: Amount(charged),
            uncollected: Amount(uncollected),
        }
    }

    /// Credits are rare: the actor waits for the commit so the balance in memory moves only by
    /// what the store accepted (a repeated entry id moves nothing).
    async fn credit(&mut self, req: CreditRequest) -> Result<BalanceView, BillingError> {
        if self.balance.checked_add(req.amount.nanos()).is_none() {
            return Err(BillingError::Unavailable("balance limit"));
        }
        if req.amount.is_negative() {
            let free = self.balance - self.book.total().nanos();
            if free.saturating_add(req.amount.nanos()) < 0 {
                return Err(BillingError::InsufficientBalance {
                    available: Amount(free.max(0)),
                    needed: Amount(req.amount.nanos().saturating_neg()),
                });
            }
        }
        let record = Record::Entry(LedgerEntry {
            entry_id: req.entry_id,
            account_id: self.account_id.clone(),
            kind: req.kind,
            amount: req.amount,
            key_id: None,
            reason: req.reason,
            created_at: now_ms(),
        });
        let inserted = self
            .ledger
            .get()
            .ask(
                |port| LedgerMsg::Commit(record, port),
                Some(Duration::from_secs(60)),
            )
            .await
            .map_err(|_| BillingError::Unavailable("ledger writer"))?;
        match inserted {
            ractor::rpc::CallResult::Success(Ok(true)) => {
                // The store accepted it, so it fits there; saturate rather than wrap regardless.
                self.balance = self.balance.saturating_add(req.amount.nanos());
                Ok(self.view())
            }
            ractor::rpc::CallResult::Success(Ok(false)) => Ok(self.view()),
            _ => Err(BillingError::Unavailable("ledger writer")),
        }
    }
}
