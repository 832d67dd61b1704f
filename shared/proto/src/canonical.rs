//! Canonical JSON: the one byte string a JSON value signs as, whoever
//! encodes it. Objects have their keys sorted by their UTF-8 bytes, there is
//! no whitespace, strings escape only `"` and `\`, and numbers are integers.
//! That is the form TUF's reference implementation (securesystemslib's
//! `encode_canonical`) produces for the same value; values it would encode
//! differently (floats, control characters in strings) are refused.

use serde_json::Value;

/// A value with no canonical form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    /// Canonical JSON has no floating-point numbers.
    #[error("canonical JSON has no floating-point numbers (got {0})")]
    Float(String),
    /// A string holds a control character (U+0000 to U+001F).
    #[error("canonical JSON strings have no control characters (in {0:?})")]
    ControlCharacter(String),
}

/// The canonical encoding of `value`.
pub fn canonical_json(value: &Value) -> Result<Vec<u8>, CanonicalError> {
    let mut out = Vec::with_capacity(256);
    write(value, &mut out)?;
    Ok(out)
}

fn write(value: &Value, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) if n.is_i64() || n.is_u64() => out.extend_from_slice(n.to_string().as_bytes()),
        Value::Number(n) => return Err(CanonicalError::Float(n.to_string())),
        Value::String(s) => string(s, out)?,
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                string(k, out)?;
                out.push(b':');
                write(v, out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn string(s: &str, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    if s.chars().any(|c| c < ' ') {
        return Err(CanonicalError::ControlCharacter(s.to_owned()));
    }
    out.push(b'"');
    for b in s.bytes() {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_sorted_no_whitespace_minimal_escapes() {
        let v = json!({ "b": [1, -2, true, null], "a": { "z": "x\"y\\", "é": "ü" }, "B": 18446744073709551615u64 });
        let got = String::from_utf8(canonical_json(&v).unwrap()).unwrap();
        assert_eq!(got, r#"{"B":18446744073709551615,"a":{"z":"x\"y\\","é":"ü"},"b":[1,-2,true,null]}"#);
        // It is JSON, and decodes to the same value.
        assert_eq!(serde_json::from_str::<Value>(&got).unwrap(), v);
    }

    #[test]
    fn floats_and_control_characters_are_refused() {
        assert_eq!(canonical_json(&json!({ "x": 1.5 })), Err(CanonicalError::Float("1.5".into())));
        assert!(matches!(canonical_json(&json!(["a\nb"])), Err(CanonicalError::ControlCharacter(_))));
    }
}
