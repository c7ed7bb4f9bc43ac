//! The conformance suite on every backend this workspace has: one line each.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use keel_store::{Durability, MemStore, SledStore, Store, StoreConfig};
use std::sync::Arc;

mod memory {
    keel_store_conformance::conformance_tests!(|| -> std::sync::Arc<dyn keel_store::Store> {
        std::sync::Arc::new(keel_store::MemStore::new())
    });
}

mod sled {
    /// A fresh sled store in its own temporary directory.
    fn fresh() -> std::sync::Arc<dyn keel_store::Store> {
        super::sled_store()
    }
    keel_store_conformance::conformance_tests!(fresh);
}

mod observed {
    /// Counts appends: a wrapper must keep every part of the contract it forwards.
    struct Count(std::sync::atomic::AtomicU64);
    impl keel_store::AppendObserver for Count {
        type Ticket = ();
        fn before(&self, _: keel_store::RunId, _: keel_store::Seq, _: &[keel_store::NewRecord]) {}
        fn after(&self, _: keel_store::RunId, (): (), r: Result<&keel_store::Head, &keel_store::StoreError>) {
            if r.is_ok() {
                self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
    fn fresh() -> std::sync::Arc<dyn keel_store::Store> {
        let inner: std::sync::Arc<dyn keel_store::Store> = std::sync::Arc::new(keel_store::MemStore::new());
        std::sync::Arc::new(keel_store::Observed::new(inner, Count(std::sync::atomic::AtomicU64::new(0))))
    }
    keel_store_conformance::conformance_tests!(fresh);
}

fn sled_store() -> Arc<dyn Store> {
    // Under cargo's per-target temporary directory, not the system's: the directory
    // outlives the test (see below) and is cleaned with the target.
    let dir = tempfile::Builder::new().prefix("keel-conformance-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cfg = StoreConfig { durability: Durability::None, ..StoreConfig::default() };
    let store = SledStore::open(dir.path(), cfg).unwrap();
    // Left in place: tempdir's Drop would remove it under the open store, which the
    // suite's checks still use.
    std::mem::forget(dir);
    Arc::new(store)
}

#[test]
fn run_all_runs_every_check_and_the_macro_lists_them_all() {
    keel_store_conformance::run_all(&|| -> Arc<dyn Store> { Arc::new(MemStore::new()) });
    // 23 checks: keep CHECKS and the macro's list in step.
    assert_eq!(keel_store_conformance::CHECKS.len(), 23);
}
