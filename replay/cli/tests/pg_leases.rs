//! The engine's lease scenarios (engine/tests/common/fencing.rs) on PostgreSQL, the two
//! engines on two store handles (two connection pools, as two processes): a driver paused
//! past its lease is fenced by the database and appends nothing; a driver whose renewal
//! fails stops at once. Each test works in a fresh schema it drops; without a server it
//! says it was skipped (and fails under CI=true or KEEL_REQUIRE_POSTGRES=1).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

#[path = "../../../engine/tests/common/mod.rs"]
mod common;
#[path = "../../../engine/tests/common/fencing.rs"]
mod fencing;
#[path = "../../../store/postgres/tests/common/mod.rs"]
mod pg;

use keel_store::{Durability, Store};
use keel_store_postgres::PgStore;
use std::sync::Arc;

/// Two handles on one fresh schema.
fn two_handles(scratch: &pg::Scratch) -> (Arc<PgStore>, Arc<PgStore>) {
    let cfg = scratch.config();
    (Arc::new(PgStore::open(cfg.clone()).unwrap()), Arc::new(PgStore::open(cfg).unwrap()))
}

/// A multi-thread runtime (the server check and the stores are made outside it).
fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn postgres_a_driver_paused_past_its_lease_is_fenced_and_appends_nothing() {
    if !pg::ready() {
        return;
    }
    let scratch = pg::Scratch::new(Durability::default());
    let (a, b) = two_handles(&scratch);
    let f = rt().block_on(fencing::stale_driver_is_fenced(a.clone() as Arc<dyn Store>, b as Arc<dyn Store>, 4));
    let refused = a.stats().fenced_refusals;
    println!("postgres: {f:?}; the database refused {refused} fenced append(s) of engine A");
    assert_eq!(refused, f.fenced, "the engine counts what the database refused");
}

#[test]
fn postgres_a_driver_whose_renewal_fails_stops_at_once_and_drops_its_calls() {
    if !pg::ready() {
        return;
    }
    let scratch = pg::Scratch::new(Durability::default());
    let (a, b) = two_handles(&scratch);
    let f = rt().block_on(fencing::lost_renewal_stops_the_driver(a as Arc<dyn Store>, b as Arc<dyn Store>, 4));
    println!("postgres: {f:?}");
}
