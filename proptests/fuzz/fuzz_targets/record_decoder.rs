//! Arbitrary bytes as a stored record value (and as a bare payload): reading, decoding
//! and verifying must give a typed error or a record, never panic. Bytes that do read as
//! a record must decode to the same event twice (no hidden state).
#![no_main]

use keel_engine::Event;
use keel_store::{EventLog, MemStore, RunId, Seq};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = keel_store::codec::decode::<Event>(data);
    let _ = keel_store::codec::decode::<keel_engine::RunState>(data);
    let store = MemStore::new();
    let run = RunId::from_bytes([7; 16]);
    if store.raw_put(run, Seq(0), data).is_err() {
        return;
    }
    let _ = store.head(run);
    if let Ok(it) = store.read(run, Seq(0)) {
        for rec in it.flatten() {
            let a = rec.decode::<Event>().ok();
            let b = rec.decode::<Event>().ok();
            assert_eq!(a, b);
        }
    }
    let _ = keel_store::verify_run::<Event>(&store, run);
    let _ = keel_engine::load_state(&store, run);
});
