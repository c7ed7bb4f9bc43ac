//! The payload store on real backends: a damaged chunk is a typed error naming the digest
//! (never a panic, never wrong bytes), and payloads survive a reopen of a sled store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use keel_store::{Durability, EventLog, MemStore, Payloads, SledStore, StoreConfig, StoreError, PAYLOAD_CHUNK_BYTES};

fn bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 256) as u8).collect()
}

fn expect_corrupt(r: Result<Option<Vec<u8>>, StoreError>, digest: &[u8; 32]) -> String {
    match r {
        Err(StoreError::CorruptPayload { digest: d, reason }) => {
            assert_eq!(d, hex::encode(digest), "the error names the digest");
            reason
        }
        other => panic!("expected CorruptPayload, got {:?}", other.map(|b| b.map(|b| b.len()))),
    }
}

#[test]
fn a_flipped_byte_in_a_chunk_is_a_corrupt_payload_error_naming_the_digest() {
    let log = MemStore::new();
    let data = bytes(3 * PAYLOAD_CHUNK_BYTES + 5);
    let r = log.put_payload(&data).unwrap();
    let mut chunk = data[PAYLOAD_CHUNK_BYTES..2 * PAYLOAD_CHUNK_BYTES].to_vec();
    chunk[17] ^= 1;
    log.raw_put_payload_chunk(&r.digest, 1, &chunk).unwrap();
    let reason = expect_corrupt(log.get_payload(&r.digest, usize::MAX), &r.digest);
    assert!(reason.contains("hash to"), "{reason}");
    // verify finds it too.
    assert!(matches!(keel_store::verify_payloads(&log), Err(StoreError::CorruptPayload { .. })));
}

#[test]
fn a_short_chunk_on_sled_is_a_corrupt_payload_error_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig { durability: Durability::None, ..StoreConfig::default() };
    let data = bytes(2 * PAYLOAD_CHUNK_BYTES + 1);
    let r = {
        let log = SledStore::open(dir.path(), config.clone()).unwrap();
        let r = log.put_payload(&data).unwrap();
        log.flush().unwrap();
        r
    };
    let log = SledStore::open(dir.path(), config).unwrap();
    assert_eq!(log.get_payload(&r.digest, usize::MAX).unwrap().as_deref(), Some(data.as_slice()));
    log.raw_put_payload_chunk(&r.digest, 0, b"short").unwrap();
    let reason = expect_corrupt(log.get_payload(&r.digest, usize::MAX), &r.digest);
    assert!(reason.contains("chunk 0 has 5 bytes"), "{reason}");
}
