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

fn sled_store() -> Arc<dyn Store> {
    let dir = tempfile::Builder::new().prefix("keel-conformance-").tempdir().unwrap();
    let cfg = StoreConfig { durability: Durability::None, ..StoreConfig::default() };
    let store = SledStore::open(dir.path(), cfg).unwrap();
    // The directory is removed when the test process ends (tempdir's Drop would remove it
    // under the open store).
    std::mem::forget(dir);
    Arc::new(store)
}

#[test]
fn run_all_runs_every_check_and_the_macro_lists_them_all() {
    keel_store_conformance::run_all(&|| -> Arc<dyn Store> { Arc::new(MemStore::new()) });
    // 17 checks: keep CHECKS and the macro's list in step.
    assert_eq!(keel_store_conformance::CHECKS.len(), 17);
}
