//! Opening the keel database.

use crate::error::CliError;
use keel_replay::error::ReplayError;
use keel_store::{SledStore, Store, StoreConfig, StoreError};
use std::path::Path;
use std::sync::Arc;

/// Opens the keel database `db` names: a PostgreSQL URL (`crate::backend`) or a sled
/// directory. With `create = false` a missing database is [`ReplayError::DbNotFound`]; a
/// sled database another process holds is [`ReplayError::DbLocked`].
pub(crate) fn open_db(db: &Path, create: bool) -> Result<Arc<dyn Store>, ReplayError> {
    if let Some(config) = crate::backend::postgres_config(db) {
        return crate::backend::open_postgres(db, config?, create);
    }
    Ok(Arc::new(open_sled(db, create)?))
}

/// Opens the sled database in `dir` (see [`open_db`]).
fn open_sled(dir: &Path, create: bool) -> Result<SledStore, ReplayError> {
    let config = StoreConfig { create, ..StoreConfig::default() };
    SledStore::open(dir, config).map_err(|e| match e {
        StoreError::Locked { .. } => ReplayError::DbLocked { path: dir.to_path_buf() },
        StoreError::NotFound { .. } => ReplayError::DbNotFound { path: dir.to_path_buf() },
        StoreError::NotAStore { reason, .. } => ReplayError::NotADb { path: dir.to_path_buf(), reason },
        other => ReplayError::Store(other),
    })
}

/// Opens an existing database (a missing one is an error).
pub(crate) fn open(db: &Path) -> Result<Arc<dyn Store>, CliError> {
    Ok(open_db(db, false)?)
}
