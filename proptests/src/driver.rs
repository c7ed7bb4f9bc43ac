//! Running a scenario: through the simulator, with helpers shared by the tests.

use crate::check;
use crate::gen::{GenConfig, Scenario};
use crate::refmodel::Model;
use crate::script::ScenarioScript;
use keel_engine::sim::{resume, simulate};
use keel_engine::{Logged, RunId, RunState};

/// Events a generated run may record before the test gives up on it.
pub const MAX_EVENTS: usize = 2_000;

/// The run id of a seed (stable, so a failure names the same run on rerun).
pub fn run_id(seed: u64) -> RunId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&seed.to_le_bytes());
    b[8..].copy_from_slice(&(!seed).to_le_bytes());
    RunId::from_bytes(b)
}

/// A simulated run of a scenario.
pub struct SimRun {
    pub scenario: Scenario,
    pub log: Vec<Logged>,
    pub states: Vec<RunState>,
    pub calls: std::collections::BTreeMap<(u32, String), u32>,
    /// Handler calls answered more than once for the same (revision, task, attempt).
    pub double_calls: Vec<(u32, String, u32)>,
}

/// Simulate `seed`'s scenario with plans of up to `n` tasks.
pub fn simulate_seed(seed: u64, n: usize, cfg: &GenConfig) -> Result<SimRun, String> {
    let scenario = Scenario::generate(seed, n, cfg);
    let ctx = scenario.context();
    let mut script = ScenarioScript::new(&scenario);
    let log =
        simulate(run_id(seed), scenario.accepted(), &ctx, &mut script, MAX_EVENTS).map_err(|e| format!("sim: {e}"))?;
    let calls = script.calls.clone();
    let double_calls = script.attempts.iter().filter(|(_, n)| **n > 1).map(|(k, _)| k.clone()).collect();
    let states = check::fold_prefixes(&log)?;
    Ok(SimRun { scenario, log, states, calls, double_calls })
}

/// The full battery on one seed: invariants, determinism, reference model.
pub fn check_seed(seed: u64, n: usize, cfg: &GenConfig) -> Result<SimRun, String> {
    let r = simulate_seed(seed, n, cfg)?;
    let ctx = r.scenario.context();
    if !r.double_calls.is_empty() {
        return Err(format!("attempts executed twice: {:?}", r.double_calls));
    }
    check::invariants(&r.scenario, &r.log, &r.states)?;
    check::batches(&r.log, &r.states, &ctx)?;
    check::replay_check(&r.scenario, &r.log)?;
    let model = Model::new(&r.scenario, MAX_EVENTS).run();
    let core = check::observed(&r.log, r.states.last().ok_or("no state")?);
    check::compare(&model, &core, &r.calls)?;
    Ok(r)
}

/// Cut the log after every event, resume with the same answers, and compare with the
/// uninterrupted run. Returns (crash points checked, of which at batch boundaries).
pub fn crash_every_boundary(r: &SimRun) -> Result<(usize, usize), String> {
    let ctx = r.scenario.context();
    let starts = check::batches(&r.log, &r.states, &ctx)?;
    let mut points = 0;
    let mut boundaries = 0;
    for k in 1..r.log.len() {
        let mut script = ScenarioScript::new(&r.scenario);
        let resumed =
            resume(r.log[..k].to_vec(), &ctx, &mut script, MAX_EVENTS).map_err(|e| format!("resume after {k}: {e}"))?;
        points += 1;
        let boundary = starts.contains(&k);
        if boundary {
            boundaries += 1;
        }
        if boundary {
            if let Some(i) = check::same_events(&r.log, &resumed) {
                return Err(format!(
                    "crash after event {} (a batch boundary): resumed run differs at event {i}: {:?} vs {:?}",
                    k - 1,
                    r.log.get(i).map(|e| &e.event),
                    resumed.get(i).map(|e| &e.event)
                ));
            }
        } else {
            // A torn batch cannot happen (the store appends a batch atomically), but the
            // core must still cope: a legal log that ends the same way.
            let states = check::fold_prefixes(&resumed).map_err(|e| format!("torn batch after {}: {e}", k - 1))?;
            check::invariants(&r.scenario, &resumed, &states)
                .map_err(|e| format!("torn batch after {}: {e}", k - 1))?;
            let a = check::observed(&r.log, r.states.last().ok_or("no state")?);
            let b = check::observed(&resumed, states.last().ok_or("no state")?);
            if (a.status, &a.done, a.partial) != (b.status, &b.done, b.partial) {
                return Err(format!(
                    "torn batch after event {}: resumed run ends {:?} done {:?} partial {}, uninterrupted {:?} done {:?} partial {}",
                    k - 1,
                    b.status,
                    b.done,
                    b.partial,
                    a.status,
                    a.done,
                    a.partial
                ));
            }
        }
    }
    Ok((points, boundaries))
}

