//! Old payload layouts, read forever: the upcaster chain of the event catalogue.
//!
//! Every record's envelope carries its payload's version ([`Event::payload_version`] when
//! it was written). [`decode`] reads a payload by (kind, payload version): the current
//! layout directly, an older one through its frozen legacy type and the conversion to the
//! next version, step by step. Upcasting lives here, in the engine: keel-store moves
//! bytes and knows no workflow.
//!
//! | kind | version | change |
//! |---|---|---|
//! | every kind | 1 | the layout of keel's first release |
//! | `TaskFailed` | 2 | `source` (handler, evaluator, gate, engine) replaces the `"evaluator: "` message prefix; the schema gate records the code `schema_mismatch` in `error` and the validator's text in `note` |
//! | `TaskDispatched` | 2 | `effect_key` (stable across attempts) beside `attempt_key` (version 1's `idempotency_key`, per attempt); `TaskInput` gains `skipped` |
//! | `Planned`, `Replanned`, `PlanRejected` | 2 | `TaskSpec` gains `optional_deps` |
//! | `RunCompleted` | 2 | `outputs` (the done tasks whose outputs are the result) replaces `result` (every output copied); field order `partial, summary, outputs` |
//! | `HumanResolved` | 2 | `reason` (why the person decided; a deadline's default records [`crate::model::event::DEFAULT_REASON`]) after `defaulted` |
//!
//! A version-1 `TaskDispatched` converts with `attempt_key` = its `idempotency_key`, an
//! empty `effect_key` (the fold derives it, [`crate::core::effect_key`]; the determinism
//! check compares the rest, see [`Event::same_decision`]) and no skipped upstreams; a
//! version-1 plan's tasks have no optional dependencies.
//!
//! A version-1 `TaskFailed` converts as: an `error` starting `"evaluator: "` came from the
//! evaluator (the prefix is dropped); one starting [`LEGACY_GATE_PREFIX`] from the schema
//! gate (kept verbatim: the decisions recorded after it quote it, so the run still passes
//! the determinism check, see [`Event::same_decision`]); `"no handler registered for "` and
//! `"output too large: "` from the engine; anything else from the handler.
//!
//! A version-1 `RunCompleted` converts as: `outputs` = the keys of its `result` object, in
//! order (canonical JSON sorts them, as version 2 sorts `outputs`). `apply` rebuilds the
//! same result from the tasks' recorded outputs (it is what `decide` had built them from).
//!
//! A version-1 `HumanResolved` converts with an empty `reason` (none was recorded); a
//! deadline's default of version 1 still passes the determinism check (see
//! [`Event::same_decision`]).

use crate::model::event::{Event, FailureSource, LEGACY_GATE_PREFIX};
use crate::model::workflow::{ErrorClass, Json, TaskId, Usage};
use keel_store::{codec, Payload, Record, StoreError};
use serde::{Deserialize, Serialize};

/// The newest payload version of any kind (what [`decode`] accepts at most).
pub const PAYLOAD_VERSION_MAX: u16 = 2;

/// Decodes a payload of `kind` written at `payload_version`, upcast to the current layout.
/// Errors: a version this code does not know, or bytes that do not decode as that
/// version's layout.
pub fn decode(kind: &str, payload_version: u16, bytes: &[u8]) -> Result<Event, String> {
    known(kind, payload_version)?;
    if payload_version == 1 && v1::CHANGED.contains(&kind) {
        return codec::decode::<v1::Event>(bytes).map(v1::Event::upcast).map_err(|e| e.to_string());
    }
    codec::decode::<Event>(bytes).map_err(|e| e.to_string())
}

/// Decodes a record read from the log, upcast to the current layout, checked as
/// [`Record::decode_verified`] checks it (a substituted payload is an error), in the
/// layout it was written in: the chain covers the bytes as written. A payload version
/// this code does not know is `Decode { run, seq, reason }`.
pub fn decode_record(rec: &Record, payload_version: u16) -> Result<Event, StoreError> {
    known(&rec.kind, payload_version).map_err(|reason| StoreError::Decode { run: rec.run, seq: rec.seq, reason })?;
    if payload_version == 1 && v1::CHANGED.contains(&rec.kind.as_str()) {
        return rec.decode_verified::<v1::Event>().map(v1::Event::upcast);
    }
    rec.decode_verified::<Event>()
}

