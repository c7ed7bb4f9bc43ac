//! Opening the keel database.

use crate::error::CliError;
use keel_replay::error::ReplayError;
use keel_store::{SledStore, StoreConfig, StoreError};
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
