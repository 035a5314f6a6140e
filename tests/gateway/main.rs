//! Black-box tests of the gateway over real HTTP against real databases.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod common;

mod abuse;
mod admin;
mod admin_cli;
mod anthropic_upstream;
mod billing;
mod concurrency;
mod connections;
mod crash;
mod errors;
mod failover;
mod forwarding;
mod lifecycle;
mod messages;
mod metrics;
mod outage;
mod privacy;
mod proxy;
mod sdk;
mod streaming;
mod supervision;
mod tls;
mod upstream_pool;
