//! Opening the keel database, and an engine over it.

use crate::error::CliError;
use keel_demo as demo;
use keel_engine::Engine;
use keel_replay::error::ReplayError;
use keel_store::{EventLog, SledStore, StoreConfig, StoreError};
use std::path::Path;
use std::sync::Arc;

/// Opens the keel database in `dir`. With `create = false` a missing database is
/// [`ReplayError::DbNotFound`]; a database another process holds is
/// [`ReplayError::DbLocked`].
pub(crate) fn open_db(dir: &Path, create: bool) -> Result<SledStore, ReplayError> {
    let config = StoreConfig { create, ..StoreConfig::default() };
    SledStore::open(dir, config).map_err(|e| match e {
        StoreError::Locked { .. } => ReplayError::DbLocked { path: dir.to_path_buf() },
        StoreError::NotFound { .. } => ReplayError::DbNotFound { path: dir.to_path_buf() },
        StoreError::NotAStore { reason, .. } => ReplayError::NotADb { path: dir.to_path_buf(), reason },
        other => ReplayError::Store(other),
    })
}

/// Opens an existing database (a missing one is an error).
pub(crate) fn open(db: &Path) -> Result<Arc<SledStore>, CliError> {
    Ok(Arc::new(open_db(db, false)?))
}

/// An engine over the database with the demo's workflow type and handlers registered.
pub(crate) fn engine_over(store: Arc<SledStore>) -> Result<Engine, CliError> {
    let log: Arc<dyn EventLog> = store;
    Ok(demo::register(Engine::builder().store(log)).open()?)
}

/// Every handler name of the demo (what `decide` validates plans against in a check).
pub(crate) fn demo_handlers() -> std::collections::BTreeSet<String> {
    demo::HANDLERS.iter().map(|h| (*h).to_owned()).collect()
}

/// Whether the run was accepted for the demo's workflow type.
pub(crate) fn is_demo(events: &[keel_engine::Logged]) -> bool {
    matches!(events.first().map(|e| &e.event), Some(keel_engine::Event::RunAccepted { workflow, .. }) if workflow == demo::WORKFLOW)
}
