//! keel-store-conformance: the contract of [`keel_store::Store`], as checks every backend
//! must pass (the in-memory one, sled, later PostgreSQL).
//!
//! A backend's test file holds one line:
//!
//! ```ignore
//! keel_store_conformance::conformance_tests!(|| std::sync::Arc::new(keel_store::MemStore::new()));
//! ```
//!
//! which generates one `#[test]` per check, each on fresh stores from the given factory.
//! [`run_all`] runs every check in one call instead. The checks come from keel-store's own
//! tests (append/read, concurrency, snapshots, read_runs) and its model test, plus the
//! coordination contract: leases with epochs and fencing, claims, aux entries and the
//! due-time index, and the payload store (round trip by digest, bounded reads).
//!
//! This crate is a test suite: a check fails by panicking, as a `#[test]` does, so it
//! unwraps freely.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![deny(clippy::indexing_slicing)]
#![warn(missing_docs)]

mod checks;
mod model;
mod payload;

pub use checks::*;
pub use model::model_matches_a_naive_log;
pub use payload::{ev, rec, Ev};

use keel_store::Store;
use std::sync::Arc;

/// Makes a fresh, empty store (each call a new one).
pub type MakeStore<'a> = &'a dyn Fn() -> Arc<dyn Store>;

/// One check of the suite.
pub type Check = fn(MakeStore<'_>);

/// Every check, by name, in the order [`run_all`] runs them.
pub const CHECKS: &[(&str, Check)] = &[
    ("round_trip_of_several_payload_kinds", round_trip_of_several_payload_kinds),
    ("read_from_the_middle_links_to_the_stored_predecessor", read_from_the_middle_links_to_the_stored_predecessor),
    ("unknown_run_has_an_empty_head_and_no_records", unknown_run_has_an_empty_head_and_no_records),
    ("runs_lists_every_run_with_records_sorted", runs_lists_every_run_with_records_sorted),
    ("multi_record_batch_is_written_in_order", multi_record_batch_is_written_in_order),
    ("an_append_at_a_taken_seq_is_a_typed_conflict", an_append_at_a_taken_seq_is_a_typed_conflict),
    ("a_batch_with_one_oversize_record_writes_nothing", a_batch_with_one_oversize_record_writes_nothing),
    ("racing_writers_on_one_run_each_slot_won_once", racing_writers_on_one_run_each_slot_won_once),
    ("threads_claiming_one_key_create_exactly_one_run", threads_claiming_one_key_create_exactly_one_run),
    (
        "an_expired_claim_can_be_retaken_and_an_unexpired_one_cannot",
        an_expired_claim_can_be_retaken_and_an_unexpired_one_cannot,
    ),
    ("snapshots_keep_the_latest_and_enforce_limits_and_head", snapshots_keep_the_latest_and_enforce_limits_and_head),
    ("read_runs_yields_what_read_yields_run_after_run", read_runs_yields_what_read_yields_run_after_run),
    ("leases_are_exclusive_expire_and_move_their_epoch", leases_are_exclusive_expire_and_move_their_epoch),
    ("a_fenced_append_with_a_stale_epoch_writes_nothing", a_fenced_append_with_a_stale_epoch_writes_nothing),
    ("aux_entries_round_trip_within_their_limits", aux_entries_round_trip_within_their_limits),
    ("aux_writes_go_with_their_append_or_not_at_all", aux_writes_go_with_their_append_or_not_at_all),
    ("fenced_aux_writes_go_with_their_append_or_not_at_all", fenced_aux_writes_go_with_their_append_or_not_at_all),
    ("counter_adds_sum_exactly_and_go_with_their_append", counter_adds_sum_exactly_and_go_with_their_append),
    ("the_due_index_lists_due_runs_earliest_first", the_due_index_lists_due_runs_earliest_first),
    ("model_matches_a_naive_log", model_matches_a_naive_log),
    ("payloads_round_trip_by_digest_across_chunk_boundaries", payloads_round_trip_by_digest_across_chunk_boundaries),
    ("a_payload_read_is_bounded", a_payload_read_is_bounded),
    ("remove_run_takes_records_payloads_and_aux_in_one_step", remove_run_takes_records_payloads_and_aux_in_one_step),
];

/// Runs every check of [`CHECKS`] on stores from `make`, naming each on stderr.
pub fn run_all(make: MakeStore<'_>) {
    for (name, check) in CHECKS {
        eprintln!("conformance: {name}");
        check(make);
    }
}

/// Generates one `#[test]` per check of the suite, each on stores from `$make` (an
/// expression of type `Fn() -> Arc<dyn keel_store::Store>`).
///
/// `conformance_tests!($make, when = $ready)` runs each check only if `$ready` (a `bool`
/// expression, evaluated in each test) holds: for a backend that needs a server, whose
/// tests say themselves why they skipped (and fail instead where the server is required).
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr, when = $ready:expr) => {
        $crate::conformance_tests!(@each $make, $ready;
            round_trip_of_several_payload_kinds,
            read_from_the_middle_links_to_the_stored_predecessor,
            unknown_run_has_an_empty_head_and_no_records,
            runs_lists_every_run_with_records_sorted,
            multi_record_batch_is_written_in_order,
            an_append_at_a_taken_seq_is_a_typed_conflict,
            a_batch_with_one_oversize_record_writes_nothing,
            racing_writers_on_one_run_each_slot_won_once,
            threads_claiming_one_key_create_exactly_one_run,
            an_expired_claim_can_be_retaken_and_an_unexpired_one_cannot,
            snapshots_keep_the_latest_and_enforce_limits_and_head,
            read_runs_yields_what_read_yields_run_after_run,
            leases_are_exclusive_expire_and_move_their_epoch,
            a_fenced_append_with_a_stale_epoch_writes_nothing,
            aux_entries_round_trip_within_their_limits,
            aux_writes_go_with_their_append_or_not_at_all,
            fenced_aux_writes_go_with_their_append_or_not_at_all,
            counter_adds_sum_exactly_and_go_with_their_append,
            the_due_index_lists_due_runs_earliest_first,
            model_matches_a_naive_log,
            payloads_round_trip_by_digest_across_chunk_boundaries,
            a_payload_read_is_bounded,
            remove_run_takes_records_payloads_and_aux_in_one_step,
        );
    };
    ($make:expr) => {
        $crate::conformance_tests!($make, when = true);
    };
    (@each $make:expr, $ready:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                if !$ready {
                    return;
                }
                let make = $make;
                $crate::$name(&make);
            }
        )*
    };
}
