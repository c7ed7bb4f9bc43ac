//! Criterion micro-benchmarks of keel's per-event hot paths (docs/PERFORMANCE.md):
//! record encode (`prepare`: bincode + field digests), payload decode, the chain hash,
//! the payload root, `Payload::fields`, `apply`/`apply_mut` and `decide` on a realistic
//! running state, canonical JSON (`Json::new`), and a store read (decode + chain check).
//!
//! `cargo bench -p keel-engine --bench hot_paths` (add `-- --quick` for a short run).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use keel_engine::*;
use keel_store::{digest, prepare, EventLog, MemStore, Payload, Record};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;

const T0: i64 = 1_700_000_000_000_000;

fn spec(i: usize) -> TaskSpec {
    let llm = i.is_multiple_of(2);
    TaskSpec {
        id: TaskId(format!("task_{i:02}")),
        kind: if llm { TaskKind::Llm } else { TaskKind::Tool },
        handler: if llm { "draft_reply".into() } else { "lookup_order".into() },
        input: Json::new(&json!({"step": i, "instructions": "classify the ticket, look up the order, draft a reply"})),
        depends_on: if i == 0 { vec![] } else { vec![TaskId(format!("task_{:02}", i - 1))] },
        timeout_ms: 30_000,
        retry: RetryPolicy::default(),
        success_criteria: llm.then(|| "the reply answers the customer's question politely".to_owned()),
        cost_estimate_micros: 2_000,
        token_estimate: 1_500,
        critical: i.is_multiple_of(4),
        output_schema: Some(Json::new(&json!({
            "type": "object",
            "required": ["status", "detail"],
            "properties": {"status": {"type": "string"}, "detail": {"type": "string"}, "score": {"type": "number"}}
        }))),
        complexity: llm.then_some(Complexity::Reasoning),
        cacheable: !llm,
        optional_deps: vec![],
    }
}

fn output(i: usize) -> Json {
    Json::new(&json!({
        "status": "ok",
        "detail": format!("step {i}: the order #A-1042 shipped on 2024-03-02 and is held at the depot"),
        "score": 0.93,
    }))
}

/// A run of 16 tasks (a chain), the first 8 done, task 8 dispatched. Returns the log and
/// the folded state.
fn running() -> (Vec<Logged>, RunState) {
    let run = RunId::from_bytes([3; 16]);
    let mut events = vec![
        Event::RunAccepted {
            workflow: "support".into(),
            workflow_version: 1,
            input: Json::new(&json!({"ticket": 1042, "text": "Where is my order? It was due last week."})),
            idempotency_key: Some("ticket-1042".into()),
            priority: 0,
            seed: 42,
            budget: Budget { cost_micros: Some(1_000_000), tokens: Some(200_000), ..Budget::default() },
            on_exhausted: ExhaustionPolicy::Partial,
            routes: vec![(Complexity::Reasoning, "big-model".into()), (Complexity::Extraction, "small-model".into())],
            evaluator_model: Some("small-model".into()),
            max_parallel_tasks: 4,
        },
        Event::PlanRequested { revision: 0, reason: PlanReason::Initial },
        Event::Planned { revision: 0, plan: Plan { tasks: (0..16).map(spec).collect(), rationale: "chain".into() } },
    ];
    let mut upstream: Option<(TaskId, Json)> = None;
    for i in 0..9 {
        let id = TaskId(format!("task_{i:02}"));
        let mut up = BTreeMap::new();
        if let Some((t, o)) = upstream.take() {
            up.insert(t, o);
        }
        events.push(Event::TaskDispatched {
            task: id.clone(),
            attempt: 1,
            effect_key: core::effect_key(run, &id, 0),
            attempt_key: core::attempt_key(run, 0, &id, 1),
            model: (i % 2 == 0).then(|| "big-model".to_owned()),
            input: TaskInput { input: spec(i).input, upstream: up, note: None, skipped: vec![] },
            reserved: Usage { cost_micros: 2_000, tokens: 1_500 },
        });
        if i == 8 {
            break;
        }
        events.push(Event::TaskExecuted {
            task: id.clone(),
            attempt: 1,
            output: output(i),
            usage: Usage { cost_micros: 1_200, tokens: 900 },
            cached: false,
        });
        events.push(Event::TaskEvaluated {
            task: id.clone(),
            attempt: 1,
            verdict: Verdict::Pass,
            notes: "meets the criteria".into(),
            model: Some("small-model".into()),
            usage: Usage { cost_micros: 100, tokens: 80 },
        });
        upstream = Some((id, output(i)));
    }
    let logged: Vec<Logged> = events
        .into_iter()
        .enumerate()
        .map(|(i, event)| Logged { run, seq: Seq(i as u64), at_us: T0 + i as i64 * 1_000, event })
        .collect();
    let state = fold(&logged).ok().flatten().unwrap_or_else(|| panic!("the bench history does not fold"));
    (logged, state)
}

