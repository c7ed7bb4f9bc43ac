//! Durable appends/s per durability mode and concurrency, next to raw sled with the same
//! flush pattern.
//!
//! `cargo run --release -p keel-store --example store_bench -- [--quick] [--dir PATH]
//!  [--seconds S] [--slices K] [--repeats N] [--runs 1,4,64] [--modes group-pl,...]`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use keel_store::bench::{self, BenchConfig};
use keel_store::{Durability, Level};
use std::time::Duration;

fn main() {
    let mut config = BenchConfig::full();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next().unwrap_or_else(|| {
                eprintln!("{name} needs a value");
                std::process::exit(2)
            })
        };
        match arg.as_str() {
            "--quick" => {
                let dir = config.dir.take();
                config = BenchConfig { dir, ..BenchConfig::quick() };
            }
            "--dir" => config.dir = Some(value("--dir").into()),
            "--seconds" => match value("--seconds").parse::<f64>() {
                Ok(s) if s > 0.0 => config.duration = Duration::from_secs_f64(s),
                _ => usage("--seconds takes a positive number"),
            },
            "--slices" => match value("--slices").parse::<u32>() {
                Ok(n) if n > 0 => config.slices = n,
                _ => usage("--slices takes a positive integer"),
            },
            "--repeats" => match value("--repeats").parse::<usize>() {
                Ok(n) if n > 0 => config.repeats = n,
                _ => usage("--repeats takes a positive integer"),
            },
            "--modes" => {
                let modes: Option<Vec<Durability>> = value("--modes").split(',').map(parse_mode).collect();
                match modes {
                    Some(m) if !m.is_empty() => config.modes = m,
                    _ => usage("--modes takes a list of every-pl,every-pc,group-pl,group-pc,none"),
                }
            }
            "--runs" => {
                let runs: Result<Vec<usize>, _> = value("--runs").split(',').map(str::parse).collect();
                match runs {
                    Ok(r) if !r.is_empty() && !r.contains(&0) => config.runs = r,
                    _ => usage("--runs takes a list like 1,4,64"),
                }
            }
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    eprintln!(
        "keel-store bench: {:?} per side in {} alternating slices, {} repeat(s), runs {:?}, dir {}",
        config.duration,
        config.slices,
        config.repeats,
        config.runs,
        config
            .dir
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| std::env::temp_dir().display().to_string())
    );
    let result = bench::run(&config, |row| {
        let rates =
            |s: &[bench::Sample]| s.iter().map(|x| format!("{:.0}", x.per_second())).collect::<Vec<_>>().join(" ");
        eprintln!(
            "  {:<28} runs {:>3}: keel {:>8.0}/s  raw {:>8.0}/s  {:>4.0}%   (keel [{}] raw [{}])",
            bench::mode_name(row.durability),
            row.runs,
            row.keel_per_s,
            row.raw_per_s,
            row.ratio * 100.0,
            rates(&row.keel_samples),
            rates(&row.raw_samples),
        );
    });
    match result {
        Ok(rows) => print!("{}", bench::format_table(&rows)),
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(1);
        }
    }
}

fn parse_mode(s: &str) -> Option<Durability> {
    Some(match s {
        "every-pl" => Durability::EveryAppend(Level::PowerLoss),
        "every-pc" => Durability::EveryAppend(Level::ProcessCrash),
        "group-pl" => Durability::GroupCommit(Level::PowerLoss),
        "group-pc" => Durability::GroupCommit(Level::ProcessCrash),
        "none" => Durability::None,
        _ => return None,
    })
}

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("{msg}");
    }
    eprintln!("usage: store_bench [--quick] [--dir PATH] [--seconds S] [--slices K] [--repeats N] [--runs 1,4,64] [--modes group-pl,...]");
    std::process::exit(2)
}