/// A shell-like driver of the pure core: like the engine's executor it appends the due
/// records of one `decide` call as a batch and starts every effect, but answers the
/// started effects in a random order (as concurrent handlers finish), lets the clock run
/// at a random pace and fires timers at random points: interleavings the simulator (which
/// always answers the first effect) never produces. An answer that is no longer legal is
/// dropped, as the executor does.
///
/// With `pile_up`, two answers sometimes land back to back with no `decide` in between
/// (as when two drivers of one run, or a driver and a late handler, append concurrently).
pub fn drive_shuffled(sc: &Scenario, order_seed: u64, max_events: usize, pile_up: bool) -> Result<Vec<Logged>, String> {
    use keel_engine::sim::{ask, Script};
    use keel_engine::{apply, decide, event_of, Command, Event, RunStatus};
    let ctx = sc.context();
    let mut rng = crate::rng::Rng::new(order_seed);
    let mut script = ScenarioScript::new(sc);
    let run = run_id(sc.seed);
    let mut now: i64 = 1_000_000;
    let first = Logged { run, seq: keel_engine::Seq(0), at_us: now, event: sc.accepted() };
    let mut state = apply(None, &first).map_err(|e| e.to_string())?;
    let mut log = vec![first];
    let mut started: Vec<Command> = Vec::new();
    let mut steps = 0usize;
    let mut skip_decide = false;
    let push = |state: &mut RunState, log: &mut Vec<Logged>, at: i64, event: Event| -> Result<bool, String> {
        let logged = Logged { run, seq: state.next_seq, at_us: at, event };
        match apply(Some(state), &logged) {
            Ok(s) => {
                *state = s;
                log.push(logged);
                Ok(true)
            }
            Err(e) => Err(e.to_string()),
        }
    };
    while log.len() < max_events && !state.status.is_terminal() {
        steps += 1;
        if steps > max_events * 8 {
            return Err(format!("no progress after {steps} steps"));
        }
        now += rng.range(0, 3) as i64 * 1000;
        let at = now.max(state.last_event_us);
        let cmds = if std::mem::take(&mut skip_decide) { Vec::new() } else { decide(&state, &ctx) };
        let due: Vec<Event> = cmds
            .iter()
            .filter_map(|c| match c {
                Command::Record { event, not_before_us } if not_before_us.is_none_or(|t| t <= at) => {
                    Some(event.clone())
                }
                _ => None,
            })
            .collect();
        if !due.is_empty() {
            for e in due {
                push(&mut state, &mut log, at, e).map_err(|e| format!("decide produced a refused record: {e}"))?;
            }
            continue;
        }
        for c in &cmds {
            if !matches!(c, Command::Record { .. }) && !started.contains(c) {
                started.push(c.clone());
            }
        }
        let timer = cmds
            .iter()
            .filter_map(|c| match c {
                Command::Record { not_before_us: Some(t), .. } => Some(*t),
                _ => None,
            })
            .min();
        let human = state.status == RunStatus::AwaitingHuman
            && state.escalations.last().is_some_and(|e| e.notified && e.resolution.is_none());
        let n_choices = started.len() + usize::from(timer.is_some()) + usize::from(human);
        if n_choices == 0 {
            break;
        }
        let pick = rng.below(n_choices as u64) as usize;
        if pick < started.len() {
            let effect = started.remove(pick);
            // The same answer -> event function as the engine's driver and the simulator.
            let Some(answer) = ask(&mut script, &state, &effect) else { continue };
            let Some(event) = event_of(&state, &ctx, &effect, answer) else { continue };
            // Dropped if no longer legal (the executor does the same).
            let _ = push(&mut state, &mut log, at, event);
            skip_decide = pile_up && !started.is_empty() && rng.chance(50);
        } else if timer.is_some() && pick == started.len() {
            now = now.max(timer.unwrap_or(now));
        } else {
            match script.human(&state) {
                Some((decision, by)) => {
                    let number = state.escalations.last().map(|e| e.escalation.number).unwrap_or(0);
                    push(
                        &mut state,
                        &mut log,
                        at,
                        Event::HumanResolved {
                            number,
                            decision,
                            by,
                            defaulted: false,
                            reason: "a simulated decision".into(),
                        },
                    )
                    .map_err(|e| format!("human decision refused: {e}"))?;
                }
                None => {
                    if started.is_empty() && timer.is_none() {
                        break;
                    }
                }
            }
        }
    }
    Ok(log)
}