/// The payload fields of a stored record exactly as they were written (what its payload
/// root covers): decoded in the layout of its payload version, not upcast. What an export
/// writes and a deep verification recomputes the root from.
pub fn stored_fields(rec: &Record) -> Result<serde_json::Map<String, serde_json::Value>, StoreError> {
    let v = rec.payload_version();
    known(&rec.kind, v).map_err(|reason| StoreError::Decode { run: rec.run, seq: rec.seq, reason })?;
    if v == 1 && v1::CHANGED.contains(&rec.kind.as_str()) {
        return rec.decode::<v1::Event>().map(|e| e.fields());
    }
    rec.decode::<Event>().map(|e| e.fields())
}

/// `Err` (why) unless this code reads payload version `v` of `kind`.
fn known(kind: &str, v: u16) -> Result<(), String> {
    if v == 0 {
        return Err(format!("{kind}: payload version 0 does not exist"));
    }
    if v > PAYLOAD_VERSION_MAX {
        return Err(format!("{kind}: payload version {v} is newer than this code reads ({PAYLOAD_VERSION_MAX})"));
    }
    Ok(())
}

/// The fields of a `TaskFailed` of either payload version, as exported (JSON): version 1
/// has no `source` and no `note`.
#[derive(Deserialize)]
struct TaskFailedFields {
    task: TaskId,
    attempt: u32,
    class: ErrorClass,
    error: String,
    usage: Usage,
    #[serde(default)]
    source: Option<FailureSource>,
    #[serde(default)]
    note: Option<String>,
}

impl TaskFailedFields {
    fn into_event(self) -> Event {
        let TaskFailedFields { task, attempt, class, error, usage, source, note } = self;
        match source {
            Some(source) => Event::TaskFailed { task, attempt, class, error, usage, source, note },
            None => v1::Event::TaskFailed { task, attempt, class, error, usage }.upcast(),
        }
    }
}

/// The fields of a `TaskDispatched` of either payload version, as exported (JSON):
/// version 1 names the per-attempt key `idempotency_key` and has no `effect_key`.
#[derive(Deserialize)]
struct TaskDispatchedFields {
    task: TaskId,
    attempt: u32,
    #[serde(default)]
    effect_key: String,
    #[serde(alias = "idempotency_key")]
    attempt_key: String,
    model: Option<String>,
    input: crate::model::workflow::TaskInput,
    reserved: Usage,
}

impl TaskDispatchedFields {
    fn into_event(self) -> Event {
        let TaskDispatchedFields { task, attempt, effect_key, attempt_key, model, input, reserved } = self;
        Event::TaskDispatched { task, attempt, effect_key, attempt_key, model, input, reserved }
    }
}

/// The fields of a `RunCompleted` of either payload version, as exported (JSON): version
/// 1 has `result` and no `outputs`.
#[derive(Deserialize)]
struct RunCompletedFields {
    partial: bool,
    summary: String,
    #[serde(default)]
    outputs: Option<Vec<TaskId>>,
    #[serde(default)]
    result: Option<crate::model::workflow::Json>,
}

impl RunCompletedFields {
    fn into_event(self) -> Event {
        let RunCompletedFields { partial, summary, outputs, result } = self;
        match (outputs, result) {
            (Some(outputs), _) => Event::RunCompleted { partial, summary, outputs },
            (None, result) => v1::Event::RunCompleted { partial, result: result.unwrap_or_default(), summary }.upcast(),
        }
    }
}

/// Payload version 1, frozen: never change these types.
mod v1 {
    use super::*;

    use crate::model::workflow::{Complexity, Decision, RetryPolicy, TaskKind};
    use std::collections::BTreeMap;

    /// The kinds whose layout changed after payload version 1 (read through [`Event`]).
    pub(super) const CHANGED: [&str; 7] =
        ["Planned", "Replanned", "PlanRejected", "TaskDispatched", "TaskFailed", "HumanResolved", "RunCompleted"];

