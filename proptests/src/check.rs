//! Invariants every run's log must satisfy, the batch/determinism check, and the
//! comparison of a log with the reference model's expectation.

use crate::gen::Scenario;
use crate::refmodel::Expect;
use keel_engine::{apply, decide, Command, Context, Event, Logged, RunState, RunStatus, TaskId, TaskStatus, Verdict};
use std::collections::{BTreeMap, BTreeSet};

/// A failed check: what and where.
pub type CheckResult = Result<(), String>;

/// Fold every prefix; returns `states[k]` = state after events `0..=k`.
pub fn fold_prefixes(log: &[Logged]) -> Result<Vec<RunState>, String> {
    let mut states: Vec<RunState> = Vec::with_capacity(log.len());
    for (k, e) in log.iter().enumerate() {
        let next = apply(states.last(), e)
            .map_err(|err| format!("event {k} ({}) refused by apply: {err}", e.event.kind_name()))?;
        states.push(next);
    }
    Ok(states)
}

/// Events equal ignoring timestamps.
pub fn same_events(a: &[Logged], b: &[Logged]) -> Option<usize> {
    let n = a.len().max(b.len());
    (0..n).find(|&i| match (a.get(i), b.get(i)) {
        (Some(x), Some(y)) => x.event != y.event || x.seq != y.seq,
        _ => true,
    })
}

/// Is `e` the answer to effect `c` (planner, handler, evaluator, sink)?
fn answers(c: &Command, e: &Event) -> bool {
    match (c, e) {
        (Command::Plan { revision }, Event::Planned { revision: r, .. })
        | (Command::Plan { revision }, Event::Replanned { revision: r, .. })
        | (Command::Plan { revision }, Event::PlanRejected { revision: r, .. }) => revision == r,
        (Command::Execute { task, attempt }, Event::TaskExecuted { task: t, attempt: a, .. })
        | (Command::Execute { task, attempt }, Event::TaskFailed { task: t, attempt: a, .. })
        | (Command::Evaluate { task, attempt }, Event::TaskEvaluated { task: t, attempt: a, .. }) => {
            task == t && attempt == a
        }
        (Command::Notify { number }, Event::EscalationNotified { number: n }) => number == n,
        _ => false,
    }
}

/// Splits a log into the batches a shell would append: every event is either one of the
/// `Record`s of `decide` on the state before its batch (a batch = those records, as a set,
/// due at the time), or the answer to one of its effects, or a human's decision while
/// the run awaits one. Fails on the first event `decide` cannot account for: the
/// determinism check. Returns the start index of every batch (plus `log.len()`).
pub fn batches(log: &[Logged], states: &[RunState], ctx: &Context) -> Result<Vec<usize>, String> {
    batches_with(log, states, ctx, false)
}

/// Effects a state has outstanding, whether or not the latest `decide` lists them (it
/// omits them when it returns a lone decision such as `BudgetExhausted`).
fn outstanding(state: &RunState) -> Vec<Command> {
    let mut out = Vec::new();
    for t in &state.tasks {
        match t.status {
            TaskStatus::Dispatched => out.push(Command::Execute { task: t.spec.id.clone(), attempt: t.attempt }),
            TaskStatus::Executed => out.push(Command::Evaluate { task: t.spec.id.clone(), attempt: t.attempt }),
            _ => {}
        }
    }
    if state.status == RunStatus::Planning && !state.planning_rejected {
        if let Some(revision) = state.planning_revision {
            out.push(Command::Plan { revision });
        }
    }
    if let Some(e) = state.escalations.last().filter(|e| !e.notified) {
        out.push(Command::Notify { number: e.escalation.number });
    }
    out
}

