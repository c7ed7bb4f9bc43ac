//! The test payload the checks append: several kinds, as an engine would have.

use keel_store::{prepare, NewRecord, Payload};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// Several payload kinds, with payload versions that differ by kind (the store must hand
/// back what was stated).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Ev {
    /// A run's first event.
    Accepted {
        /// Free text.
        request: String,
        /// A number.
        budget_micros: u64,
    },
    /// A plan.
    Planned {
        /// A number.
        revision: u32,
        /// Some names.
        tasks: Vec<String>,
    },
    /// An answer.
    Executed {
        /// A name.
        task: String,
        /// A long text.
        output: String,
    },
}

impl Payload for Ev {
    fn kind(&self) -> &'static str {
        match self {
            Ev::Accepted { .. } => "Accepted",
            Ev::Planned { .. } => "Planned",
            Ev::Executed { .. } => "Executed",
        }
    }

    fn payload_version(&self) -> u16 {
        match self {
            Ev::Planned { .. } => 4,
            _ => 1,
        }
    }

    fn fields(&self) -> Map<String, Value> {
        let v = match self {
            Ev::Accepted { request, budget_micros } => json!({"request": request, "budget_micros": budget_micros}),
            Ev::Planned { revision, tasks } => json!({"revision": revision, "tasks": tasks}),
            Ev::Executed { task, output } => json!({"task": task, "output": output}),
        };
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }
}

/// The i-th event of a deterministic sample history.
pub fn ev(i: u64) -> Ev {
    match i % 3 {
        0 => Ev::Accepted { request: format!("req-{i} ✓ \"quoted\"\n"), budget_micros: 1_000 * i },
        1 => {
            Ev::Planned { revision: u32::try_from(i).unwrap_or(u32::MAX), tasks: vec!["fetch".into(), format!("t{i}")] }
        }
        _ => Ev::Executed { task: format!("t{i}"), output: "o".repeat(200) },
    }
}

/// [`ev`]`(i)` prepared at time `1_700_000_000_000_000 + i` µs.
pub fn rec(i: u64) -> NewRecord {
    prepare(&ev(i), 1_700_000_000_000_000 + i64::try_from(i).unwrap_or(0)).unwrap()
}
