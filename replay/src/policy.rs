//! `--policy KEY=VALUE` settings: change one knob of the code-level [`Policy`] to ask
//! "what would the engine decide with this policy?" (`keel replay --check`, `keel fork`).
//!
//! Keys are the field names of [`Policy`] (`max_replans`, `degrade_noncritical`,
//! `escalation_deadline_ms`, `escalation_default`) and of its `plan_limits`
//! (`plan_limits.tasks_max`, ...). Values are JSON (`0`, `false`, `null`) or, for
//! `escalation_default`, a decision name (`approve`, `reject`, `abort`, `none`).

use crate::error::ReplayError;
use keel_engine::Policy;
use serde_json::Value;

/// Applies `key=value` settings to `base`, in order.
pub fn apply_settings(base: &Policy, settings: &[String]) -> Result<Policy, ReplayError> {
    let mut policy = base.clone();
    for s in settings {
        policy = apply_setting(&policy, s)?;
    }
    Ok(policy)
}

/// The knobs `--policy` accepts, with their current values.
pub fn knobs(policy: &Policy) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    if let Ok(Value::Object(m)) = serde_json::to_value(policy) {
        for (k, v) in m {
            match v {
                Value::Object(inner) => out.extend(inner.into_iter().map(|(ik, iv)| (format!("{k}.{ik}"), iv))),
                v => out.push((k, v)),
            }
        }
    }
    out
}

fn apply_setting(base: &Policy, setting: &str) -> Result<Policy, ReplayError> {
    let bad = |reason: String| ReplayError::Policy { setting: setting.to_owned(), reason };
    let Some((key, raw)) = setting.split_once('=') else {
        return Err(bad("expected KEY=VALUE, e.g. max_replans=0".to_owned()));
    };
    let key = key.trim();
    let raw = raw.trim();
    let mut doc = serde_json::to_value(base).map_err(|e| bad(e.to_string()))?;
    let known: Vec<String> = knobs(base).into_iter().map(|(k, _)| k).collect();
    if !known.iter().any(|k| k == key) {
        return Err(bad(format!("unknown key {key:?}; known keys: {}", known.join(", "))));
    }
    let value = if key == "escalation_default" {
        match raw.to_ascii_lowercase().as_str() {
            "none" | "null" => Value::Null,
            "approve" => Value::String("Approve".into()),
            "reject" => Value::String("Reject".into()),
            "abort" => Value::String("Abort".into()),
            _ => serde_json::from_str(raw).map_err(|_| bad("expected approve, reject, abort or none".to_owned()))?,
        }
    } else if raw.eq_ignore_ascii_case("none") {
        Value::Null
    } else {
        serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()))
    };
    let mut slot = &mut doc;
    for part in key.split('.') {
        slot = slot.get_mut(part).ok_or_else(|| bad(format!("unknown key {key:?}")))?;
    }
    *slot = value;
    serde_json::from_value(doc).map_err(|e| bad(format!("value {raw:?} does not fit: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_change_one_knob_each() {
        let p = apply_settings(&Policy::default(), &["max_replans=0".into(), "degrade_noncritical=false".into()])
            .unwrap_or_default();
        assert_eq!(p.max_replans, 0);
        assert!(!p.degrade_noncritical);
        let p = apply_settings(
            &Policy::default(),
            &["escalation_default=approve".into(), "escalation_deadline_ms=5000".into()],
        )
        .unwrap_or_default();
        assert_eq!(p.escalation_default, Some(keel_engine::Decision::Approve));
        assert_eq!(p.escalation_deadline_ms, Some(5000));
        let p = apply_settings(&Policy::default(), &["plan_limits.tasks_max=3".into()]).unwrap_or_default();
        assert_eq!(p.plan_limits.tasks_max, 3);
    }

    #[test]
    fn bad_settings_are_typed_errors() {
        for s in ["max_replans", "nope=1", "max_replans=-1", "degrade_noncritical=maybe", "escalation_default=later"] {
            assert!(
                matches!(apply_settings(&Policy::default(), &[s.to_owned()]), Err(ReplayError::Policy { .. })),
                "{s}"
            );
        }
    }
}