/// [`batches`]; with `any_driver`, an answer may also be to an effect an earlier `decide`
/// asked for that is still outstanding (several drivers of one run: one driver's answer
/// can land between another's decision and its recording).
pub fn batches_with(
    log: &[Logged],
    states: &[RunState],
    ctx: &Context,
    any_driver: bool,
) -> Result<Vec<usize>, String> {
    let mut starts = vec![0usize];
    let mut k = 1usize;
    while k < log.len() {
        let state = &states[k - 1];
        let now = log[k - 1].at_us;
        let cmds = decide(state, ctx);
        let mut records: Vec<&Event> = cmds
            .iter()
            .filter_map(|c| match c {
                Command::Record { event, .. } => Some(event),
                _ => None,
            })
            .collect();
        let e = &log[k].event;
        let start = k;
        if let Some(pos) = records.iter().position(|r| *r == e) {
            // A batch of records: the following events that are also among this call's
            // records belong to it (due ones are appended together; an undue timer fires alone).
            records.remove(pos);
            let timer = matches!(&cmds.iter().find(|c| matches!(c, Command::Record { event, .. } if event == e)), Some(Command::Record { not_before_us: Some(t), .. }) if *t > now);
            k += 1;
            if !timer {
                while k < log.len() {
                    match records.iter().position(|r| *r == &log[k].event) {
                        Some(p) => {
                            let c = cmds
                                .iter()
                                .find(|c| matches!(c, Command::Record { event, .. } if event == &log[k].event));
                            if matches!(c, Some(Command::Record { not_before_us: Some(t), .. }) if *t > now) {
                                break;
                            }
                            records.remove(p);
                            k += 1;
                        }
                        None => break,
                    }
                }
            }
        } else if cmds.iter().any(|c| answers(c, e))
            || (any_driver && outstanding(state).iter().any(|c| answers(c, e)))
            || (state.status == RunStatus::AwaitingHuman && matches!(e, Event::HumanResolved { defaulted: false, .. }))
        {
            // The answer to an effect, or a human's decision.
            k += 1;
        } else {
            return Err(format!(
                "determinism: event {k} {} is neither a record nor an answer of decide(state after {}): {:?}\n  decide returned: {:?}",
                e.kind_name(),
                k - 1,
                e,
                cmds.iter().map(cmd_brief).collect::<Vec<_>>()
            ));
        }
        starts.push(start);
    }
    starts.push(log.len());
    starts.dedup();
    Ok(starts)
}

fn cmd_brief(c: &Command) -> String {
    match c {
        Command::Record { event, not_before_us } => format!("Record({}, {:?})", event.kind_name(), not_before_us),
        other => format!("{other:?}"),
    }
}

/// The invariants of one run's log (see docs/TESTING.md for the list).
pub fn invariants(sc: &Scenario, log: &[Logged], states: &[RunState]) -> CheckResult {
    invariants_except(sc, log, states, &[])
}

