//! Row format detection and prompt extraction, as TRL's `maybe_extract_prompt` /
//! `extract_prompt` / `is_conversational` do it.

use serde_json::{Map, Value};

use super::error::{DataError, RowLoc};

/// Roles a message may have.
pub const ALLOWED_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Row format, detected per row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowFormat {
    /// `{prompt, chosen, rejected}` strings.
    Explicit,
    /// `{chosen, rejected}` strings holding whole conversations.
    Implicit,
    /// Message lists (explicit prompt or a shared leading prefix).
    Conversational,
}

impl RowFormat {
    pub fn as_str(&self) -> &'static str {
        match self {
            RowFormat::Explicit => "explicit",
            RowFormat::Implicit => "implicit",
            RowFormat::Conversational => "conversational",
        }
    }
}

/// A row after prompt extraction, before any chat template.
#[derive(Debug, Clone, PartialEq)]
pub enum RawPair {
    Text {
        prompt: String,
        chosen: String,
        rejected: String,
    },
    /// Messages are validated JSON objects (`role` in [`ALLOWED_ROLES`], `content` a string);
    /// any other keys are passed to the template unchanged.
    Chat {
        prompt: Vec<Value>,
        chosen: Vec<Value>,
        rejected: Vec<Value>,
    },
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// TRL's `is_conversational` for one field: a list whose first element is an object with a
/// `role` key.
fn is_conversational(v: &Value) -> bool {
    match v {
        Value::Array(items) => {
            matches!(items.first(), Some(Value::Object(m)) if m.contains_key("role"))
        }
        _ => false,
    }
}

/// Validates a message list and returns its messages, with `content` given as a list of text
/// parts (`[{"type": "text", "text": "..."}]`) joined into one string.
fn messages(loc: &RowLoc, field: &str, v: &Value) -> Result<Vec<Value>, DataError> {
    let Value::Array(items) = v else {
        return Err(DataError::field(
            loc,
            field,
            format!("expected a list of messages, got {}", type_name(v)),
        ));
    };
    if items.is_empty() {
        return Err(DataError::field(loc, field, "is an empty list"));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let name = format!("{field}[{i}]");
        let Value::Object(obj) = m else {
            return Err(DataError::field(
                loc,
                &name,
                format!(
                    "expected a message object {{\"role\", \"content\"}}, got {}",
                    type_name(m)
                ),
            ));
        };
        out.push(check_message(loc, &name, obj)?);
    }
    Ok(out)
}

fn check_message(loc: &RowLoc, name: &str, obj: &Map<String, Value>) -> Result<Value, DataError> {
    match obj.get("role") {
        None => return Err(DataError::field(loc, &format!("{name}.role"), "missing")),
        Some(Value::String(r)) if ALLOWED_ROLES.contains(&r.as_str()) => {}
        Some(Value::String(r)) => {
            return Err(DataError::field(
                loc,
                &format!("{name}.role"),
                format!("unknown role {r:?} (allowed: {})", ALLOWED_ROLES.join(", ")),
            ))
        }
        Some(other) => {
            return Err(DataError::field(
                loc,
                &format!("{name}.role"),
                format!("expected a string, got {}", type_name(other)),
            ))
        }
    }
    let field = format!("{name}.content");
    match obj.get("content") {
        None => Err(DataError::field(loc, &field, "missing")),
        Some(Value::String(_)) => Ok(Value::Object(obj.clone())),
        Some(Value::Array(parts)) => {
            let text = text_parts(loc, &field, parts)?;
            let mut m = obj.clone();
            m.insert("content".into(), Value::String(text));
            Ok(Value::Object(m))
        }
        Some(other) => Err(DataError::field(
            loc,
            &field,
            format!(
                "expected a string or a list of text parts, got {}",
                type_name(other)
            ),
        )),
    }
}

/// Joins `[{"type": "text", "text": "..."}]` parts, as chat templates that accept lists print
/// them (one after the other).
fn text_parts(loc: &RowLoc, field: &str, parts: &[Value]) -> Result<String, DataError> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        let name = format!("{field}[{j}]");
        match part {
            Value::String(s) => text.push_str(s),
            Value::Object(p) => {
                match p.get("type").and_then(Value::as_str) {
                    None | Some("text") => {}
                    Some(t) => {
                        return Err(DataError::field(
                            loc,
                            &format!("{name}.type"),
                            format!("only text parts are supported, got type {t:?}"),
                        ))
                    }
                }
                match p.get("text") {
                    Some(Value::String(s)) => text.push_str(s),
                    Some(other) => {
                        return Err(DataError::field(
                            loc,
                            &format!("{name}.text"),
                            format!("expected a string, got {}", type_name(other)),
                        ))
                    }
                    None => return Err(DataError::field(loc, &format!("{name}.text"), "missing")),
                }
            }
            other => {
                return Err(DataError::field(
                    loc,
                    &name,
                    format!(
                        "expected a text part {{\"type\": \"text\", \"text\"}}, got {}",
                        type_name(other)
                    ),
                ))
            }
        }
    }
    Ok(text)
}

