//! A service embedding keel in its own tokio runtime: it registers its own workflow
//! (planner, handlers, evaluator), starts the engine's background workers, submits a few
//! requests, resolves the escalation one of them raises, prints the results and shuts
//! down.
//!
//! `cargo run -p keel-engine --example embed` runs it on a temporary database.
//! `cargo run -p keel-engine --example embed -- DIR` keeps the database in DIR and stops
//! with the large invoice still waiting for a person, as a service would between a
//! deploy and an approval: `keel --db DIR escalations`, `show`, `export` and `resolve`
//! work on it, and `keel --db DIR work` says in one line that only this service (its
//! handlers) can drive the run on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use keel_engine::*;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Plans: extract the invoice fields, look up the vendor, then approve the payment.
struct InvoicePlanner;

impl Planner for InvoicePlanner {
    fn plan(&self, _req: PlanRequest) -> BoxFuture<Result<Plan, HandlerError>> {
        let task = |id: &str, kind: TaskKind, deps: &[&str]| {
            let mut t = TaskSpec::new(id, kind, id).with_deps(deps);
            t.timeout_ms = 2_000;
            t
        };
        let mut extract = task("extract_fields", TaskKind::Llm, &[]);
        extract.complexity = Some(Complexity::Extraction);
        extract.cost_estimate_micros = 3_000;
        extract.output_schema = Some(Json::new(&json!({"type": "object", "required": ["amount_cents", "vendor"]})));
        let vendor = task("lookup_vendor", TaskKind::DataFetch, &["extract_fields"]);
        let mut approve = task("approve_payment", TaskKind::Tool, &["extract_fields", "lookup_vendor"]);
        approve.success_criteria = Some("payments above 5000.00 need a person".to_owned());
        let plan =
            Plan { tasks: vec![extract, vendor, approve], rationale: "extract, check the vendor, approve".into() };
        Box::pin(async move { Ok(plan) })
    }
}

/// One handler per task, as closures over the task call.
struct Handler(fn(&TaskCall) -> Result<TaskOutput, HandlerError>);

impl TaskHandler for Handler {
    fn call(&self, call: TaskCall) -> BoxFuture<Result<TaskOutput, HandlerError>> {
        let out = (self.0)(&call);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(5)).await; // pretend to work
            out
        })
    }
}

fn invoice(call: &TaskCall) -> Value {
    call.run_input.value().unwrap_or(Value::Null)
}

fn extract_fields(call: &TaskCall) -> Result<TaskOutput, HandlerError> {
    let inv = invoice(call);
    Ok(TaskOutput {
        output: json!({ "amount_cents": inv["amount_cents"], "vendor": inv["vendor"], "model": call.model }),
        usage: Usage { cost_micros: 2_100, tokens: 640 },
    })
}

fn lookup_vendor(call: &TaskCall) -> Result<TaskOutput, HandlerError> {
    let vendor = invoice(call)["vendor"].as_str().unwrap_or("").to_owned();
    Ok(TaskOutput { output: json!({ "vendor": vendor, "known": true }), usage: Usage::default() })
}

fn approve_payment(call: &TaskCall) -> Result<TaskOutput, HandlerError> {
    // A real handler would dedupe its side effect on call.effect_key (the same across
    // retries; call.attempt_key changes on every attempt).
    let amount = invoice(call)["amount_cents"].as_u64().unwrap_or(0);
    Ok(TaskOutput { output: json!({ "approved_cents": amount, "key": call.effect_key }), usage: Usage::default() })
}

struct LimitEvaluator;

impl Evaluator for LimitEvaluator {
    fn evaluate(&self, req: EvalRequest) -> BoxFuture<Result<Evaluation, HandlerError>> {
        let amount = req.output.value().ok().and_then(|v| v["approved_cents"].as_u64()).unwrap_or(0);
        let verdict = if amount > 500_000 { Verdict::Critical } else { Verdict::Pass };
        Box::pin(async move {
            Ok(Evaluation { verdict, notes: format!("{amount} cents"), usage: Usage { cost_micros: 150, tokens: 60 } })
        })
    }
}

/// Where escalations go in a real service: a queue, a chat message, a ticket.
struct PrintSink;

impl EscalationSink for PrintSink {
    fn notify(&self, ctx: EscalationContext) -> BoxFuture<Result<(), String>> {
        // `ctx.resolver` resolves this escalation later (e.g. from a chat button).
        let e = &ctx.escalation;
        println!("needs a human: run {} ({}): {} (options: {})", ctx.run, ctx.workflow, e.why, e.options.join(", "));
        Box::pin(async { Ok(()) })
    }
}

