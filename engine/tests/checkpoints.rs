//! Signed head checkpoints written by the engine: after `run_until_idle` and when service
//! workers stop, only with a signer.
#![allow(clippy::unwrap_used, missing_docs)]

use keel_engine::checkpoint::stored_parts;
use keel_engine::{Engine, HeadSigner};
use keel_store::MemStore;
use std::sync::Arc;

/// Signs with SHA-256 of the message (no key: the engine only needs *a* signer).
struct Digesting;
impl HeadSigner for Digesting {
    fn alg(&self) -> &'static str {
        "test-sha256"
    }
    fn public_hex(&self) -> String {
        "00".repeat(32)
    }
    fn sign_hex(&self, msg: &[u8]) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(msg))
    }
}

#[tokio::test]
async fn an_engine_with_a_signer_checkpoints_after_run_until_idle_and_when_its_workers_stop() {
    let store = Arc::new(MemStore::new());
    let engine = Engine::builder()
        .store(store.clone())
        .checkpoint_signer(Arc::new(Digesting))
        .checkpoint_every_ms(3_600_000)
        .open()
        .unwrap();
    engine.run_until_idle().await.unwrap();
    assert_eq!(stored_parts(store.as_ref()).unwrap().len(), 1);
    // Service workers write one when they start and one when they stop.
    let workers = engine.start();
    workers.shutdown().await;
    assert!(stored_parts(store.as_ref()).unwrap().len() >= 2);
    let unsigned = Engine::builder().store(Arc::new(MemStore::new())).open().unwrap();
    unsigned.run_until_idle().await.unwrap();
    assert!(stored_parts(unsigned.store().as_ref()).unwrap().is_empty());
}
