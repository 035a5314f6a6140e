//! Tollgate's actors and the store they write to.
//!
//! - [`account`]: one actor per active account; serializes reservations, settlements, credits.
//! - [`directory`]: supervises the account actors; starts, restarts and forgets them.
//! - [`ledger`]: the ledger writer; journals charges, ships them to the store in batches.
//! - [`journal`]: the node-local append-only log a charge is durable in before the store.
//! - [`provider`]: one actor per upstream; its connections and concurrency cap.
//! - [`upstream`]: a provider's HTTP/1.1 connections, each driven by the call using it.
//! - [`supervisor`]: the root of the tree; restarts children with backoff and a limit.
//! - [`billing`]: the handle request handlers use to reserve, settle and credit.
//! - [`keys`]: API keys: generation, hashing, and the in-memory lookup.
//! - [`store`]: SQLite or Postgres, via sqlx.
//! - [`money`]: integer amounts and prices.
//!
//! What these promise about ordering, durability and crashes is in `docs/guarantees.md`.

pub mod account;
pub mod billing;
pub mod directory;
pub mod journal;
pub mod keys;
pub mod ledger;
pub mod metered;
pub mod money;
pub mod provider;
pub mod restart;
pub mod slot;
pub mod store;
pub mod supervisor;
pub mod upstream;

pub use billing::{Billing, BillingError};

/// The hasher of maps keyed by ids the gateway makes itself (account, request and actor ids),
/// never by what a client chooses: fast, and seeded per process.
pub type IdHasher = foldhash::fast::RandomState;

/// A call's id (`req_…`), made once by the handler and shared from there: by the reservation
/// and settlement messages, the account's book and the call's usage record. Cloning it counts
/// a reference; it was copied into a new `String` about ten times a call (BENCHMARKS item 51).
pub type RequestId = std::sync::Arc<str>;
pub use money::{Amount, Price};
pub use store::Store;
pub use supervisor::{ActorSystem, SystemConfig};
