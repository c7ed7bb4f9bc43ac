//! `cargo run --release -p keel-bench --example bench -- [--json] [--quick] [--only SECTION,..]
//! [--runs N,..] [--levels power-loss,process-crash] [--keep] [--snapshot-every N]
//! [--memory-runs N] [--pg-runs N] [--pg-processes N,..]`: `keel bench` (replay/bench/src/lib.rs)
//! with the knobs used while profiling.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let quick = args.iter().any(|a| a == "--quick");
    let mut opts = keel_bench::BenchOptions::new(quick);
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    opts.keep = args.iter().any(|a| a == "--keep");
    opts.snapshot_every = value("--snapshot-every").and_then(|v| v.parse().ok());
    opts.memory_runs = value("--memory-runs").and_then(|v| v.parse().ok());
    opts.pg_runs = value("--pg-runs").and_then(|v| v.parse().ok());
    if let Some(v) = value("--pg-processes") {
        opts.pg_processes = v.split(',').filter_map(|n| n.parse().ok()).filter(|n| *n > 0).collect();
    }
    if let Some(v) = value("--only") {
        opts.only = v.split(',').map(str::to_owned).collect();
    }
    if let Some(v) = value("--runs") {
        opts.concurrency = v.split(',').filter_map(|n| n.parse().ok()).collect();
    }
    if let Some(v) = value("--levels") {
        opts.levels = v
            .split(',')
            .map(|l| if l == "process-crash" { keel_store::Level::ProcessCrash } else { keel_store::Level::PowerLoss })
            .collect();
    }
    if let Err(e) = keel_bench::cli_with(json, opts) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
