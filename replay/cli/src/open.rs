//! Opening the keel database.

use crate::error::CliError;
use keel_replay::error::ReplayError;
use keel_store::{LostRecords, SledStore, Store, StoreConfig, StoreError};
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
    SledStore::open(dir, config).map_err(|e| sled_error(dir, e))
}

fn sled_error(dir: &Path, e: StoreError) -> ReplayError {
    match e {
        StoreError::Locked { .. } => ReplayError::DbLocked { path: dir.to_path_buf() },
        StoreError::NotFound { .. } => ReplayError::DbNotFound { path: dir.to_path_buf() },
        StoreError::NotAStore { reason, .. } => ReplayError::NotADb { path: dir.to_path_buf(), reason },
        other => ReplayError::Store(other),
    }
}

/// Opens an existing database (a missing one is an error).
pub(crate) fn open(db: &Path) -> Result<Arc<dyn Store>, CliError> {
    Ok(open_db(db, false)?)
}

/// Opens an existing database for reading only: a sled database is read from a scratch
/// copy (nothing in its directory is written), so this works on a read-only directory
/// and a full disk. Committed records the store's manifest names that are gone are an
/// error naming them (`keel doctor` explains them): found at open when the store was not
/// closed cleanly; after a clean close each run is checked when first read (listing runs
/// from the run index reads none of them), so the open does not read every run's head.
pub(crate) fn open_read(db: &Path) -> Result<Arc<dyn Store>, CliError> {
    refuse_lost(db, open_read_as(db, true)?)
}

/// [`open_read`] with every run checked at open, whether or not the store was closed
/// cleanly: for `export --all`, `replay --all` and `verify FILE --against-db`, which must
/// not pass over a run the manifest says was committed and sled no longer holds (a
/// listing of sled's runs does not name it).
pub(crate) fn open_read_checked(db: &Path) -> Result<Arc<dyn Store>, CliError> {
    refuse_lost(db, open_read_as(db, false)?)
}

/// [`open_read`], with every run checked at open (`keel verify`, `keel doctor`), returning
/// what was lost instead of failing on it.
pub(crate) fn open_read_lossy(db: &Path) -> Result<(Arc<dyn Store>, Vec<LostRecords>), CliError> {
    open_read_as(db, false)
}

/// A read-only open, each run checked at its first use after a clean close (`lazy`) or
/// every run at open, and what the open found lost.
fn open_read_as(db: &Path, lazy: bool) -> Result<(Arc<dyn Store>, Vec<LostRecords>), CliError> {
    if crate::backend::postgres_config(db).is_some() {
        return Ok((open(db)?, Vec::new()));
    }
    let opened = if lazy {
        SledStore::open_read_only_lazy(db, StoreConfig::default())
    } else {
        SledStore::open_read_only(db, StoreConfig::default())
    };
    let store = opened.map_err(|e| sled_error(db, e))?;
    let lost = store.lost().to_vec();
    Ok((Arc::new(store), lost))
}

/// The store, or the error naming what it lost.
fn refuse_lost(db: &Path, (store, lost): (Arc<dyn Store>, Vec<LostRecords>)) -> Result<Arc<dyn Store>, CliError> {
    if !lost.is_empty() {
        return Err(StoreError::LostCommitted { path: db.to_path_buf(), lost, evidence: None }.into());
    }
    Ok(store)
}
