//! The record envelope: the codec (the only module that knows bincode), the stored key and
//! value layout with its checked iterators, and the hash formulas (docs/STORE.md).

mod borrowing;
pub mod codec;
pub mod digest;
pub(crate) mod record;
