//! Large values by reference: how an event carries a digest and a size instead of a large
//! JSON value (docs/EVENTS.md, "Payload references").
//!
//! When the journal encodes an event, every JSON value in a *payload slot* (below) larger
//! than [`INLINE_JSON_BYTES_MAX`] is stored in the payload store beside the log (keel-store
//! `Payloads`, by SHA-256 of its canonical text) and the slot holds a reference instead:
//! the text `@sha256:<64 hex>:<bytes>`. Canonical JSON never starts with `@`, so a
//! reference cannot be mistaken for a value. Reading a run inflates every reference back
//! to its value before anything folds it: `apply` and `decide` always see full values, and
//! the record's chain hash covers the reference (the payload's digest covers its bytes).
//!
//! Payload slots: `RunAccepted.input`, `TaskDispatched.input` (the static input and each
//! upstream output: an output copied into several downstream inputs is stored once),
//! `TaskExecuted.output` and the supplied output of `HumanResolved`.

use crate::model::event::Event;
use crate::model::workflow::{Decision, Json};
use keel_store::PayloadRef;

/// Values whose canonical text is longer than this are stored by reference.
pub const INLINE_JSON_BYTES_MAX: usize = 4 * 1024;

/// How a reference's text begins.
pub const REF_PREFIX: &str = "@sha256:";

/// The reference text of `r`: `@sha256:<hex>:<bytes>`.
pub fn ref_json(r: &PayloadRef) -> Json {
    Json(format!("{REF_PREFIX}{}:{}", r.hex(), r.bytes))
}

/// The payload `json` refers to, if it is a reference (`None` for a value). A text that
/// starts with `@` but is not a well-formed reference is `Err` (it is not JSON either).
pub fn parse_ref(json: &Json) -> Option<Result<PayloadRef, String>> {
    let rest = json.0.strip_prefix('@')?;
    Some(parse_rest(rest).ok_or_else(|| format!("malformed payload reference {:?}", clip(&json.0))))
}

fn parse_rest(rest: &str) -> Option<PayloadRef> {
    let rest = rest.strip_prefix("sha256:")?;
    let (hex_digest, bytes) = rest.split_once(':')?;
    if hex_digest.len() != 64 || !hex_digest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut digest).ok()?;
    if bytes.is_empty() || !bytes.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(PayloadRef { digest, bytes: bytes.parse().ok()? })
}

fn clip(s: &str) -> &str {
    let mut end = s.len().min(100);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// The payload slots of `event`, in a fixed order (see the module docs).
pub fn slots_mut(event: &mut Event) -> Vec<&mut Json> {
    match event {
        Event::RunAccepted { input, .. } => vec![input],
        Event::TaskDispatched { input, .. } => {
            let mut out = vec![&mut input.input];
            out.extend(input.upstream.values_mut());
            out
        }
        Event::TaskExecuted { output, .. } => vec![output],
        Event::HumanResolved { decision: Decision::SupplyOutput(output), .. } => vec![output],
        _ => Vec::new(),
    }
}

/// The payload slots of `event`, read only.
pub fn slots(event: &Event) -> Vec<&Json> {
    match event {
        Event::RunAccepted { input, .. } => vec![input],
        Event::TaskDispatched { input, .. } => {
            let mut out = vec![&input.input];
            out.extend(input.upstream.values());
            out
        }
        Event::TaskExecuted { output, .. } => vec![output],
        Event::HumanResolved { decision: Decision::SupplyOutput(output), .. } => vec![output],
        _ => Vec::new(),
    }
}

/// Whether [`outline`] moves `json` out of its slot: larger than `inline_max`, or text
/// that begins like a reference (never canonical JSON, but `Json` is a public tuple
/// struct: stored by reference, it reads back as itself instead of being taken for one).
fn moves(json: &Json, inline_max: usize) -> bool {
    json.0.len() > inline_max || json.0.starts_with('@')
}

/// Whether any slot of `event` is one [`outline`] would move.
pub fn needs_outline(event: &Event, inline_max: usize) -> bool {
    slots(event).iter().any(|j| moves(j, inline_max))
}

/// Moves every slot of `event` larger than `inline_max` (or beginning with `@`) out through `put` (which stores
/// the bytes and returns their reference) and puts the reference in its place. Returns
/// the values moved out, by slot position, for [`restore`].
pub fn outline<E>(
    event: &mut Event,
    inline_max: usize,
    mut put: impl FnMut(&[u8]) -> Result<PayloadRef, E>,
) -> Result<Vec<(usize, Json)>, E> {
    let mut moved = Vec::new();
    for (i, slot) in slots_mut(event).into_iter().enumerate() {
        if moves(slot, inline_max) {
            let r = put(slot.0.as_bytes())?;
            moved.push((i, std::mem::replace(slot, ref_json(&r))));
        }
    }
    Ok(moved)
}

/// Puts back what [`outline`] moved out of `event`.
pub fn restore(event: &mut Event, moved: Vec<(usize, Json)>) {
    let mut slots = slots_mut(event);
    for (i, value) in moved {
        if let Some(slot) = slots.get_mut(i) {
            **slot = value;
        }
    }
}

/// Replaces every reference in `event`'s slots by its value, read through `get` (which
/// returns the checked bytes of a payload); text that is not a well-formed reference is
/// left as it is. Bytes that are not UTF-8 of the stated length are `malformed(why)`.
pub fn inflate<E>(
    event: &mut Event,
    mut get: impl FnMut(&PayloadRef) -> Result<Vec<u8>, E>,
    malformed: impl Fn(String) -> E,
) -> Result<(), E> {
    for slot in slots_mut(event) {
        // Text that is not a well-formed reference is a value as recorded (a log written
        // before references could hold a non-JSON supplied output; the chain hash, not this
        // parse, is what detects an edited record).
        let Some(Ok(r)) = parse_ref(slot) else { continue };
        let bytes = get(&r)?;
        if bytes.len() as u64 != r.bytes {
            return Err(malformed(format!(
                "payload sha256:{} has {} bytes, the reference says {}",
                r.hex(),
                bytes.len(),
                r.bytes
            )));
        }
        let text =
            String::from_utf8(bytes).map_err(|_| malformed(format!("payload sha256:{} is not UTF-8", r.hex())))?;
        *slot = Json(text);
    }
    Ok(())
}

/// The references in `event`'s slots (malformed ones are left out: reading the event
/// reports them).
pub fn refs(event: &Event) -> Vec<PayloadRef> {
    slots(event).into_iter().filter_map(|j| parse_ref(j).and_then(Result::ok)).collect()
}

/// Whether any slot of `event` holds a reference.
pub fn has_refs(event: &Event) -> bool {
    slots(event).iter().any(|j| j.0.starts_with('@'))
}
