//! The workflow types a `keel` binary can drive, and the one-line refusal when a run
//! belongs to one it does not know.

use crate::error::CliError;
use keel_engine::{Engine, EngineBuilder, Event, Logged, Policy, RunSummary, TaskHandler, WorkflowType};
use keel_store::Store;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The workflow types (each with its planner, evaluator and task handlers) a `keel`
/// binary knows, and the code-level policy they run with.
///
/// Commands that only read or append what a human decided (`runs`, `show`, `export`,
/// `verify`, `diff`, `replay` without `--check`, `escalations`, `stats`, `resolve`) work
/// on the runs of any workflow type. Commands that call a workflow's code (`work`,
/// `replay --check`, `fork`, `demo`) need its type here, and refuse a run of a type they
/// do not know with one line that says so. A service builds its own `keel` binary with
/// its own registry and [`crate::main_with`] (docs/CLI.md).
///
/// A service's `keel` registers its own workflow type and handlers the same way; here,
/// the demo's (which is what [`Registry::demo`] does, with the demo's policy):
///
/// ```no_run
/// fn main() -> std::process::ExitCode {
///     let registry = keel_cli::Registry::new().workflow(keel_demo::workflow(), keel_demo::handlers());
///     keel_cli::main_with(registry)
/// }
/// ```
#[derive(Clone, Default)]
pub struct Registry {
    workflows: BTreeMap<String, Registered>,
    policy: Policy,
}

/// Task handlers by name.
type Handlers = BTreeMap<String, Arc<dyn TaskHandler>>;

/// One workflow type and the task handlers its plans name.
#[derive(Clone)]
struct Registered {
    workflow: WorkflowType,
    handlers: Handlers,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let workflows: BTreeMap<&String, Vec<&String>> =
            self.workflows.iter().map(|(name, r)| (name, r.handlers.keys().collect())).collect();
        f.debug_struct("Registry").field("workflows", &workflows).field("policy", &self.policy).finish()
    }
}

impl Registry {
    /// An empty registry: the binary drives no workflow, and every read-only command
    /// still works on any database.
    pub fn new() -> Self {
        Registry::default()
    }

    /// The stock `keel` binary's registry: the demo's simulated support-ticket workflow
    /// (keel-demo), which `keel demo` submits runs of, and the demo's fan-in of large
    /// outputs (`keel_demo::fan_in`, which `keel bench` and the tests record).
    pub fn demo() -> Self {
        Registry::new()
            .workflow(keel_demo::workflow(), keel_demo::handlers())
            .workflow(keel_demo::fan_in::workflow(), keel_demo::fan_in::handlers())
    }

    /// Adds a workflow type with the task handlers its plans name (by handler name).
    /// Handlers are registered with the engine by name across all workflow types, as
    /// [`EngineBuilder::handler`] does: a name given twice keeps the last handler. A
    /// workflow type given twice replaces the first.
    pub fn workflow<N: Into<String>>(
        mut self,
        workflow: WorkflowType,
        handlers: impl IntoIterator<Item = (N, Arc<dyn TaskHandler>)>,
    ) -> Self {
        let handlers = handlers.into_iter().map(|(n, h)| (n.into(), h)).collect();
        self.workflows.insert(workflow.name.clone(), Registered { workflow, handlers });
        self
    }

    /// The code-level policy the binary's engine, `replay --check` and `fork` start from
    /// (default: [`Policy::default`], what an engine runs with unless configured
    /// otherwise). Give the policy the service runs with, or a check reports the
    /// difference as a divergence.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Whether this binary can drive runs of the workflow type `name`.
    pub fn knows(&self, name: &str) -> bool {
        self.workflows.contains_key(name)
    }

    /// The names of the registered workflow types, in name order.
    pub fn workflow_names(&self) -> Vec<String> {
        self.workflows.keys().cloned().collect()
    }

    /// The policy commands start from (see [`Registry::policy`]).
    pub(crate) fn base_policy(&self) -> &Policy {
        &self.policy
    }

    /// Every registered handler name: what the engine's `decide` validates plans against.
    pub(crate) fn handler_names(&self) -> BTreeSet<String> {
        self.workflows.values().flat_map(|r| r.handlers.keys().cloned()).collect()
    }

    /// The workflow type `name` and its handlers (for a fork's live calls).
    pub(crate) fn parts(&self, name: &str) -> Option<(WorkflowType, Handlers)> {
        self.workflows.get(name).map(|r| (r.workflow.clone(), r.handlers.clone()))
    }

