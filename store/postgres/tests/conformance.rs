//! The conformance suite every backend passes, on PostgreSQL: each check on stores in
//! fresh schemas of their own, dropped when the check ends. Without a server the checks
//! say they were skipped (and fail where the server is required: CI).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;

mod group_commit_async {
    // As sled's runs it: without waiting for durability (commits with synchronous_commit
    // off, still one transaction per flush).
    keel_store_conformance::conformance_tests!(
        super::common::fresh_stores(keel_store::Durability::None),
        when = super::common::ready()
    );
}

mod group_commit_durable {
    // The default: one transaction per flush, each commit waiting for its WAL flush.
    keel_store_conformance::conformance_tests!(
        super::common::fresh_stores(keel_store::Durability::default()),
        when = super::common::ready()
    );
}
