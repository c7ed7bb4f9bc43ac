//! The wake-up callbacks of one PostgreSQL store (its work queue's `LISTEN` session calls
//! them), apart from the queue so that the store can hold them without importing it.

use std::sync::{Mutex, PoisonError};

/// The wake-up callbacks of one store, and whether its listener runs.
#[derive(Default)]
pub(crate) struct Wakers {
    pub(crate) calls: Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
    pub(crate) listening: Mutex<bool>,
}

impl Wakers {
    pub(crate) fn wake_all(&self) {
        for wake in self.calls.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            wake();
        }
    }
}