    /// `Event` as payload version 1 encoded the kinds that changed since: bincode encodes
    /// an enum by variant index, so the unchanged variants before them hold their places
    /// as unit placeholders (they are never read: [`super::decode`] uses this type for the
    /// kinds in [`CHANGED`] only).
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub(super) enum Event {
        RunAccepted,
        PlanRequested,
        Planned {
            revision: u32,
            plan: Plan,
        },
        Replanned {
            revision: u32,
            plan: Plan,
            carried_over: Vec<TaskId>,
            superseded: Vec<TaskId>,
        },
        PlanRejected {
            revision: u32,
            errors: Vec<String>,
            plan: Option<Plan>,
        },
        TaskDispatched {
            task: TaskId,
            attempt: u32,
            idempotency_key: String,
            model: Option<String>,
            input: TaskInput,
            reserved: Usage,
        },
        TaskExecuted,
        TaskFailed {
            task: TaskId,
            attempt: u32,
            class: ErrorClass,
            error: String,
            usage: Usage,
        },
        RetryScheduled,
        TaskEvaluated,
        TaskSkipped,
        ReplanRequested,
        BudgetExhausted,
        Escalated,
        EscalationNotified,
        HumanResolved {
            number: u32,
            decision: Decision,
            by: String,
            defaulted: bool,
        },
        RunCompleted {
            partial: bool,
            result: Json,
            summary: String,
        },
    }

    /// `Plan` of payload version 1.
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub(super) struct Plan {
        tasks: Vec<TaskSpec>,
        rationale: String,
    }

    /// `TaskSpec` of payload version 1 (no `optional_deps`).
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub(super) struct TaskSpec {
        id: TaskId,
        kind: TaskKind,
        handler: String,
        input: Json,
        depends_on: Vec<TaskId>,
        timeout_ms: u64,
        retry: RetryPolicy,
        success_criteria: Option<String>,
        cost_estimate_micros: u64,
        token_estimate: u64,
        critical: bool,
        output_schema: Option<Json>,
        complexity: Option<Complexity>,
        cacheable: bool,
    }

    /// `TaskInput` of payload version 1 (no `skipped`).
    #[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
    pub(super) struct TaskInput {
        input: Json,
        upstream: BTreeMap<TaskId, Json>,
        note: Option<String>,
    }

    impl Plan {
        fn upcast(self) -> crate::model::workflow::Plan {
            crate::model::workflow::Plan {
                tasks: self.tasks.into_iter().map(TaskSpec::upcast).collect(),
                rationale: self.rationale,
            }
        }
    }

    impl TaskSpec {
        fn upcast(self) -> crate::model::workflow::TaskSpec {
            let TaskSpec {
                id,
                kind,
                handler,
                input,
                depends_on,
                timeout_ms,
                retry,
                success_criteria,
                cost_estimate_micros,
                token_estimate,
                critical,
                output_schema,
                complexity,
                cacheable,
            } = self;
            crate::model::workflow::TaskSpec {
                id,
                kind,
                handler,
                input,
                depends_on,
                timeout_ms,
                retry,
                success_criteria,
                cost_estimate_micros,
                token_estimate,
                critical,
                output_schema,
                complexity,
                cacheable,
                optional_deps: Vec::new(),
            }
        }
    }