fn nonempty_string(loc: &RowLoc, field: &str, v: &Value) -> Result<String, DataError> {
    match v {
        Value::String(s) if s.is_empty() => Err(DataError::field(loc, field, "is empty")),
        Value::String(s) => Ok(s.clone()),
        other => Err(DataError::field(
            loc,
            field,
            format!("expected a string, got {}", type_name(other)),
        )),
    }
}

/// Detects the row's format and extracts the prompt where it is implicit, exactly as TRL's
/// `maybe_extract_prompt` does, validating every field on the way.
pub fn parse_row(loc: &RowLoc, row: &Value) -> Result<(RowFormat, RawPair), DataError> {
    let Value::Object(obj) = row else {
        return Err(DataError::Row {
            loc: loc.clone(),
            msg: format!(
                "expected a JSON object with `chosen` and `rejected`, got {}",
                type_name(row)
            ),
        });
    };
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let required = |k: &str| match obj.get(k) {
        None => Err(DataError::field(loc, k, "missing")),
        Some(Value::Null) => Err(DataError::field(loc, k, "is null")),
        Some(v) => Ok(v),
    };
    let chosen = required("chosen")?;
    let rejected = required("rejected")?;
    for (name, v) in [("chosen", chosen), ("rejected", rejected)] {
        if !matches!(v, Value::String(_) | Value::Array(_)) {
            return Err(DataError::field(
                loc,
                name,
                format!(
                    "expected a string or a list of messages, got {}",
                    type_name(v)
                ),
            ));
        }
    }
    let chat = matches!(chosen, Value::Array(_));
    if chat != matches!(rejected, Value::Array(_)) {
        return Err(DataError::field(
            loc,
            "rejected",
            format!(
                "is {} but `chosen` is {}; both must be strings or both message lists",
                type_name(rejected),
                type_name(chosen)
            ),
        ));
    }
    let prompt = get("prompt");
    if let Some(p) = prompt {
        if !matches!(p, Value::String(_) | Value::Array(_)) {
            return Err(DataError::field(
                loc,
                "prompt",
                format!(
                    "expected a string or a list of messages, got {}",
                    type_name(p)
                ),
            ));
        }
    }
    if chat {
        let c = messages(loc, "chosen", chosen)?;
        let r = messages(loc, "rejected", rejected)?;
        // TRL keeps the given prompt only when it is conversational like `chosen`.
        let (p, c, r) = match prompt {
            Some(p) if is_conversational(p) => (messages(loc, "prompt", p)?, c, r),
            Some(p @ Value::Array(_)) => {
                // An empty list, or a list that is not a message list, next to message lists.
                return Err(messages(loc, "prompt", p).err().unwrap_or_else(|| {
                    DataError::field(loc, "prompt", "is not a list of messages")
                }));
            }
            _ => {
                let (p, c2, r2) = extract_prompt_list(&c, &r);
                match prompt {
                    Some(Value::String(text)) if p.is_empty() => {
                        // A string prompt next to answers that do not repeat it (TRL would
                        // extract an empty prompt here): it is the user's turn.
                        let text = nonempty_string(loc, "prompt", &Value::String(text.clone()))?;
                        let user = serde_json::json!({"role": "user", "content": text});
                        (vec![user], c, r)
                    }
                    _ if p.is_empty() => {
                        return Err(DataError::field(
                            loc,
                            "chosen",
                            "`chosen` and `rejected` share no leading message, so there is no prompt",
                        ));
                    }
                    _ => (p, c2, r2),
                }
            }
        };
        check_last_prompt_role(loc, &p)?;
        for (name, answer) in [("chosen", &c), ("rejected", &r)] {
            check_answer_ends_with_assistant(loc, name, answer)?;
        }
        Ok((
            RowFormat::Conversational,
            RawPair::Chat {
                prompt: p,
                chosen: c,
                rejected: r,
            },
        ))
    } else {
        let c = nonempty_string(loc, "chosen", chosen)?;
        let r = nonempty_string(loc, "rejected", rejected)?;
        match prompt {
            Some(p @ Value::String(_)) => {
                let p = nonempty_string(loc, "prompt", p)?;
                Ok((
                    RowFormat::Explicit,
                    RawPair::Text {
                        prompt: p,
                        chosen: c,
                        rejected: r,
                    },
                ))
            }
            Some(p) if is_conversational(p) => Err(DataError::field(
                loc,
                "prompt",
                "is a message list but `chosen` and `rejected` are strings; use one format per row",
            )),
            _ => {
                let (p, c, r) = extract_prompt_str(&c, &r);
                Ok((
                    RowFormat::Implicit,
                    RawPair::Text {
                        prompt: p,
                        chosen: c,
                        rejected: r,
                    },
                ))
            }
        }
    }
}