    /// Registers every workflow type, handler and the policy with an engine builder.
    fn register(&self, builder: EngineBuilder) -> EngineBuilder {
        let mut b = builder.policy(self.policy.clone());
        for r in self.workflows.values() {
            b = b.workflow(r.workflow.clone());
            for (name, h) in &r.handlers {
                b = b.handler(name, h.clone());
            }
        }
        b
    }

    /// An engine over `log` with this registry's workflow types and handlers. Opening
    /// one drives nothing: commands that need no handlers use it on any run.
    pub(crate) fn engine(&self, log: Arc<dyn Store>) -> Result<Engine, CliError> {
        Ok(self.register(Engine::builder().store(log)).open()?)
    }

    /// [`Registry::engine`] whose drivers hold their run leases for `lease_ttl_ms`, that
    /// writes signed head checkpoints with `key` (if given) and records size warnings at
    /// `size`'s thresholds: `keel work`, `keel serve` and `keel demo`.
    pub(crate) fn engine_signing(
        &self,
        log: Arc<dyn Store>,
        lease_ttl_ms: u64,
        key: Option<&crate::cmd::keygen::SignKey>,
        size: SizeWarningArgs,
    ) -> Result<Engine, CliError> {
        let mut b =
            Engine::builder().store(log).lease_ttl_ms(lease_ttl_ms).size_warning(size.warn_events, size.warn_bytes);
        if let Some(k) = key {
            b = b.checkpoint_signer(Arc::new(k.key.clone())).checkpoint_every_ms(k.every_ms);
        }
        Ok(self.register(b).open()?)
    }

    /// Refuses to drive anything when a run that is not finished belongs to a workflow type
    /// this binary does not know: the engine would stop at each such run with "unknown
    /// workflow type" after driving the others. Checked before any run is driven, so the
    /// database is left as it was.
    pub(crate) fn refuse_unknown_unfinished(&self, engine: &Engine) -> Result<(), CliError> {
        let strangers: Vec<RunSummary> =
            engine.runs()?.into_iter().filter(|r| !r.status.is_terminal() && !self.knows(&r.workflow)).collect();
        let names: BTreeSet<&str> = strangers.iter().map(|r| r.workflow.as_str()).collect();
        let names = names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ");
        match strangers.as_slice() {
            [] => Ok(()),
            [one] => Err(unknown(&format!("run {} is of workflow {names}", one.run), "drive it")),
            [first, ..] => {
                let kind = if names.contains(", ") { "workflows" } else { "workflow" };
                let what =
                    format!("{} unfinished runs (run {}, ...) are of {kind} {names}", strangers.len(), first.run);
                Err(unknown(&what, "drive them"))
            }
        }
    }

    /// `Ok` when the run's workflow type (read from its `RunAccepted`) is registered;
    /// otherwise the one-line refusal, saying what the user wanted `to` do ("fork it").
    /// A history that does not start with `RunAccepted` passes: the command's own
    /// reading of it names that error.
    pub(crate) fn require(&self, events: &[Logged], to: &str) -> Result<(), CliError> {
        match events.first() {
            Some(Logged { run, event: Event::RunAccepted { workflow, .. }, .. }) if !self.knows(workflow) => {
                Err(unknown(&format!("run {run} is of workflow {workflow:?}"), to))
            }
            _ => Ok(()),
        }
    }
}

/// The refusal of a command that needs a workflow's code this binary does not have:
/// `what` names the runs and their workflow type, `to` what the user wanted to do with
/// them ("drive it").
pub(crate) fn unknown(what: &str, to: &str) -> CliError {
    CliError::Failed(format!(
        "{what}, which this keel binary does not know: run the service's own keel binary \
         (keel_cli::main_with) to {to}"
    ))
}

/// The size warning's thresholds (`keel work`, `serve`, `demo`): a run whose log reaches
/// either gets one `RunSizeWarning` per threshold, shown by `keel runs` and `keel show`.
#[derive(clap::Args, Debug, Clone, Copy)]
pub(crate) struct SizeWarningArgs {
    /// Events in a run's log at which a size warning is recorded (0: never).
    #[arg(long, value_name = "N", default_value_t = keel_engine::SIZE_WARNING_EVENTS_DEFAULT)]
    pub(crate) warn_events: u64,
    /// Bytes of a run's events (as encoded, stored payloads at full size) at which a size
    /// warning is recorded (0: never).
    #[arg(long, value_name = "N", default_value_t = keel_engine::SIZE_WARNING_BYTES_DEFAULT)]
    pub(crate) warn_bytes: u64,
}