/// [`invariants`], tolerating the budget checks named in `known` (a known, reported bug
/// that has its own named regression test; the rest of the battery keeps running).
pub fn invariants_except(sc: &Scenario, log: &[Logged], states: &[RunState], known: &[&str]) -> CheckResult {
    let ctx = sc.context();
    // Positions and run ids.
    let run = log.first().ok_or("empty log")?.run;
    for (i, e) in log.iter().enumerate() {
        if e.seq.0 != i as u64 || e.run != run {
            return Err(format!("event {i}: seq {} run {} (gap, dup or foreign run)", e.seq, e.run));
        }
    }
    // Nothing after a terminal event.
    if let Some(t) = states.iter().position(|s| s.status.is_terminal()) {
        if t + 1 != log.len() {
            return Err(format!("events after the terminal event {t}"));
        }
    }
    // Snapshot + tail == full fold, at every prefix (replay from a snapshot reproduces
    // every intermediate state), for every state a store can keep a snapshot of: a larger
    // one is refused (`snapshot_bytes_max`, at most `VALUE_BYTES_HARD_MAX`) and the engine
    // folds the log instead.
    let snapshot_max = keel_store::Limits::VALUE_BYTES_HARD_MAX;
    for (k, s) in states.iter().enumerate().step_by(7) {
        let snapshot = keel_engine::encode_snapshot(s).map_err(|e| format!("state {k} does not encode: {e}"))?;
        if snapshot.len() > snapshot_max {
            continue;
        }
        let bytes = snapshot.get(keel_engine::state::SNAPSHOT_MAGIC.len()..).unwrap_or_default();
        let mut back: RunState =
            keel_store::codec::decode(bytes).map_err(|e| format!("state {k} does not decode: {e}"))?;
        if back != *s {
            return Err(format!("state {k} changes through a snapshot round trip"));
        }
        for (j, e) in log.iter().enumerate().skip(k + 1) {
            back = apply(Some(&back), e).map_err(|err| format!("event {j} refused after a snapshot at {k}: {err}"))?;
        }
        if Some(&back) != states.last() {
            return Err(format!("snapshot at {k} + tail != full fold"));
        }
    }
    // No (revision, task, attempt) dispatched twice; results match dispatches.
    let mut dispatched: BTreeSet<(u32, TaskId, u32)> = BTreeSet::new();
    let mut retries_per: BTreeMap<(u32, TaskId), u32> = BTreeMap::new();
    // Acceptances of each task in its current life (since it was last installed fresh).
    let mut accepted: BTreeMap<TaskId, u32> = BTreeMap::new();
    for (k, e) in log.iter().enumerate() {
        let before = if k == 0 { None } else { Some(&states[k - 1]) };
        let rev = before.and_then(|s| s.revision).unwrap_or(0);
        match &e.event {
            Event::Planned { plan, .. } => {
                accepted = plan.tasks.iter().map(|t| (t.id.clone(), 0)).collect();
            }
            Event::Replanned { plan, carried_over, .. } => {
                let mut next = BTreeMap::new();
                for t in &plan.tasks {
                    let n = if carried_over.contains(&t.id) { accepted.get(&t.id).copied().unwrap_or(0) } else { 0 };
                    next.insert(t.id.clone(), n);
                }
                accepted = next;
            }
            Event::TaskDispatched { task, attempt, effect_key, attempt_key, .. } => {
                if !dispatched.insert((rev, task.clone(), *attempt)) {
                    return Err(format!("event {k}: task {task} attempt {attempt} of revision {rev} dispatched twice"));
                }
                let key = keel_engine::core::attempt_key(run, rev, task, *attempt);
                if *attempt_key != key {
                    return Err(format!("event {k}: attempt key of {task}#{attempt} is not the spec's"));
                }
                let planned_in = before.and_then(|s| s.task_index.get(task).map(|&i| s.tasks[i].planned_in));
                let want = planned_in.map(|p| keel_engine::core::effect_key(run, task, p));
                if want.as_ref() != Some(effect_key) {
                    return Err(format!("event {k}: effect key of {task}#{attempt} is not the spec's"));
                }
            }
            Event::RetryScheduled { task, .. } => {
                let n = retries_per.entry((rev, task.clone())).or_default();
                *n += 1;
                let max = before
                    .and_then(|s| s.task_index.get(task).map(|&i| s.tasks[i].spec.retry.max_attempts))
                    .unwrap_or(1);
                if *n > max.saturating_sub(1) {
                    return Err(format!(
                        "event {k}: task {task} retried {n} times in revision {rev}, max_attempts {max}"
                    ));
                }
            }
            Event::TaskEvaluated { task, verdict: Verdict::Pass | Verdict::Soft, .. } => {
                *accepted.entry(task.clone()).or_default() += 1;
            }
            Event::HumanResolved { .. } => {
                let after = &states[k];
                if let Some(task) = before.and_then(|s| s.escalations.last()).and_then(|x| x.escalation.task.clone()) {
                    if after.task_index.get(&task).is_some_and(|&i| after.tasks[i].status == TaskStatus::Done) {
                        *accepted.entry(task).or_default() += 1;
                    }
                }
            }
            _ => {}
        }
    }
    let last = states.last().ok_or("no state")?;
    for t in &last.tasks {
        if t.status == TaskStatus::Done {
            let n = accepted.get(&t.spec.id).copied().unwrap_or(0);
            if n != 1 {
                return Err(format!("done task {} was accepted {n} times in its final revision", t.spec.id));
            }
        }
    }
    // Budgets and bounds.
    let b = &last.budget;
    let tot = &last.totals;
    let over = |name: &str, used: u64, limit: Option<u64>| match limit {
        Some(l) if used > l && !known.contains(&name) => Err(format!("{name}: used {used} > budget {l}")),
        _ => Ok(()),
    };
    over("retries", tot.retries, b.retries)?;
    over("cost", tot.cost_micros, b.cost_micros)?;
    over("tokens", tot.tokens, b.tokens)?;
    over("llm calls", tot.llm_calls, b.llm_calls)?;
    over("tool calls", tot.tool_calls, b.tool_calls)?;
    let replan_limit = b.replans.unwrap_or(u64::from(ctx.policy.max_replans)) + last.replans_granted;
    over("replans", tot.replans, Some(replan_limit))?;
    let retries_logged = log.iter().filter(|e| matches!(e.event, Event::RetryScheduled { .. })).count() as u64;
    if retries_logged != tot.retries {
        return Err(format!("{retries_logged} RetryScheduled events but totals say {}", tot.retries));
    }
    // Terminal runs: completed runs have every task terminal unless partial.
    if last.status == RunStatus::Completed && !last.partial && last.tasks.iter().any(|t| t.status != TaskStatus::Done) {
        return Err("completed non-partial with a task not done".to_owned());
    }
    Ok(())
}

