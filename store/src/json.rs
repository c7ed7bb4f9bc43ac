//! Bounded JSON: the one nesting limit every JSON document keel accepts must respect, its
//! typed error, and the non-recursive walks that check it.
//!
//! Why: a JSON document nested deeply enough overflows any recursive code that touches
//! it (a serializer, a validator, `Drop` of a `serde_json::Value`), and serde_json refuses
//! to parse text nested deeper than 128 levels. A value keel records must be readable back
//! by every tool, inside the envelopes that wrap it (an event's fields in an export line
//! add a few levels, a run's result one more), so the limit is [`JSON_DEPTH_MAX`] = 64,
//! well below 128, and it is checked before anything recursive touches a value:
//! [`check_depth`] walks a `Value` with an explicit stack, [`check_text_depth`] scans JSON
//! text byte by byte. A refused `Value` is taken apart with [`dismantle`] (no recursive
//! drop). The canonical writer ([`crate::digest::canonical_json`]) is iterative too, so it
//! cannot overflow whatever it is handed.

use serde_json::Value;

/// The deepest nesting of arrays and objects keel accepts in a JSON document: a scalar is
/// depth 0, `[1]` depth 1, `{"a": [1]}` depth 2.
pub const JSON_DEPTH_MAX: usize = 64;

/// A JSON document nested deeper than [`JSON_DEPTH_MAX`]. Its stable code is
/// [`JsonTooDeep::CODE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("json_too_deep: JSON nested deeper than {max} levels of arrays and objects")]
pub struct JsonTooDeep {
    /// The limit that was exceeded.
    pub max: usize,
}

impl JsonTooDeep {
    /// The stable code of this error (in recorded failures, HTTP error bodies, CLI lines).
    pub const CODE: &'static str = "json_too_deep";
}

/// Checks that `v` nests at most [`JSON_DEPTH_MAX`] levels, without recursion.
pub fn check_depth(v: &Value) -> Result<(), JsonTooDeep> {
    check_depth_max(v, JSON_DEPTH_MAX)
}

/// [`check_depth`] against another maximum (tests).
pub fn check_depth_max(v: &Value, max: usize) -> Result<(), JsonTooDeep> {
    // (value, its depth): containers are pushed with the depth of their children.
    let mut stack: Vec<(&Value, usize)> = vec![(v, 0)];
    while let Some((v, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(map) => Box::new(map.values()),
            _ => continue,
        };
        let inner = depth.saturating_add(1);
        if inner > max {
            return Err(JsonTooDeep { max });
        }
        stack.extend(children.map(|c| (c, inner)));
    }
    Ok(())
}

/// Checks that JSON text nests at most [`JSON_DEPTH_MAX`] levels, by one scan of its
/// bytes (brackets outside strings); says nothing about whether the text is valid JSON
/// (the parser that runs after it does).
pub fn check_text_depth(text: &[u8]) -> Result<(), JsonTooDeep> {
    check_text_depth_max(text, JSON_DEPTH_MAX)
}

/// [`check_text_depth`] against another maximum (tests).
pub fn check_text_depth_max(text: &[u8], max: usize) -> Result<(), JsonTooDeep> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in text {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth = depth.saturating_add(1);
                if depth > max {
                    return Err(JsonTooDeep { max });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Drops `v` without recursion: a value too deep to accept may also be too deep for
/// `Value`'s recursive `Drop`.
pub fn dismantle(v: Value) {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(items) => stack.extend(items),
            Value::Object(map) => stack.extend(map.into_iter().map(|(_, v)| v)),
            _ => {}
        }
    }
}

/// Checks `v` (see [`check_depth`]); a value that is refused is dismantled ([`dismantle`])
/// and the error returned, an accepted one handed back.
pub fn accept(v: Value) -> Result<Value, JsonTooDeep> {
    match check_depth(&v) {
        Ok(()) => Ok(v),
        Err(e) => {
            dismantle(v);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// `[[...[0]...]]` with `depth` arrays, built without recursion.
    fn nested(depth: usize) -> Value {
        let mut v = json!(0);
        for _ in 0..depth {
            v = Value::Array(vec![v]);
        }
        v
    }

    #[test]
    fn depth_counts_arrays_and_objects_and_stops_at_the_limit() {
        assert_eq!(check_depth(&json!(1)), Ok(()));
        assert_eq!(check_depth_max(&json!([1]), 1), Ok(()));
        assert_eq!(check_depth_max(&json!({"a": [1]}), 1), Err(JsonTooDeep { max: 1 }));
        assert_eq!(check_depth_max(&json!({"a": [1]}), 2), Ok(()));
        let v = nested(JSON_DEPTH_MAX);
        assert_eq!(check_depth(&v), Ok(()));
        assert_eq!(check_text_depth(&crate::digest::canonical_json(&v)), Ok(()));
        let v = accept(nested(JSON_DEPTH_MAX + 1)).err();
        assert_eq!(v, Some(JsonTooDeep { max: JSON_DEPTH_MAX }));
    }

    #[test]
    fn text_depth_ignores_brackets_inside_strings() {
        assert_eq!(check_text_depth_max(br#"["[[[\"[[", {"a{": "\\"}]"#, 2), Ok(()));
        assert_eq!(check_text_depth_max(br#"[[["x"]]]"#, 2), Err(JsonTooDeep { max: 2 }));
    }

    #[test]
    fn a_value_nested_100000_deep_is_written_checked_and_dropped_without_overflow() {
        let v = nested(100_000);
        let text = crate::digest::canonical_json(&v);
        assert_eq!(text.len(), 200_001);
        assert_eq!(check_text_depth(&text), Err(JsonTooDeep { max: JSON_DEPTH_MAX }));
        assert_eq!(accept(v).err(), Some(JsonTooDeep { max: JSON_DEPTH_MAX }));
        let mut o = json!(null);
        for i in 0..100_000 {
            let mut m = serde_json::Map::new();
            m.insert(format!("k{}", i % 3), o);
            o = Value::Object(m);
        }
        assert!(crate::digest::field_digest(&o) != [0; 32]);
        dismantle(o);
    }
}
