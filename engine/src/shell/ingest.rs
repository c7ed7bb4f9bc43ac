//! Ingestion: validate a request, record `RunAccepted` (claiming its idempotency key in
//! the same atomic append), queue the run.

use crate::api::{Request, Submitted};
use crate::error::EngineError;
use crate::model::event::{Event, Logged};
use crate::model::workflow::{Decision, Json};
use crate::shell::runtime::{Inner, Registered};
use keel_store::{Claim, RunId, Seq, StoreError};
use sha2::{Digest, Sha256};

/// Longest idempotency key a request may carry, in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 256;

pub(crate) async fn submit(inner: &Inner, req: Request) -> Result<Submitted, EngineError> {
    let req = bounded(req)?;
    let reg = inner
        .workflows
        .get(&req.workflow)
        .cloned()
        .ok_or_else(|| EngineError::UnknownWorkflow { name: req.workflow.clone() })?;
    let wf = &reg.wf;
    let input = validate(inner, &reg, &req)?;

    let run = RunId(uuid::Uuid::new_v4());
    let seed = req.seed.unwrap_or_else(|| seed_of(run));
    let event = Event::RunAccepted {
        workflow: wf.name.clone(),
        workflow_version: wf.version,
        input,
        idempotency_key: req.idempotency_key.clone(),
        priority: req.priority,
        seed,
        budget: req.budget.clone().unwrap_or_else(|| wf.budget.clone()),
        on_exhausted: wf.on_exhausted,
        routes: wf.routes.clone(),
        evaluator_model: wf.evaluator_model.clone(),
        max_parallel_tasks: wf.max_parallel_tasks,
    };
    let now_us = inner.clock.now_us();
    let logged = Logged { run, seq: Seq(0), at_us: now_us, event };
    let (state, record) = inner.journal.found(&logged)?;
    let claim = req.idempotency_key.as_ref().map(|k| {
        let window_us = i64::try_from(wf.dedup_window_ms.saturating_mul(1000)).unwrap_or(i64::MAX);
        Claim {
            key: format!("{}\0{}", wf.name, k).into_bytes(),
            now_us,
            expires_at_us: now_us.saturating_add(window_us),
        }
    });
    let res = inner.journal.append(&state, Seq(0), vec![record], claim).await;
    match res {
        Ok(_) => {}
        Err(EngineError::Store(StoreError::DuplicateKey { existing })) => {
            tracing::debug!(%existing, workflow = %wf.name, "duplicate idempotency key: returning the existing run");
            return Ok(Submitted { run: existing, duplicate: true });
        }
        Err(e) => return Err(e),
    }
    tracing::info!(%run, workflow = %wf.name, priority = req.priority, "run accepted");
    crate::shell::sched::enqueue(inner, &state);
    Ok(Submitted { run, duplicate: false })
}

/// The request, if its input nests at most `JSON_DEPTH_MAX` levels: checked before
/// anything recursive (the schema validator, serialization) touches it; a refused input is
/// taken apart without recursion.
fn bounded(mut req: Request) -> Result<Request, EngineError> {
    let input = std::mem::take(&mut req.input);
    match keel_store::json::accept(input) {
        Ok(input) => Ok(Request { input, ..req }),
        Err(e) => Err(EngineError::JsonTooDeep { what: "input", max: e.max }),
    }
}

/// A human's decision, if the output it supplies (if any) nests at most
/// `JSON_DEPTH_MAX` levels (a scan of the text: nothing recursive runs on it first).
pub(crate) fn check_decision_depth(decision: &Decision) -> Result<(), EngineError> {
    match decision {
        Decision::SupplyOutput(output) => keel_store::json::check_text_depth(output.as_str().as_bytes())
            .map_err(|e| EngineError::JsonTooDeep { what: "supplied output", max: e.max }),
        _ => Ok(()),
    }
}

/// The request's input as canonical JSON, once it passes the checks (size, the workflow
/// type's input schema, the idempotency key's length); else `InvalidInput` with one line
/// per problem. Nothing is written either way.
fn validate(inner: &Inner, reg: &Registered, req: &Request) -> Result<Json, EngineError> {
    let wf = &reg.wf;
    let invalid = |errors: Vec<String>| EngineError::InvalidInput { workflow: wf.name.clone(), errors };

    let input = Json::new(&req.input);
    if input.0.len() > inner.limits.input_bytes_max {
        return Err(invalid(vec![format!(
            "input is {} bytes of JSON, more than the limit of {}",
            input.0.len(),
            inner.limits.input_bytes_max
        )]));
    }
    if let Some(v) = &reg.validator {
        let errors: Vec<String> = v
            .iter_errors(&req.input)
            .map(|e| {
                let path = e.instance_path().to_string();
                let at = if path.is_empty() { "/".to_owned() } else { path };
                format!("at {at}: {e}")
            })
            .collect();
        if !errors.is_empty() {
            return Err(invalid(errors));
        }
    }
    if let Some(k) = &req.idempotency_key {
        if k.is_empty() || k.len() > IDEMPOTENCY_KEY_BYTES_MAX {
            return Err(invalid(vec![format!(
                "idempotency key must be 1..={IDEMPOTENCY_KEY_BYTES_MAX} bytes, got {}",
                k.len()
            )]));
        }
    }
    Ok(input)
}

/// The seed of a run that did not get one: the first 8 bytes of SHA-256("keel/seed" || id).
pub fn seed_of(run: RunId) -> u64 {
    let mut h = Sha256::new();
    h.update(b"keel/seed");
    h.update(run.as_bytes());
    let d: [u8; 32] = h.finalize().into();
    u64::from_be_bytes(d.first_chunk::<8>().copied().unwrap_or_default())
}