/// The answer is what the model learns to say: its last message must be the assistant's.
fn check_answer_ends_with_assistant(
    loc: &RowLoc,
    field: &str,
    answer: &[Value],
) -> Result<(), DataError> {
    let role = answer
        .last()
        .and_then(|m| m.get("role"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if role == "assistant" {
        return Ok(());
    }
    Err(DataError::field(
        loc,
        field,
        format!(
            "the conversation must end with an assistant turn, but its last message has role {role:?}"
        ),
    ))
}

fn check_last_prompt_role(loc: &RowLoc, prompt: &[Value]) -> Result<(), DataError> {
    let role = prompt
        .last()
        .and_then(|m| m.get("role"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if matches!(role, "user" | "tool" | "assistant") {
        Ok(())
    } else {
        Err(DataError::field(
            loc,
            "prompt",
            format!(
                "the last prompt message has role {role:?}; it must be user, tool or assistant"
            ),
        ))
    }
}

/// Resolves a Python slice bound (negative counts from the end) to `0..=len`.
fn py_bound(idx: isize, len: usize) -> usize {
    if idx < 0 {
        (len as isize + idx).max(0) as usize
    } else {
        (idx as usize).min(len)
    }
}

/// TRL's `extract_prompt` loop, returning the split index (possibly negative, as in Python).
/// `space_at(i)` tells whether `chosen[i]` (Python indexing) is a single space.
fn split_index<T: PartialEq>(c: &[T], r: &[T], space_at: impl Fn(isize) -> bool) -> isize {
    let n = c.len().min(r.len());
    // Python leaves the loop variable at its last value when no mismatch is found.
    let mut idx = n as isize - 1;
    for i in 0..n {
        if c[i] != r[i] {
            idx = i as isize;
            if space_at(idx - 1) {
                idx -= 1;
            }
            break;
        }
    }
    idx
}

/// TRL's `extract_prompt` on strings, over Unicode code points like Python.
/// Both strings must be non-empty (Python raises otherwise).
pub fn extract_prompt_str(chosen: &str, rejected: &str) -> (String, String, String) {
    let c: Vec<char> = chosen.chars().collect();
    let r: Vec<char> = rejected.chars().collect();
    let idx = split_index(&c, &r, |i| {
        let len = c.len() as isize;
        let j = if i < 0 { len + i } else { i };
        j >= 0 && j < len && c[j as usize] == ' '
    });
    let ci = py_bound(idx, c.len());
    let ri = py_bound(idx, r.len());
    (
        c[..ci].iter().collect(),
        c[ci..].iter().collect(),
        r[ri..].iter().collect(),
    )
}

/// TRL's `extract_prompt` on message lists (messages compare as whole objects; the space rule
/// never applies to them).
pub fn extract_prompt_list(
    chosen: &[Value],
    rejected: &[Value],
) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let idx = split_index(chosen, rejected, |_| false);
    let ci = py_bound(idx, chosen.len());
    let ri = py_bound(idx, rejected.len());
    (
        chosen[..ci].to_vec(),
        chosen[ci..].to_vec(),
        rejected[ri..].to_vec(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::error::RowPos;
    use serde_json::json;

    fn s(p: &str, c: &str, r: &str) -> (String, String, String) {
        (p.into(), c.into(), r.into())
    }

    #[test]
    fn implicit_space_moves_into_answers() {
        assert_eq!(
            extract_prompt_str("Q: hi\n\nA: yes sure", "Q: hi\n\nA: no"),
            s("Q: hi\n\nA:", " yes sure", " no")
        );
    }

    #[test]
    fn implicit_no_space() {
        assert_eq!(extract_prompt_str("abcX", "abcY"), s("abc", "X", "Y"));
    }

    #[test]
    fn implicit_one_is_prefix_of_other() {
        // No mismatch: Python's loop variable stops at min_len - 1.
        assert_eq!(extract_prompt_str("abc", "abcdef"), s("ab", "c", "cdef"));
        assert_eq!(extract_prompt_str("abcdef", "abc"), s("ab", "cdef", "c"));
        assert_eq!(extract_prompt_str("same", "same"), s("sam", "e", "e"));
    }

    #[test]
    fn implicit_mismatch_at_start_with_trailing_space() {
        // chosen[-1] == " " at idx 0: idx becomes -1, Python slices from the end.
        assert_eq!(extract_prompt_str("x ", "yz"), s("x", " ", "z"));
        assert_eq!(extract_prompt_str("xy", "zw"), s("", "xy", "zw"));
    }

    #[test]
    fn implicit_counts_code_points() {
        assert_eq!(
            extract_prompt_str("I\u{2019}m fine", "I\u{2019}m bad"),
            s("I\u{2019}m", " fine", " bad")
        );
    }

    #[test]
    fn list_extraction() {
        let u = json!({"role": "user", "content": "hi"});
        let a = json!({"role": "assistant", "content": "a"});
        let b = json!({"role": "assistant", "content": "b"});
        let (p, c, r) = extract_prompt_list(&[u.clone(), a.clone()], &[u.clone(), b.clone()]);
        assert_eq!(p, vec![u.clone()]);
        assert_eq!(c, vec![a.clone()]);
        assert_eq!(r, vec![b]);
        // Identical lists: the last message becomes the answer.
        let (p, c, _) = extract_prompt_list(&[u.clone(), a.clone()], &[u.clone(), a.clone()]);
        assert_eq!(p, vec![u]);
        assert_eq!(c, vec![a]);
    }

    fn loc() -> RowLoc {
        RowLoc {
            file: "f.jsonl".into(),
            pos: RowPos::Line(7),
        }
    }

    #[test]
    fn detects_formats() {
        let (f, _) = parse_row(
            &loc(),
            &json!({"prompt": "p", "chosen": "c", "rejected": "r", "x": 1}),
        )
        .unwrap();
        assert_eq!(f, RowFormat::Explicit);
        let (f, _) = parse_row(&loc(), &json!({"chosen": "pc", "rejected": "pr"})).unwrap();
        assert_eq!(f, RowFormat::Implicit);
        let row = json!({
            "prompt": "ignored, as TRL does",
            "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
        });
        let (f, p) = parse_row(&loc(), &row).unwrap();
        assert_eq!(f, RowFormat::Conversational);
        let RawPair::Chat { prompt, .. } = p else {
            panic!("expected chat")
        };
        assert_eq!(prompt, vec![json!({"role": "user", "content": "q"})]);
    }

    fn err(row: Value) -> String {
        parse_row(&loc(), &row).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_line_and_field() {
        assert_eq!(
            err(json!({"chosen": "c"})),
            "f.jsonl:7: field `rejected`: missing"
        );
        assert_eq!(
            err(json!({"chosen": 3, "rejected": "r"})),
            "f.jsonl:7: field `chosen`: expected a string or a list of messages, got a number"
        );
        assert_eq!(
            err(json!({"prompt": "p", "chosen": "", "rejected": "r"})),
            "f.jsonl:7: field `chosen`: is empty"
        );
        let e = err(json!({
            "prompt": [{"role": "wizard", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        }));
        assert!(
            e.starts_with("f.jsonl:7: field `prompt[0].role`: unknown role \"wizard\""),
            "{e}"
        );
        let e = err(json!({
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        }));
        assert_eq!(e, "f.jsonl:7: field `chosen[0].content`: missing");
        let e = err(json!({
            "prompt": [{"role": "system", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        }));
        assert!(
            e.contains("field `prompt`: the last prompt message has role \"system\""),
            "{e}"
        );
        assert!(err(json!([1, 2])).starts_with("f.jsonl:7: expected a JSON object"));
        let e = err(
            json!({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}),
        );
        assert!(e.contains("share no leading message"), "{e}");
    }
}
