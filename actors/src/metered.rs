//! Every actor is spawned wrapped in [`Metered`], which gives it the same metrics without a
//! line of metrics code in the actor itself:
//!
//! - `tollgate_actors_live{kind}`: actors of this kind now running;
//! - `tollgate_actor_messages_total{kind}`: messages handled;
//! - `tollgate_actor_handler_seconds{kind}`: time in the handler, per message;
//! - `tollgate_actor_failures_total{kind}`: handlers that returned an error (the actor stops);
//! - `tollgate_actor_mailbox_depth{kind}`: messages sent and not yet handled, over all actors
//!   of the kind (per actor in `/admin/actors`).
//!
//! `/admin/actors` also shows each actor's own count of messages handled.
//!
//! Supervisors add `tollgate_actor_restarts_total{kind}` when they restart one.
//!
//! Mailbox depth counts what is sent with [`Mailbox::tell`] and [`Mailbox::ask`], which is
//! every message but the timers' (`send_after`, `send_interval`); a timer's message is not
//! counted in and does not count out.

use dashmap::DashMap;
use ractor::rpc::CallResult;
use ractor::{
    Actor, ActorId, ActorProcessingErr, ActorRef, MessagingErr, RpcReplyPort, SupervisionEvent,
};
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

/// The kind of actor a message type belongs to: the `kind` label of its metrics.
pub trait Kind {
    const KIND: &'static str;
}

static DEPTHS: LazyLock<DashMap<ActorId, Arc<Depth>, crate::IdHasher>> =
    LazyLock::new(DashMap::default);

/// One actor's mailbox depth, and its kind's gauge (resolved once, not per message); and how
/// many messages it has handled.
struct Depth {
    count: AtomicI64,
    gauge: metrics::Gauge,
    handled: AtomicU64,
}

/// Messages an actor has handled (0 for an actor that is gone).
pub fn messages_handled(actor: ActorId) -> u64 {
    DEPTHS
        .get(&actor)
        .map_or(0, |d| d.handled.load(Ordering::Relaxed))
}

/// Messages waiting in an actor's mailbox (0 for an actor that is gone).
pub fn mailbox_depth(actor: ActorId) -> i64 {
    DEPTHS
        .get(&actor)
        .map_or(0, |d| d.count.load(Ordering::Relaxed).max(0))
}

fn enqueued(actor: ActorId) {
    if let Some(d) = DEPTHS.get(&actor) {
        d.count.fetch_add(1, Ordering::Relaxed);
        d.gauge.increment(1.0);
    }
}

fn not_enqueued(actor: ActorId) {
    if let Some(d) = DEPTHS.get(&actor) {
        d.count.fetch_sub(1, Ordering::Relaxed);
        d.gauge.decrement(1.0);
    }
}

/// Sending to a metered actor, counted in its mailbox depth.
pub trait Mailbox<M> {
    fn tell(&self, msg: M) -> Result<(), MessagingErr<M>>;
    fn ask<R, F>(
        &self,
        build: F,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<CallResult<R>, MessagingErr<M>>> + Send
    where
        R: Send + 'static,
        F: FnOnce(RpcReplyPort<R>) -> M;
}

impl<M: ractor::Message + Kind> Mailbox<M> for ActorRef<M> {
    fn tell(&self, msg: M) -> Result<(), MessagingErr<M>> {
        let id = self.get_id();
        enqueued(id);
        let sent = self.send_message(msg);
        if sent.is_err() {
            not_enqueued(id);
        }
        sent
    }

    fn ask<R, F>(
        &self,
        build: F,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<CallResult<R>, MessagingErr<M>>> + Send
    where
        R: Send + 'static,
        F: FnOnce(RpcReplyPort<R>) -> M,
    {
        // The message is built and sent now; only the wait for the reply is deferred.
        let (tx, rx) = ractor::concurrency::oneshot();
        let sent = self.tell(build(tx.into()));
        async move {
            sent?;
            let reply = match timeout {
                Some(t) => match tokio::time::timeout(t, rx).await {
                    Ok(r) => r,
                    Err(_) => return Ok(CallResult::Timeout),
                },
                None => rx.await,
            };
            Ok(match reply {
                Ok(v) => CallResult::Success(v),
                Err(_) => CallResult::SenderError,
            })
        }
    }
}

pub struct Metered<A> {
    inner: A,
}

impl<A> Metered<A> {
    pub fn new(inner: A) -> Self {
        Metered { inner }
    }
}

/// The wrapped actor's state; dropping it (however the actor ended) counts it out, along with
/// whatever was left in its mailbox.
pub struct MeteredState<S> {
    inner: S,
    kind: &'static str,
    id: ActorId,
    depth: Arc<Depth>,
    /// The kind's handles, resolved when the actor starts rather than looked up by name on
    /// every message.
    messages: metrics::Counter,
    handler_seconds: metrics::Histogram,
}

impl<S> Drop for MeteredState<S> {
    fn drop(&mut self) {
        metrics::gauge!("tollgate_actors_live", "kind" => self.kind).decrement(1.0);
        DEPTHS.remove(&self.id);
        let left = self.depth.count.swap(0, Ordering::Relaxed).max(0);
        self.depth.gauge.decrement(left as f64);
    }
}

pub fn record_restart(kind: &'static str) {
    metrics::counter!("tollgate_actor_restarts_total", "kind" => kind).increment(1);
}

impl<A: Actor> Actor for Metered<A>
where
    A::Msg: Kind,
{
    type Msg = A::Msg;
    type State = MeteredState<A::State>;
    type Arguments = A::Arguments;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let id = myself.get_id();
        let kind = A::Msg::KIND;
        let depth = Arc::new(Depth {
            count: AtomicI64::new(0),
            gauge: metrics::gauge!("tollgate_actor_mailbox_depth", "kind" => kind),
            handled: AtomicU64::new(0),
        });
        DEPTHS.insert(id, depth.clone());
        let inner = match self.inner.pre_start(myself, args).await {
            Ok(s) => s,
            Err(e) => {
                DEPTHS.remove(&id);
                return Err(e);
            }
        };
        metrics::gauge!("tollgate_actors_live", "kind" => A::Msg::KIND).increment(1.0);
        Ok(MeteredState {
            inner,
            kind,
            id,
            depth,
            messages: metrics::counter!("tollgate_actor_messages_total", "kind" => kind),
            handler_seconds: metrics::histogram!("tollgate_actor_handler_seconds", "kind" => kind),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        self.inner.post_start(myself, &mut state.inner).await
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        self.inner.post_stop(myself, &mut state.inner).await
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Out of the mailbox; a timer's message was never counted in, so never below zero.
        if state
            .depth
            .count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                (d > 0).then(|| d - 1)
            })
            .is_ok()
        {
            state.depth.gauge.decrement(1.0);
        }
        let started = Instant::now();
        let result = self.inner.handle(myself, message, &mut state.inner).await;
        state.messages.increment(1);
        state.depth.handled.fetch_add(1, Ordering::Relaxed);
        state
            .handler_seconds
            .record(started.elapsed().as_secs_f64());
        if result.is_err() {
            metrics::counter!("tollgate_actor_failures_total", "kind" => state.kind).increment(1);
        }
        result
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        message: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        self.inner
            .handle_supervisor_evt(myself, message, &mut state.inner)
            .await
    }
}
