//! Every actor is spawned wrapped in [`Metered`], which gives it the same metrics without a
//! line of metrics code in the actor itself:
//!
//! - `tollgate_actors_live{kind}`: actors of this kind now running;
//! - `tollgate_actor_messages_total{kind}`: messages handled;
//! - `tollgate_actor_handler_seconds{kind}`: time in the handler, per message;
//! - `tollgate_actor_failures_total{kind}`: handlers that returned an error (the actor stops).
//!
//! Supervisors add `tollgate_actor_restarts_total{kind}` when they restart one.

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::time::Instant;

pub struct Metered<A> {
    inner: A,
    kind: &'static str,
}

impl<A> Metered<A> {
    pub fn new(inner: A, kind: &'static str) -> Self {
        Metered { inner, kind }
    }
}

/// The wrapped actor's state; dropping it (however the actor ended) counts it out.
pub struct MeteredState<S> {
    inner: S,
    kind: &'static str,
}

impl<S> Drop for MeteredState<S> {
    fn drop(&mut self) {
        metrics::gauge!("tollgate_actors_live", "kind" => self.kind).decrement(1.0);
    }
}

pub fn record_restart(kind: &'static str) {
    metrics::counter!("tollgate_actor_restarts_total", "kind" => kind).increment(1);
}

impl<A: Actor> Actor for Metered<A> {
    type Msg = A::Msg;
    type State = MeteredState<A::State>;
    type Arguments = A::Arguments;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let inner = self.inner.pre_start(myself, args).await?;
        metrics::gauge!("tollgate_actors_live", "kind" => self.kind).increment(1.0);
        Ok(MeteredState {
            inner,
            kind: self.kind,
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
        let started = Instant::now();
        let result = self.inner.handle(myself, message, &mut state.inner).await;
        metrics::counter!("tollgate_actor_messages_total", "kind" => self.kind).increment(1);
        metrics::histogram!("tollgate_actor_handler_seconds", "kind" => self.kind)
            .record(started.elapsed().as_secs_f64());
        if result.is_err() {
            metrics::counter!("tollgate_actor_failures_total", "kind" => self.kind).increment(1);
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
