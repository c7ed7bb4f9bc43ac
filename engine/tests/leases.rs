//! One driver per run across engines sharing a store (docs/ENGINE.md "Leases"): a driver
//! paused past its lease is fenced and stops; every run completes exactly once. The same
//! scenarios run on PostgreSQL in keel-cli's tests/pg_leases.rs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;
#[path = "common/fencing.rs"]
mod fencing;

use keel_engine::*;
use keel_store::{MemStore, Store};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_paused_past_its_lease_is_fenced_and_appends_nothing() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let f = fencing::stale_driver_is_fenced(store.clone(), store, 4).await;
    println!("memory: {f:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_whose_renewal_fails_stops_at_once_and_drops_its_calls() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let f = fencing::lost_renewal_stops_the_driver(store.clone(), store, 4).await;
    println!("memory: {f:?}");
}

#[test]
fn the_lease_ttl_is_bounded() {
    for ttl in [0, LEASE_TTL_MS_MIN - 1, LEASE_TTL_MS_MAX + 1] {
        let r = Engine::builder().store(Arc::new(MemStore::new())).lease_ttl_ms(ttl).open();
        assert!(matches!(r, Err(EngineError::Config(_))), "ttl {ttl}");
    }
    assert!(Engine::builder().store(Arc::new(MemStore::new())).lease_ttl_ms(LEASE_TTL_MS_MIN).open().is_ok());
}