fn ctx() -> Context {
    let handlers: BTreeSet<String> = ["draft_reply", "lookup_order"].iter().map(|s| (*s).to_owned()).collect();
    Context { policy: Policy::default(), handlers }
}

fn hot_paths(c: &mut Criterion) {
    let (log, state) = running();
    let run = state.run;
    let dispatched = log.last().cloned().unwrap_or_else(|| panic!("empty log"));
    let executed = Logged {
        run,
        seq: state.next_seq,
        at_us: T0 + 100_000,
        event: Event::TaskExecuted {
            task: TaskId("task_08".into()),
            attempt: 1,
            output: output(8),
            usage: Usage { cost_micros: 1_200, tokens: 900 },
            cached: false,
        },
    };
    let mut after_exec = state.clone();
    apply_mut(&mut after_exec, &executed).unwrap_or_else(|e| panic!("{e}"));
    let ctx = ctx();

    // --- store: encode, digests, decode ---------------------------------------------
    let event = &dispatched.event;
    c.bench_function("prepare TaskDispatched (bincode + field digests)", |b| {
        b.iter(|| prepare(black_box(event), T0).unwrap_or_else(|e| panic!("{e}")))
    });
    c.bench_function("Payload::fields TaskDispatched (serde_json::to_value)", |b| b.iter(|| black_box(event).fields()));
    let fields = event.fields();
    c.bench_function("digest::payload_root_of TaskDispatched fields", |b| {
        b.iter(|| digest::payload_root_of(black_box(&fields)))
    });
    let rec = prepare(event, T0).unwrap_or_else(|e| panic!("{e}"));
    c.bench_function("digest::record_digest + chain (schema v1)", |b| {
        b.iter(|| {
            let d = digest::record_digest(1, run, Seq(11), black_box(&rec.kind), rec.time_us, &rec.payload_root);
            digest::chain(black_box(&[7u8; 32]), &d)
        })
    });
    c.bench_function("digest::payload_digest + record_digest_v2 + chain (schema v2, what read checks)", |b| {
        b.iter(|| {
            let p = digest::payload_digest(black_box(&rec.payload));
            let d = digest::record_digest_v2(run, Seq(11), black_box(&rec.kind), rec.time_us, &rec.payload_root, &p);
            digest::chain(black_box(&[7u8; 32]), &d)
        })
    });
    let record = Record {
        run,
        seq: Seq(11),
        schema_version: 1,
        kind: rec.kind.clone(),
        time_us: rec.time_us,
        payload_version: 1,
        payload: rec.payload.clone(),
        payload_root: rec.payload_root,
        prev_hash: [0; 32],
        hash: [0; 32],
    };
    c.bench_function("Record::decode::<Event> TaskDispatched (bincode)", |b| {
        b.iter(|| black_box(&record).decode::<Event>().unwrap_or_else(|e| panic!("{e}")))
    });
    let mem = MemStore::new();
    let records: Vec<_> = log.iter().map(|l| prepare(&l.event, l.at_us).unwrap_or_else(|e| panic!("{e}"))).collect();
    let n = records.len() as u64;
    mem.append(run, Seq(0), records, None).unwrap_or_else(|e| panic!("{e}"));
    c.bench_function(
        "read_logged: read + chain check (v2: payload bytes) + decode, whole run (27 events, MemStore)",
        |b| {
            b.iter(|| {
                let k = read_logged(&mem, run, Seq(0)).unwrap_or_else(|e| panic!("{e}")).count() as u64;
                assert_eq!(k, n);
            })
        },
    );

    // --- core ------------------------------------------------------------------------
    c.bench_function("apply (clone + apply_mut) TaskExecuted, 16-task state", |b| {
        b.iter(|| apply(Some(black_box(&state)), black_box(&executed)).unwrap_or_else(|e| panic!("{e}")))
    });
    c.bench_function("apply_mut TaskExecuted, 16-task state", |b| {
        b.iter_batched(
            || state.clone(),
            |mut s| {
                apply_mut(&mut s, black_box(&executed)).unwrap_or_else(|e| panic!("{e}"));
                s
            },
            BatchSize::SmallInput,
        )
    });
    c.bench_function("RunState::clone, 16-task state", |b| b.iter(|| black_box(&state).clone()));
    c.bench_function("decide, task dispatched (-> Execute)", |b| b.iter(|| decide(black_box(&state), &ctx)));
    c.bench_function("decide, task executed with output schema (gate -> TaskFailed/Evaluate)", |b| {
        b.iter(|| decide(black_box(&after_exec), &ctx))
    });
    let value = json!({
        "status": "ok",
        "detail": "the order #A-1042 shipped on 2024-03-02 and is held at the depot",
        "items": [{"sku": "X-1", "qty": 2}, {"sku": "Y-7", "qty": 1}],
        "score": 0.93,
        "customer": {"name": "Ann", "tier": "gold", "since": 2019}
    });
    c.bench_function("Json::new (canonical JSON) of a handler output", |b| b.iter(|| Json::new(black_box(&value))));
}

criterion_group!(benches, hot_paths);
criterion_main!(benches);
