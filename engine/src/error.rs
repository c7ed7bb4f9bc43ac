//! The engine boundary's error type.

use crate::core::TransitionError;
use crate::model::fsm::RunStatus;
use keel_store::{RunId, StoreError};

/// Everything an [`crate::Engine`] call can fail with.
///
/// Domain outcomes (the request is wrong, the run is not in a state that allows it) are
/// kept apart from infrastructure failures (`Store`) and from bugs (`Transition` on a
/// record the engine itself built, `Internal`).
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No workflow type of that name is registered. Nothing was written.
    #[error("unknown workflow type {name:?}")]
    UnknownWorkflow {
        /// The name given.
        name: String,
    },

    /// The request input failed validation (JSON Schema, size). Nothing was written.
    #[error("invalid input for workflow {workflow:?}: {}", errors.join("; "))]
    InvalidInput {
        /// The workflow type.
        workflow: String,
        /// Every problem found.
        errors: Vec<String>,
    },

    /// No run with that id exists in the log.
    #[error("unknown run {run}")]
    UnknownRun {
        /// The run.
        run: RunId,
    },

    /// A resolution for a run that is not waiting for a human.
    #[error("run {run} is not awaiting a human (status {status:?})")]
    NotAwaitingHuman {
        /// The run.
        run: RunId,
        /// Its status.
        status: RunStatus,
    },

    /// The run already finished; nothing can change it.
    #[error("run {run} is already terminal (status {status:?})")]
    AlreadyTerminal {
        /// The run.
        run: RunId,
        /// Its status.
        status: RunStatus,
    },

    /// The decision is not one of the options the escalation offers.
    #[error("run {run}: decision {decision:?} is not an option of escalation {number} (options: {})", options.join(", "))]
    InvalidDecision {
        /// The run.
        run: RunId,
        /// The escalation's number.
        number: u32,
        /// The decision given.
        decision: String,
        /// The escalation's options.
        options: Vec<String>,
    },

    /// A human-supplied output fails the escalated task's output schema (the same gate a
    /// handler's output passes). Nothing was written.
    #[error("run {run}: the supplied output for task {task} fails its output schema ({code}): {detail}")]
    SuppliedOutputRejected {
        /// The run.
        run: RunId,
        /// The escalated task.
        task: crate::model::workflow::TaskId,
        /// The gate's stable code (`schema_mismatch`, `output_not_json`, ...).
        code: String,
        /// The validator's text, with the failing locations.
        detail: String,
    },

    /// A resolver was used for an escalation that is no longer the run's open one (it was
    /// resolved, or the engine that made the resolver is gone). Nothing was written.
    #[error("run {run}: escalation {number} is no longer open")]
    EscalationClosed {
        /// The run.
        run: RunId,
        /// The escalation the resolver was made for.
        number: u32,
    },

    /// An event the state machine refuses. For records the engine built itself this is a
    /// bug; for a resolution or cancellation it means the run moved on.
    #[error(transparent)]
    Transition(#[from] TransitionError),

    /// The idempotency key is held (within the workflow type's dedup window) by a run of
    /// a different request: another input or priority. Nothing was written. The digests
    /// are [`crate::request_digest`] of each request (hex).
    #[error(
        "idempotency key {key:?} of workflow {workflow:?} belongs to run {run} of a different request \
         (its request digest {existing_digest}, this request's {request_digest})"
    )]
    IdempotencyConflict {
        /// The workflow type (keys are scoped to it).
        workflow: String,
        /// The idempotency key.
        key: String,
        /// The run that holds the key.
        run: RunId,
        /// Digest of the request that run was accepted for.
        existing_digest: String,
        /// Digest of the request just refused.
        request_digest: String,
    },

    /// The event log failed (I/O, corruption, limits).
    #[error(transparent)]
    Store(#[from] StoreError),

    /// A value read back (snapshot, event, JSON) does not decode.
    #[error("cannot decode {what}: {reason}")]
    Decode {
        /// What does not decode.
        what: String,
        /// Why.
        reason: String,
    },

    /// The engine's configuration is invalid (builder).
    #[error("invalid engine configuration: {0}")]
    Config(String),

    /// A background task of the engine panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(String),

    /// A JSON document handed to the engine (a request input, a human-supplied output)
    /// nests deeper than [`keel_store::json::JSON_DEPTH_MAX`] levels. Nothing was written.
    /// Stable code: `json_too_deep`.
    #[error("json_too_deep: {what} nests deeper than {max} levels of arrays and objects")]
    JsonTooDeep {
        /// What was too deep ("input", "supplied output").
        what: &'static str,
        /// The limit.
        max: usize,
    },
}

impl EngineError {
    pub(crate) fn decode(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        EngineError::Decode { what: what.into(), reason: reason.to_string() }
    }
}
