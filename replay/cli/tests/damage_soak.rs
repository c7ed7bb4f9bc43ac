//! One damaged byte in sled's data file never loses committed history silently: of many
//! single-byte damages of a freshly written demo database, each is either reported by
//! `keel verify` (non-zero exit) and refused by `keel work`, or harmless (every record
//! reads back exactly as written).
//!
//! `KEEL_DB_DAMAGE_ROUNDS` damages (default 30), from seed `KEEL_SEED` (default 0x5eed,
//! printed); docs/TESTING.md has the figures of a 200-round soak.
//!
//! The same damages as bit rot leaves them (the second test): in place in a store that was
//! closed cleanly, with the data file's length, inode and modification time kept, so a
//! writable open checks each run at its first use instead of every run up front. Each is
//! either reported by `keel verify` and still reported after `keel work --until-idle` ran
//! on it (nothing re-run or written over the lost records), or harmless.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

mod common;
use common::*;
use keel_store::{EventLog, Hash32, RunId, Seq, SledStore, StoreConfig};
use std::collections::BTreeMap;
use std::path::Path;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// splitmix64: a seeded sequence, enough to pick offsets.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n.max(1)
    }
}

type Stored = BTreeMap<RunId, Vec<Hash32>>;

/// Every record's chain hash per run, read without writing to the database; `None` when
/// the database does not open, a read fails, or committed records are reported lost.
fn stored(db: &Path) -> Option<Stored> {
    let store = SledStore::open_read_only(db, StoreConfig::default()).ok()?;
    if !store.lost().is_empty() {
        return None;
    }
    let mut out = Stored::new();
    for run in store.runs().ok()? {
        let hashes: Result<Vec<Hash32>, _> = store.read(run, Seq(0)).ok()?.map(|r| r.map(|r| r.hash)).collect();
        out.insert(run, hashes.ok()?);
    }
    Some(out)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[derive(Default, Debug)]
struct Tally {
    harmless: u64,
    reported_and_refused: u64,
    silent_losses: Vec<String>,
    not_refused: Vec<String>,
    /// How `verify` reported the damage, by kind.
    reports: BTreeMap<&'static str, u64>,
    /// Bit-rot rounds whose `work` took the clean open (no evidence copy made).
    clean_opens: u64,
}

fn report_kind(stderr: &str) -> &'static str {
    if stderr.contains("committed records lost") {
        "committed records lost (manifest)"
    } else if stderr.contains("is not a keel store") {
        "sled refused its files"
    } else if stderr.contains("is damaged") {
        "keel store damaged (format record gone)"
    } else {
        "other"
    }
}

/// `keel verify` on the damaged `case`: its answer when it reports the damage; else the
/// round is tallied here (harmless when every record reads back as written, a silent loss
/// otherwise) and `None`.
fn reported(case: &Path, want: &Stored, offset: usize, mask: u8, tally: &mut Tally) -> Option<Ran> {
    let verify = keel(case, &["verify"]);
    assert!(!verify.stderr.contains("panicked"), "offset {offset}: {}", verify.stderr);
    if verify.code != 0 {
        return Some(verify);
    }
    if stored(case).as_ref() == Some(want) {
        tally.harmless += 1;
    } else {
        tally.silent_losses.push(format!("offset {offset} mask {mask:#04x}: verify exit 0, records differ"));
    }
    None
}

/// One damage: XOR one byte at `offset` with a non-zero mask, then ask `verify` and
/// (when it fails) `work`.
fn one_damage(pristine: &Path, want: &Stored, case: &Path, offset: usize, mask: u8, tally: &mut Tally) {
    copy_dir(pristine, case);
    let data = case.join("db");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[offset] ^= mask;
    std::fs::write(&data, bytes).unwrap();
    let Some(verify) = reported(case, want, offset, mask, tally) else { return };
    let work = keel(case, &["work", "--until-idle"]);
    if work.code == 0 {
        tally.not_refused.push(format!("offset {offset} mask {mask:#04x}: verify: {}", verify.stderr.trim()));
    } else {
        tally.reported_and_refused += 1;
        *tally.reports.entry(report_kind(&verify.stderr)).or_default() += 1;
    }
}

/// What a damage round does to the store copied to `case` (byte `offset` XORed with
/// `mask`), tallied.
type Round = fn(&Path, &Stored, &Path, usize, u8, &mut Tally);

