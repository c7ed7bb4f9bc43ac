//! `cargo run --release -p keel-replay --example bench -- [--json] [--quick]`: the same as
//! `keel bench` (replay/src/bench.rs), without the CLI.
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let quick = args.iter().any(|a| a == "--quick");
    if let Err(e) = keel_replay::bench::cli(json, quick) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
