//! Where the current incarnation of a supervised actor can be found.
//!
//! A supervisor replaces the reference when it restarts the actor; everyone else only reads
//! it. The lock is held for a clone, never across an await.

use ractor::ActorRef;
use std::sync::{Arc, RwLock};

pub struct Slot<M: Send + 'static>(Arc<RwLock<ActorRef<M>>>);

impl<M: Send + 'static> Clone for Slot<M> {
    fn clone(&self) -> Self {
        Slot(self.0.clone())
    }
}

impl<M: Send + 'static> Slot<M> {
    pub fn new(actor: ActorRef<M>) -> Self {
        Slot(Arc::new(RwLock::new(actor)))
    }

    pub fn get(&self) -> ActorRef<M> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, actor: ActorRef<M>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = actor;
    }
}
