//! Arbitrary bytes as a JSONL export file: the streaming reader and the rebuild of events
//! must give typed errors naming a line, never panic.
#![no_main]

use keel_replay::source::ExportReader;
use keel_replay::ExportLine;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.jsonl");
    for line in ExportReader::new(path, std::io::Cursor::new(data)) {
        match line {
            Ok(ExportLine::Record(rec)) => {
                let _ = rec.to_logged(path);
                let _ = keel_replay::verify::export_payload_root(&rec);
            }
            Ok(_) => {}
            Err(e) => {
                assert!(!e.to_string().is_empty());
            }
        }
    }
});