    impl Event {
        /// Version 1 -> version 2 (the module docs say how).
        pub(super) fn upcast(self) -> super::Event {
            match self {
                Event::Planned { revision, plan } => super::Event::Planned { revision, plan: plan.upcast() },
                Event::Replanned { revision, plan, carried_over, superseded } => {
                    super::Event::Replanned { revision, plan: plan.upcast(), carried_over, superseded }
                }
                Event::PlanRejected { revision, errors, plan } => {
                    super::Event::PlanRejected { revision, errors, plan: plan.map(Plan::upcast) }
                }
                Event::TaskDispatched { task, attempt, idempotency_key, model, input, reserved } => {
                    let TaskInput { input, upstream, note } = input;
                    super::Event::TaskDispatched {
                        task,
                        attempt,
                        effect_key: String::new(),
                        attempt_key: idempotency_key,
                        model,
                        input: crate::model::workflow::TaskInput { input, upstream, note, skipped: Vec::new() },
                        reserved,
                    }
                }
                Event::TaskFailed { task, attempt, class, error, usage } => {
                    upcast_task_failed(task, attempt, class, error, usage)
                }
                // No reason was recorded, so it is empty.
                Event::HumanResolved { number, decision, by, defaulted } => {
                    super::Event::HumanResolved { number, decision, by, defaulted, reason: String::new() }
                }
                // `outputs` are the keys of `result` (sorted, as canonical JSON wrote them).
                Event::RunCompleted { partial, result, summary } => {
                    let mut outputs: Vec<TaskId> = match result.value() {
                        Ok(serde_json::Value::Object(m)) => m.keys().map(|k| TaskId(k.clone())).collect(),
                        _ => Vec::new(),
                    };
                    outputs.sort();
                    super::Event::RunCompleted { partial, summary, outputs }
                }
                // A placeholder variant never decodes from a record of a changed kind; kept total.
                Event::RunAccepted
                | Event::PlanRequested
                | Event::TaskExecuted
                | Event::RetryScheduled
                | Event::TaskEvaluated
                | Event::TaskSkipped
                | Event::ReplanRequested
                | Event::BudgetExhausted
                | Event::Escalated
                | Event::EscalationNotified => super::Event::TaskFailed {
                    task: TaskId(String::new()),
                    attempt: 0,
                    class: ErrorClass::Fatal,
                    error: "not a version-1 payload of a changed kind".to_owned(),
                    usage: Usage::default(),
                    source: FailureSource::Engine,
                    note: None,
                },
            }
        }

        fn name(&self) -> &'static str {
            match self {
                Event::RunAccepted => "RunAccepted",
                Event::PlanRequested => "PlanRequested",
                Event::Planned { .. } => "Planned",
                Event::Replanned { .. } => "Replanned",
                Event::PlanRejected { .. } => "PlanRejected",
                Event::TaskDispatched { .. } => "TaskDispatched",
                Event::TaskExecuted => "TaskExecuted",
                Event::TaskFailed { .. } => "TaskFailed",
                Event::RetryScheduled => "RetryScheduled",
                Event::TaskEvaluated => "TaskEvaluated",
                Event::TaskSkipped => "TaskSkipped",
                Event::ReplanRequested => "ReplanRequested",
                Event::BudgetExhausted => "BudgetExhausted",
                Event::Escalated => "Escalated",
                Event::EscalationNotified => "EscalationNotified",
                Event::HumanResolved { .. } => "HumanResolved",
                Event::RunCompleted { .. } => "RunCompleted",
            }
        }
    }

    /// A version-1 `TaskFailed` as version 2 (the module docs say how `source` is found).
    fn upcast_task_failed(task: TaskId, attempt: u32, class: ErrorClass, error: String, usage: Usage) -> super::Event {
        let (source, error) = if let Some(message) = error.strip_prefix("evaluator: ") {
            (FailureSource::Evaluator, message.to_owned())
        } else if error.starts_with(LEGACY_GATE_PREFIX) {
            (FailureSource::Gate, error)
        } else if error.starts_with("no handler registered for ") || error.starts_with("output too large: ") {
            (FailureSource::Engine, error)
        } else {
            (FailureSource::Handler, error)
        };
        super::Event::TaskFailed { task, attempt, class, error, usage, source, note: None }
    }

    impl Payload for Event {
        fn payload_version(&self) -> u16 {
            1
        }

        fn kind(&self) -> &'static str {
            self.name()
        }

        /// The fields exactly as version 1's `Event::fields` wrote them (the chain's
        /// payload root of a schema-version-1 record is checked against them).
        fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
            match serde_json::to_value(self) {
                Ok(serde_json::Value::Object(mut outer)) => match outer.remove(self.name()) {
                    Some(serde_json::Value::Object(inner)) => inner,
                    _ => serde_json::Map::new(),
                },
                _ => serde_json::Map::new(),
            }
        }
    }
}

