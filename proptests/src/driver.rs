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