/// `KEEL_DB_DAMAGE_ROUNDS` rounds of `one` over a fresh 8-run demo database, offsets and
/// masks from `KEEL_SEED` (XOR `stream`): the seed, the tally and the bytes in use.
fn soak(what: &str, stream: u64, one: Round) -> (u64, Tally, u64) {
    let rounds = env_u64("KEEL_DB_DAMAGE_ROUNDS").unwrap_or(30);
    let seed = env_u64("KEEL_SEED").unwrap_or(0x5eed);
    println!("{what}: seed {seed:#x} (KEEL_SEED), {rounds} rounds (KEEL_DB_DAMAGE_ROUNDS)");
    let demo = DemoDb::new(8);
    let want = stored(&demo.db).expect("the fresh database reads");
    let data = std::fs::read(demo.db.join("db")).unwrap();
    // Damage where sled wrote: up to the last non-zero byte (the rest of its 16 MiB file
    // is never-written space).
    let used = data.iter().rposition(|b| *b != 0).map_or(data.len(), |i| i + 1) as u64;
    let mut rng = Rng(seed ^ stream);
    let mut tally = Tally::default();
    for round in 0..rounds {
        let case = demo.dir.path().join(format!("case-{round}"));
        let offset = rng.below(used) as usize;
        let mask = 1 + rng.below(255) as u8;
        one(&demo.db, &want, &case, offset, mask, &mut tally);
        std::fs::remove_dir_all(&case).unwrap();
    }
    (seed, tally, used)
}

#[test]
fn no_single_damaged_byte_of_sleds_data_file_loses_committed_records_silently() {
    let (seed, tally, used) = soak("damage soak", 0, one_damage);
    println!(
        "damage soak: {} harmless (every record intact), {} reported by verify and refused by work, {} silent losses, {} not refused; {used} bytes in use",
        tally.harmless,
        tally.reported_and_refused,
        tally.silent_losses.len(),
        tally.not_refused.len()
    );
    println!("damage soak: verify reported {:?}", tally.reports);
    assert!(tally.silent_losses.is_empty(), "seed {seed:#x}: silent losses: {:?}", tally.silent_losses);
    assert!(tally.not_refused.is_empty(), "seed {seed:#x}: reported but not refused by work: {:?}", tally.not_refused);
}

/// One bit-rot damage: `case` holds a copy of `pristine` closed cleanly by `keel` (so its
/// manifest ends with this copy's fingerprint); the byte is changed in place and the data
/// file's modification time put back.
fn one_rot(pristine: &Path, want: &Stored, case: &Path, offset: usize, mask: u8, tally: &mut Tally) {
    use std::io::{Read, Seek, SeekFrom, Write};
    copy_dir(pristine, case);
    // A clean close of this copy (its runs are finished or parked: nothing is driven).
    let settle = keel(case, &["work", "--until-idle"]);
    assert_eq!(settle.code, 0, "{}", settle.stderr);
    let data = case.join("db");
    let before = std::fs::metadata(&data).unwrap();
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(&data).unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset as u64)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= mask;
    f.seek(SeekFrom::Start(offset as u64)).unwrap();
    f.write_all(&b).unwrap();
    f.set_modified(before.modified().unwrap()).unwrap();
    drop(f);
    let Some(verify) = reported(case, want, offset, mask, tally) else { return };
    // The writable open after a clean close checks runs as they are used: whatever
    // `work` does, the loss must still be there to report afterwards.
    let work = keel(case, &["work", "--until-idle"]);
    assert!(!work.stderr.contains("panicked"), "offset {offset}: {}", work.stderr);
    // An unclean open copies sled's files (`db` among them) to `damaged-*/` first; a
    // damaged sled snapshot set aside goes there too, alone.
    let evidence = std::fs::read_dir(case)
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("damaged-") && e.path().join("db").exists());
    tally.clean_opens += u64::from(!evidence);
    let again = keel(case, &["verify"]);
    if again.code == 0 {
        tally.not_refused.push(format!(
            "offset {offset} mask {mask:#04x}: reported, then verify passed after work (exit {}): {}",
            work.code,
            verify.stderr.trim()
        ));
    } else {
        tally.reported_and_refused += 1;
        *tally.reports.entry(report_kind(&verify.stderr)).or_default() += 1;
    }
}

#[test]
fn no_single_byte_of_bit_rot_after_a_clean_close_is_forgotten() {
    let (seed, tally, used) = soak("bit-rot soak", 0x00b1_7a07, one_rot);
    println!(
        "bit-rot soak: {} harmless (every record intact), {} reported by verify and still reported after work, {} silent losses, {} forgotten; {used} bytes in use",
        tally.harmless,
        tally.reported_and_refused,
        tally.silent_losses.len(),
        tally.not_refused.len()
    );
    println!(
        "bit-rot soak: verify reported {:?}; work opened {} of the reported stores as cleanly closed (each run checked at its first use)",
        tally.reports, tally.clean_opens
    );
    assert!(tally.silent_losses.is_empty(), "seed {seed:#x}: silent losses: {:?}", tally.silent_losses);
    assert!(tally.not_refused.is_empty(), "seed {seed:#x}: reported, then forgotten: {:?}", tally.not_refused);
    assert!(tally.reported_and_refused == 0 || tally.clean_opens > 0, "no round took the clean open: {tally:?}");
}
