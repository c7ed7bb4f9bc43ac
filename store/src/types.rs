//! Public types of the store boundary. See the crate docs for the contract.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fmt;

/// Identity of one workflow run (and of its log).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RunId(pub uuid::Uuid);

impl RunId {
    /// The run id of these 16 UUID bytes.
    pub fn from_bytes(b: [u8; 16]) -> Self {
        RunId(uuid::Uuid::from_bytes(b))
    }
    /// The 16 UUID bytes (the form keys and digests use).
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl fmt::Debug for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RunId({})", self.0)
    }
}
impl std::str::FromStr for RunId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(RunId(uuid::Uuid::parse_str(s)?))
    }
}

/// Position of a record in its run's log, 0-based and gap-free.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize)]
pub struct Seq(pub u64);

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A SHA-256 chain hash or digest.
pub type Hash32 = [u8; 32];

/// What a record carries. The store encodes it with bincode and digests `fields()`.
pub trait Payload: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// Stable name of this payload's kind (e.g. "TaskExecuted"), stored in the envelope.
    fn kind(&self) -> &'static str;
    /// Version of this value's payload layout, chosen by the domain (an engine bumps it when
    /// it changes an event's shape, and upcasts older versions when it reads them). The
    /// store records it in the envelope (schema version 3), covers it by the chain hash and
    /// hands it back ([`crate::Record::payload_version`]); it never interprets it.
    fn payload_version(&self) -> u16;
    /// The payload as a JSON object; each top-level field is digested separately so an
    /// export can redact a field and still verify. Must be deterministic.
    fn fields(&self) -> serde_json::Map<String, serde_json::Value>;
}
