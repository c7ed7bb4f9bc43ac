//! sled writes page images larger than a quarter of its segment to separate blob files
//! without any fsync. keel's segment size keeps every page with max-size events and
//! snapshots in the fsynced data file: `blobs/` must stay empty.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;
use common::*;
use keel_store::{Coordination, Durability, EventLog, Limits, Seq, SledStore, StoreConfig};

fn blob_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("blobs")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn max_size_events_and_snapshots_never_reach_sled_blob_files() {
    let dir = tempdir();
    let max = Limits::VALUE_BYTES_HARD_MAX;
    let limits = Limits { event_bytes_max: max, snapshot_bytes_max: max, ..Limits::default() };
    let log =
        SledStore::open(dir.path(), StoreConfig { durability: Durability::None, limits, ..StoreConfig::default() })
            .unwrap();
    // Interleave 8 runs so leaves fill from the middle too; flush often so pages are
    // consolidated and written out.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = [0u64; 8];
    for i in 0..400u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let r = (x % 8) as usize;
        let mut record = rec(i);
        record.payload = vec![(i % 251) as u8; max];
        log.append(run(r as u8), Seq(next[r]), vec![record], None).unwrap();
        next[r] += 1;
        if i % 5 == 0 {
            log.save_snapshot(run(r as u8), Seq(next[r]), &vec![1u8; max]).unwrap();
            log.flush().unwrap();
            assert_eq!(blob_files(dir.path()), 0, "after {i} appends");
        }
    }
    log.flush().unwrap();
    assert_eq!(blob_files(dir.path()), 0);
}