impl Event {
    /// Rebuild an event from its kind and the JSON object of its fields (as exported).
    /// Reads every payload version of the kind (a `TaskFailed` without `source` is
    /// version 1 and is upcast).
    pub fn from_fields(
        kind: &str,
        fields: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Event, serde_json::Error> {
        if kind == "TaskFailed" {
            // Either payload version: version 1 has no `source` (see `TaskFailedFields`).
            let f: TaskFailedFields = serde_json::from_value(serde_json::Value::Object(fields))?;
            return Ok(f.into_event());
        }
        if kind == "TaskDispatched" {
            // Either payload version: version 1 has `idempotency_key` and no `effect_key`.
            let f: TaskDispatchedFields = serde_json::from_value(serde_json::Value::Object(fields))?;
            return Ok(f.into_event());
        }
        if kind == "RunCompleted" {
            // Either payload version: version 1 has `result` (see `RunCompletedFields`).
            let f: RunCompletedFields = serde_json::from_value(serde_json::Value::Object(fields))?;
            return Ok(f.into_event());
        }
        let mut outer = serde_json::Map::new();
        // Escalated is a newtype variant: its fields are the Escalation struct itself.
        outer.insert(kind.to_owned(), serde_json::Value::Object(fields));
        serde_json::from_value(serde_json::Value::Object(outer))
    }

    /// Deserializes an event of kind `kind` straight from `fields`, a deserializer of the
    /// object of its fields (as exported), without building a `serde_json::Value` first.
    ///
    /// Decodes what [`Event::from_fields`] decodes: the variant is named by `kind` (an
    /// unknown kind is an error), a struct variant's fields must be an object, and
    /// `Escalated` (a newtype variant) hands the object to [`Escalation`]'s own
    /// deserializer. Errors are `D`'s; their text may differ from `from_fields`'s.
    pub fn deserialize_fields<'de, D: serde::Deserializer<'de>>(kind: &str, fields: D) -> Result<Event, D::Error> {
        if kind == "TaskFailed" {
            return TaskFailedFields::deserialize(fields).map(TaskFailedFields::into_event);
        }
        if kind == "TaskDispatched" {
            return TaskDispatchedFields::deserialize(fields).map(TaskDispatchedFields::into_event);
        }
        if kind == "RunCompleted" {
            return RunCompletedFields::deserialize(fields).map(RunCompletedFields::into_event);
        }
        Event::deserialize(KindTagged { kind, fields })
    }
}

/// A deserializer of an externally tagged enum whose tag is given apart from the content:
/// the variant is named by `kind`, its content is read from `fields`.
struct KindTagged<'k, D> {
    kind: &'k str,
    fields: D,
}

impl<'de, D: serde::Deserializer<'de>> serde::Deserializer<'de> for KindTagged<'_, D> {
    type Error = D::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        visitor.visit_enum(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

impl<'de, D: serde::Deserializer<'de>> serde::de::EnumAccess<'de> for KindTagged<'_, D> {
    type Error = D::Error;
    type Variant = VariantFields<D>;

    fn variant_seed<V: serde::de::DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Self::Variant), D::Error> {
        let name = seed.deserialize(serde::de::value::StrDeserializer::<D::Error>::new(self.kind))?;
        Ok((name, VariantFields(self.fields)))
    }
}

/// The content of a [`KindTagged`] variant: what `serde_json::from_value` does with the
/// value of `{"Kind": value}`, for any deserializer.
struct VariantFields<D>(D);

impl<'de, D: serde::Deserializer<'de>> serde::de::VariantAccess<'de> for VariantFields<D> {
    type Error = D::Error;

    fn unit_variant(self) -> Result<(), D::Error> {
        <() as Deserialize>::deserialize(self.0)
    }

    fn newtype_variant_seed<T: serde::de::DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, D::Error> {
        seed.deserialize(self.0)
    }

    fn tuple_variant<V: serde::de::Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_seq(visitor)
    }

    fn struct_variant<V: serde::de::Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(visitor)
    }
}