/// Waits (no polling) until each run has finished or waits for a person.
async fn wait_until_settled(engine: &Engine, runs: &[RunId]) -> Result<(), EngineError> {
    for run in runs {
        engine.wait_until(*run, |s| s.is_terminal() || s == RunStatus::AwaitingHuman).await?;
    }
    Ok(())
}

/// One of the engine's blocking reads (`runs`, `escalations`, `stats`: they read the
/// store) on tokio's blocking pool, off the runtime's workers.
async fn blocking<T: Send + 'static>(
    engine: &Engine,
    read: impl FnOnce(&Engine) -> Result<T, EngineError> + Send + 'static,
) -> Result<T, Box<dyn std::error::Error>> {
    let engine = engine.clone();
    Ok(tokio::task::spawn_blocking(move || read(&engine)).await??)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The service's own runtime.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let keep: Option<std::path::PathBuf> = std::env::args_os().nth(1).map(Into::into);
        let tmp = tempfile::tempdir()?;
        let db = keep.clone().unwrap_or_else(|| tmp.path().join("keel-db"));
        let mut wf = WorkflowType::new("invoice_review", Arc::new(InvoicePlanner), Arc::new(LimitEvaluator));
        wf.input_schema = Some(json!({
            "type": "object",
            "required": ["vendor", "amount_cents"],
            "properties": { "vendor": {"type": "string"}, "amount_cents": {"type": "integer", "minimum": 0} }
        }));
        wf.routes = vec![(Complexity::Extraction, "small-model".into())];
        wf.evaluator_model = Some("tiny-model".into());
        wf.budget = Budget { cost_micros: Some(20_000), ..Budget::default() };
        let engine = Engine::builder()
            .path(&db)
            .workflow(wf)
            .handler("extract_fields", Arc::new(Handler(extract_fields)))
            .handler("lookup_vendor", Arc::new(Handler(lookup_vendor)))
            .handler("approve_payment", Arc::new(Handler(approve_payment)))
            .escalation_sink(Arc::new(PrintSink))
            .open()?;
        let workers = engine.start();

        let mut submitted = Vec::new();
        for (vendor, cents, key) in
            [("Acme", 120_000, "inv-1"), ("Globex", 990_000, "inv-2"), ("Initech", 45_000, "inv-3")]
        {
            let mut req = Request::new("invoice_review", json!({ "vendor": vendor, "amount_cents": cents }));
            req.idempotency_key = Some(key.into());
            let s = engine.submit(req).await?;
            println!("submitted {key}: run {}", s.run);
            submitted.push(s.run);
        }
        // A webhook delivered twice: the same run comes back.
        let again = engine
            .submit(Request {
                idempotency_key: Some("inv-1".into()),
                ..Request::new("invoice_review", json!({"vendor": "Acme", "amount_cents": 120_000}))
            })
            .await?;
        println!("duplicate delivery of inv-1 -> run {} (duplicate: {})", again.run, again.duplicate);
        // A malformed request is refused with nothing written.
        if let Err(e) = engine.submit(Request::new("invoice_review", json!({"vendor": 7}))).await {
            println!("refused: {e}");
        }

        wait_until_settled(&engine, &submitted).await?;
        if keep.is_some() {
            for p in blocking(&engine, |e| e.escalations()).await? {
                println!(
                    "run {} waits for a person: keel --db {} resolve {} --decision approve --by you",
                    p.run,
                    db.display(),
                    p.run
                );
            }
            workers.shutdown().await;
            return Ok(());
        }
        for p in blocking(&engine, |e| e.escalations()).await? {
            println!("resolving escalation {} of run {}: approve", p.escalation.number, p.run);
            engine
                .resolve(
                    p.run,
                    Resolution {
                        decision: Decision::Approve,
                        by: "finance@example.com".into(),
                        reason: "refund within policy".into(),
                    },
                )
                .await?;
        }
        wait_until_settled(&engine, &submitted).await?;
        let runs = blocking(&engine, |e| e.runs()).await?;
        println!("\n{:<36}  {:<10}  {:>8}  {:>6}", "run", "status", "cost", "events");
        for r in &runs {
            println!("{:<36}  {:<10}  {:>8}  {:>6}", r.run.to_string(), r.status.name(), r.cost_micros, r.events);
        }
        for s in blocking(&engine, |e| e.stats()).await? {
            println!(
                "{}: {} runs, cost per run {} micros, {} LLM calls",
                s.workflow, s.runs, s.cost_per_run_micros, s.totals.llm_calls
            );
        }
        let report = workers.shutdown().await;
        println!("workers stopped after {} drives", report.driven);
        Ok::<(), Box<dyn std::error::Error>>(())
    })
}