/// What the log says, in the model's terms.
pub fn observed(log: &[Logged], last: &RunState) -> Expect {
    Expect {
        status: last.status,
        kinds: log.iter().map(|e| e.event.kind_name().to_owned()).collect(),
        done: last.tasks.iter().filter(|t| t.status == TaskStatus::Done).map(|t| t.spec.id.0.clone()).collect(),
        skipped: last.tasks.iter().filter(|t| t.status == TaskStatus::Skipped).map(|t| t.spec.id.0.clone()).collect(),
        partial: last.partial,
        calls: BTreeMap::new(),
        causes: last.escalations.iter().map(|e| e.escalation.cause).collect(),
        retries: last.totals.retries,
        replans: last.totals.replans,
        cost: last.totals.cost_micros,
        tokens: last.totals.tokens,
        llm_calls: last.totals.llm_calls,
        tool_calls: last.totals.tool_calls,
    }
}

/// Compare the model's expectation with what the core did; the first difference.
pub fn compare(model: &Expect, core: &Expect, calls: &BTreeMap<(u32, String), u32>) -> CheckResult {
    if let Some(i) = (0..model.kinds.len().max(core.kinds.len())).find(|&i| model.kinds.get(i) != core.kinds.get(i)) {
        let lo = i.saturating_sub(4);
        return Err(format!(
            "event kinds diverge at {i}: model {:?} vs core {:?}\n  model ..{:?}\n  core  ..{:?}",
            model.kinds.get(i),
            core.kinds.get(i),
            &model.kinds[lo.min(model.kinds.len())..(i + 2).min(model.kinds.len())],
            &core.kinds[lo.min(core.kinds.len())..(i + 2).min(core.kinds.len())]
        ));
    }
    let pairs: [(&str, String, String); 10] = [
        ("status", format!("{:?}", model.status), format!("{:?}", core.status)),
        ("done", format!("{:?}", model.done), format!("{:?}", core.done)),
        ("skipped", format!("{:?}", model.skipped), format!("{:?}", core.skipped)),
        ("partial", format!("{:?}", model.partial), format!("{:?}", core.partial)),
        ("causes", format!("{:?}", model.causes), format!("{:?}", core.causes)),
        ("retries", model.retries.to_string(), core.retries.to_string()),
        ("replans", model.replans.to_string(), core.replans.to_string()),
        ("cost/tokens", format!("{}/{}", model.cost, model.tokens), format!("{}/{}", core.cost, core.tokens)),
        (
            "calls",
            format!("{}/{}", model.llm_calls, model.tool_calls),
            format!("{}/{}", core.llm_calls, core.tool_calls),
        ),
        ("handler calls", format!("{:?}", model.calls), format!("{calls:?}")),
    ];
    for (what, m, c) in pairs {
        if m != c {
            return Err(format!("{what}: model {m} vs core {c}"));
        }
    }
    Ok(())
}

/// Tolerate the reported keel-replay false divergence (fixed in ce2f260: no longer tolerated).
pub const KNOWN_REPLAY_BATCH_BUG: bool = false;

/// keel-replay's determinism check (`keel replay --check`) on a log, with the scenario's
/// policy and handlers.
pub fn replay_check(sc: &Scenario, log: &[Logged]) -> CheckResult {
    replay_check_with(sc, log, false)
}

/// [`replay_check`]; with `any_driver`, an outcome divergence (an answer landing where
/// `decide` did not list its effect: several drivers of one run, or an answer absorbed
/// right after a lone `BudgetExhausted`) is tolerated.
pub fn replay_check_with(sc: &Scenario, log: &[Logged], any_driver: bool) -> CheckResult {
    let ctx = sc.context();
    let opts = keel_replay::CheckOptions { policy: ctx.policy.clone(), handlers: Some(ctx.handlers.clone()) };
    let report = keel_replay::check_run(log, &opts).map_err(|e| format!("replay check: {e}"))?;
    match report.divergence {
        None => Ok(()),
        // Known, reported: keel-replay re-decides at every event instead of once per batch,
        // so a cascading skip's reason text differs inside a batch (see the regression test
        // bug_replay_check_false_divergence_inside_a_batch_of_cascading_skips). Our own
        // batch-aware check (`batches`) still covers these events.
        Some(d) if KNOWN_REPLAY_BATCH_BUG && d.kind == "TaskSkipped" => Ok(()),
        Some(d) if any_driver && d.class == keel_replay::EventClass::Outcome => Ok(()),
        Some(d) => Err(format!("replay check: divergence at seq {} ({:?} {}): {:?}", d.seq, d.class, d.kind, d)),
    }
}
