//! Chat templates: rendering as Hugging Face transformers does (Jinja with trim_blocks and
//! lstrip_blocks, `raise_exception`, `strftime_now`, Python-style `tojson`), and TRL's
//! `maybe_apply_chat_template` for preference pairs.

use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr};
use minijinja::{Environment, Error, ErrorKind};
use serde_json::Value;

const NAME: &str = "chat_template";

/// The template with transformers' `{% generation %}` ... `{% endgeneration %}` blocks (which
/// mark assistant tokens for `return_assistant_tokens_mask` and render their body unchanged)
/// as `{% if true %}` ... `{% endif %}`, which minijinja knows, whitespace control kept.
fn without_generation_tags(source: &str) -> String {
    let tag = |name: &str| {
        fancy_regex::Regex::new(&format!(r"\{{%([-+]?)\s*{name}\s*([-+]?)%\}}"))
            .expect("a valid pattern")
    };
    let open = tag("generation").replace_all(source, "{%${1} if true ${2}%}");
    tag("endgeneration")
        .replace_all(&open, "{%${1} endif ${2}%}")
        .into_owned()
}

/// What transformers appends to a final message it continues, to find where it ends.
const CONTINUE_TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";

/// Python's `str.isspace`, which `strip()` and Jinja's `trim` use: Unicode's White_Space (as
/// Rust's `trim`) and the separators U+001C to U+001F.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn py_strip(s: &str) -> &str {
    s.trim_matches(py_space)
}

/// Which ends Python's `strip` (both), `lstrip` (start) or `rstrip` (end) takes from.
#[derive(Clone, Copy)]
enum Ends {
    Both,
    Start,
    End,
}

/// `s.strip(chars)` / `lstrip` / `rstrip` as Python computes it.
fn py_trim(s: &str, chars: Option<&str>, ends: Ends) -> String {
    let set: Option<Vec<char>> = chars.map(|c| c.chars().collect());
    let strip = |c: char| match &set {
        Some(set) => set.contains(&c),
        None => py_space(c),
    };
    match ends {
        Ends::Both => s.trim_matches(strip),
        Ends::Start => s.trim_start_matches(strip),
        Ends::End => s.trim_end_matches(strip),
    }
    .to_string()
}

/// Jinja's `trim` filter (Python's `str.strip`).
fn trim(value: String, chars: Option<String>) -> String {
    py_trim(&value, chars.as_deref(), Ends::Both)
}

/// Python's string methods (minijinja's pycompat), with `strip`, `lstrip` and `rstrip` on
/// Python's whitespace.
fn py_method(
    state: &minijinja::State,
    value: &minijinja::Value,
    method: &str,
    args: &[minijinja::Value],
) -> Result<minijinja::Value, Error> {
    let ends = match method {
        "strip" => Some(Ends::Both),
        "lstrip" => Some(Ends::Start),
        "rstrip" => Some(Ends::End),
        _ => None,
    };
    if let (Some(s), Some(ends)) = (value.as_str(), ends) {
        let (chars,): (Option<&str>,) = minijinja::value::from_args(args)?;
        return Ok(minijinja::Value::from(py_trim(s, chars, ends)));
    }
    if let (Some(s), "split") = (value.as_str(), method) {
        let (sep, maxsplit): (Option<minijinja::Value>, Option<i64>) =
            minijinja::value::from_args(args)?;
        if sep.as_ref().is_none_or(|v| v.is_none() || v.is_undefined()) {
            return Ok(minijinja::Value::from(py_split_whitespace(s, maxsplit)));
        }
    }
    if let (Some(s), "splitlines") = (value.as_str(), method) {
        let (keepends,): (Option<bool>,) = minijinja::value::from_args(args)?;
        return Ok(minijinja::Value::from(py_splitlines(
            s,
            keepends.unwrap_or(false),
        )));
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Python's `s.split()` / `s.split(None, maxsplit)`: runs of Python whitespace separate, none
/// at either end; past `maxsplit` splits the rest stays whole (its leading whitespace gone).
fn py_split_whitespace(s: &str, maxsplit: Option<i64>) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s.trim_start_matches(py_space);
    while !rest.is_empty() {
        if maxsplit.is_some_and(|m| m >= 0 && out.len() as i64 == m) {
            out.push(rest.to_string());
            break;
        }
        let end = rest.find(py_space).unwrap_or(rest.len());
        out.push(rest[..end].to_string());
        rest = rest[end..].trim_start_matches(py_space);
    }
    out
}

/// Python's `s.splitlines(keepends)`: lines end at `\n`, `\r`, `\r\n`, `\v`, `\f`,
/// U+001C-U+001E, U+0085, U+2028 and U+2029.
fn py_splitlines(s: &str, keepends: bool) -> Vec<String> {
    let breaks = |c: char| {
        matches!(
            c,
            '\n' | '\r' | '\u{b}' | '\u{c}' | '\u{1c}'
                ..='\u{1e}' | '\u{85}' | '\u{2028}' | '\u{2029}'
        )
    };
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(at) = rest.find(breaks) {
        let width = match rest[at..].starts_with("\r\n") {
            true => 2,
            false => rest[at..].chars().next().map_or(1, char::len_utf8),
        };
        let end = if keepends { at + width } else { at };
        out.push(rest[..end].to_string());
        rest = &rest[at + width..];
    }
    if !rest.is_empty() {
        out.push(rest.to_string());
    }
    out
}

/// A compiled chat template plus the special-token strings it is rendered with.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    env: Environment<'static>,
    /// (variable name, token string), e.g. (`"bos_token"`, `"<s>"`).
    special: Vec<(String, String)>,
}

/// Texts of a pair after templating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplatedPair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

/// A render failure: which part of the pair, and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderError {
    pub field: &'static str,
    pub msg: String,
}

impl ChatTemplate {
    /// Compiles `source`; `special` gives the token variables (bos_token, eos_token, ...).
    pub fn new(source: &str, special: Vec<(String, String)>) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(py_method);
        env.add_filter("trim", trim);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, without_generation_tags(source))
            .map_err(|e| describe(&e))?;
        Ok(ChatTemplate {
            source: source.to_string(),
            env,
            special,
        })
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` like transformers' `apply_chat_template(tokenize=False)`.
    pub fn render(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        continue_final_message: bool,
    ) -> Result<String, String> {
        let tmpl = self.env.get_template(NAME).map_err(|e| describe(&e))?;
        // transformers' continue_final_message: the final message is rendered with a tag after
        // it, and the chat cut where the tag begins.
        let mut messages = messages.to_vec();
        let mut final_message = String::new();
        if continue_final_message {
            let content = messages
                .last_mut()
                .and_then(|m| m.get_mut("content"))
                .ok_or("continue_final_message: the final message has no content")?;
            final_message = content.as_str().unwrap_or_default().to_string();
            *content = Value::String(format!("{final_message}{CONTINUE_TAG}"));
        }
        let mut ctx = serde_json::Map::new();
        ctx.insert("messages".into(), Value::Array(messages));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        ctx.insert("tools".into(), Value::Null);
        ctx.insert("documents".into(), Value::Null);
        for (k, v) in &self.special {
            ctx.insert(k.clone(), Value::String(v.clone()));
        }
        let rendered = tmpl
            .render(to_jinja(&Value::Object(ctx)))
            .map_err(|e| describe(&e))?;
        if !continue_final_message {
            return Ok(rendered);
        }
        let tag = CONTINUE_TAG.trim_end();
        let (Some(loc), true) = (
            rendered.rfind(tag),
            rendered.contains(py_strip(&final_message)),
        ) else {
            return Err(
                "continue_final_message: the final message does not appear in the rendered chat"
                    .into(),
            );
        };
        Ok(match rendered[loc..].starts_with(CONTINUE_TAG) {
            // The template kept the message's spacing.
            true => rendered[..loc].to_string(),
            // It trimmed the message: so is what comes before the tag.
            false => rendered[..loc].trim_end_matches(py_space).to_string(),
        })
    }

    /// TRL 1.16's `apply_chat_template` for a preference example with an explicit prompt.
    pub fn apply_to_pair(
        &self,
        prompt: &[Value],
        chosen: &[Value],
        rejected: &[Value],
    ) -> Result<TemplatedPair, RenderError> {
        let last_role = prompt
            .last()
            .and_then(|m| m.get("role"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let (gen, cont) = match last_role {
            "user" | "tool" => (true, false),
            "assistant" => (false, true),
            other => {
                return Err(RenderError {
                    field: "prompt",
                    msg: format!("invalid role in the last prompt message: {other:?}"),
                })
            }
        };
        let err = |field: &'static str| move |msg: String| RenderError { field, msg };
        let p = self.render(prompt, gen, cont).map_err(err("prompt"))?;
        let pc: Vec<Value> = prompt.iter().chain(chosen).cloned().collect();
        let prompt_chosen = self.render(&pc, false, false).map_err(err("chosen"))?;
        let p = common_prefix(&p, &prompt_chosen);
        let chosen_text = prompt_chosen[p.len()..].to_string();
        let pr: Vec<Value> = prompt.iter().chain(rejected).cloned().collect();
        let prompt_rejected = self.render(&pr, false, false).map_err(err("rejected"))?;
        let p = common_prefix(p, &prompt_rejected);
        let rejected_text = prompt_rejected[p.len()..].to_string();
        Ok(TemplatedPair {
            prompt: p.to_string(),
            chosen: chosen_text,
            rejected: rejected_text,
        })
    }
}

/// A JSON object as a Jinja map that keeps its key order (Python dicts do; minijinja's own
/// maps sort their keys), so `items()` and `tojson` see keys as written.
#[derive(Debug)]
struct OrderedMap(serde_json::Map<String, Value>);

impl Object for OrderedMap {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &minijinja::Value) -> Option<minijinja::Value> {
        key.as_str().and_then(|k| self.0.get(k)).map(to_jinja)
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(
            self.0
                .keys()
                .map(|k| minijinja::Value::from(k.as_str()))
                .collect(),
        )
    }
}

fn to_jinja(v: &Value) -> minijinja::Value {
    match v {
        Value::Object(m) => minijinja::Value::from_object(OrderedMap(m.clone())),
        Value::Array(items) => {
            minijinja::Value::from(items.iter().map(to_jinja).collect::<Vec<_>>())
        }
        other => minijinja::Value::from_serialize(other),
    }
}

/// Longest common prefix of `a` and `b`, compared character by character (a prefix of `a`).
fn common_prefix<'a>(a: &'a str, b: &str) -> &'a str {
    let end = a
        .char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| {
            // All compared characters equal: the shorter string's length, measured in `a`.
            let n = b.chars().count();
            a.char_indices().nth(n).map(|(i, _)| i).unwrap_or(a.len())
        });
    &a[..end]
}

fn describe(e: &Error) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(d)) => match e.line() {
            Some(l) => format!("{d} (template line {l})"),
            None => d.to_string(),
        },
        _ => e.to_string(),
    }
}

fn raise_exception(msg: String) -> Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=..., sort_keys=...)`.
fn tojson(value: minijinja::Value, kwargs: Kwargs) -> Result<minijinja::Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<minijinja::Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    py_dump(&json, indent, sort_keys.unwrap_or(false), 0, &mut out);
    Ok(minijinja::Value::from_safe_string(out))
}

fn py_dump(v: &Value, indent: Option<usize>, sort: bool, depth: usize, out: &mut String) {
    let newline = |out: &mut String, d: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * d));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => py_string(s, out),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                py_dump(item, indent, sort, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if sort {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                py_string(k, out);
                out.push_str(": ");
                py_dump(item, indent, sort, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

fn py_string(s: &str, out: &mut String) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `strftime_now(format)`: the current UTC time formatted with the common strftime codes.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(secs, &format)
}

fn strftime(secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86400);
    let tod = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let (hh, mm, ss) = (tod / 3600, tod % 3600 / 60, tod % 60);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('-') => match chars.next() {
                Some('d') => out.push_str(&d.to_string()),
                Some('m') => out.push_str(&m.to_string()),
                Some(o) => {
                    out.push_str("%-");
                    out.push(o);
                }
                None => out.push_str("%-"),
            },
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chatml() -> ChatTemplate {
        let src = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        ChatTemplate::new(src, vec![]).unwrap()
    }

    #[test]
    fn pair_split() {
        let t = chatml();
        let p = t
            .apply_to_pair(
                &[json!({"role": "user", "content": "hi"})],
                &[json!({"role": "assistant", "content": "a"})],
                &[json!({"role": "assistant", "content": "b"})],
            )
            .unwrap();
        assert_eq!(
            p.prompt,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(p.chosen, "a<|im_end|>\n");
        assert_eq!(p.rejected, "b<|im_end|>\n");
    }

    #[test]
    fn continue_final_message() {
        let t = chatml();
        let out = t
            .render(
                &[
                    json!({"role": "user", "content": "hi"}),
                    json!({"role": "assistant", "content": "The answer is "}),
                ],
                false,
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nThe answer is "
        );
    }

    /// transformers 5.25's `continue_final_message` (its tag), rendered by transformers'
    /// `render_jinja_template` for the expected texts: a final message that also occurs in the
    /// end-of-turn marker ("end" in `<|im_end|>`), surrounded by spaces, or empty, under a
    /// template that keeps spacing and one that trims it.
    #[test]
    fn continue_final_message_as_transformers_cuts_it() {
        let trimmed = ChatTemplate::new(
            "{% for message in messages %}{{ '<|start|>' + message['role'] + '\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}",
            vec![],
        )
        .unwrap();
        let render = |t: &ChatTemplate, last: &str| {
            t.render(
                &[
                    json!({"role": "user", "content": "hi"}),
                    json!({"role": "assistant", "content": last}),
                ],
                false,
                true,
            )
            .unwrap()
        };
        let chatml_head = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";
        for last in ["end", " x ", "", "\u{1c}Hi\u{1c}"] {
            assert_eq!(render(&chatml(), last), format!("{chatml_head}{last}"));
        }
        let head = "<|start|>user\nhi<|eot_id|><|start|>assistant";
        let want = [
            ("The answer is ", "\nThe answer is"),
            ("end", "\nend"),
            ("id", "\nid"),
            (" x ", "\nx"),
            ("", ""),
            ("\u{1c}Hi\u{1c}", "\nHi"),
        ];
        for (last, tail) in want {
            assert_eq!(render(&trimmed, last), format!("{head}{tail}"), "{last:?}");
        }
    }

    /// `trim` and `strip()` strip Python's whitespace, which includes U+001C to U+001F.
    #[test]
    fn trim_and_strip_are_pythons() {
        let t = ChatTemplate::new(
            "{% for message in messages %}{{ '[' + message['content'] | trim + '|' + message['content'].strip() + '|' + message['content'].rstrip() + '|' + message['content'].lstrip() + '|' + message['content'].strip('ab') + ']' }}{% endfor %}",
            vec![],
        )
        .unwrap();
        let out = t
            .render(&[json!({"content": " a\tb\u{1f}"})], false, false)
            .unwrap();
        assert_eq!(out, "[a\tb|a\tb| a\tb|a\tb\u{1f}| a\tb\u{1f}]");
    }

    /// `split()` and `splitlines()` as Python's (expected values from Python 3).
    #[test]
    fn split_and_splitlines_are_pythons() {
        let t = ChatTemplate::new(
            "{% for message in messages %}{% set c = message['content'] %}{{ c.split() | tojson }}{{ c.split(none, 1) | tojson }}{{ c.split(',') | tojson }}{{ c.splitlines() | tojson }}{{ c.splitlines(true) | tojson }}{% endfor %}",
            vec![],
        )
        .unwrap();
        let out = t
            .render(
                &[json!({"content": " a\u{1f}b,c\r\nd\re \u{2028}f\n"})],
                false,
                false,
            )
            .unwrap();
        // Python's s.split(), s.split(None, 1), s.split(','), s.splitlines(), s.splitlines(True)
        // through transformers' tojson (ensure_ascii=False: U+2028 stays as it is).
        let want = [
            r#"["a", "b,c", "d", "e", "f"]"#,
            "[\"a\", \"b,c\\r\\nd\\re \u{2028}f\\n\"]",
            r#"[" a\u001fb", "c\r\nd\re "#,
            "\u{2028}f\\n\"]",
            r#"[" a\u001fb,c", "d", "e ", "f"]"#,
            "[\" a\\u001fb,c\\r\\n\", \"d\\r\", \"e \u{2028}\", \"f\\n\"]",
        ];
        assert_eq!(out, want.concat());
    }

    /// transformers' `{% generation %}` blocks render their body (expected texts from
    /// transformers' `render_jinja_template`).
    #[test]
    fn generation_blocks_render_their_body() {
        let t = ChatTemplate::new(
            "{%- for message in messages %}{%- if message['role'] == 'assistant' %}{{ '<|a|>' }}{%- generation %}\n  {{ message['content'] }}{{ '<|end|>' }}\n{%- endgeneration %}{% else %}{{ '<|u|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|a|>' }}{% endif %}",
            vec![],
        )
        .unwrap();
        let chat = [
            json!({"role": "user", "content": "hi"}),
            json!({"role": "assistant", "content": "yo"}),
        ];
        let out = t.render(&chat, false, false).unwrap();
        assert_eq!(out, "<|u|>hi<|end|><|a|>  yo<|end|>");
        let out = t.render(&chat[..1], true, false).unwrap();
        assert_eq!(out, "<|u|>hi<|end|><|a|>");
    }

    #[test]
    fn raise_exception_fails_render() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}ok",
            vec![],
        )
        .unwrap();
        let e = t
            .render(&[json!({"role": "system", "content": "x"})], false, false)
            .unwrap_err();
        assert!(e.contains("no system"), "{e}");
    }

    #[test]
    fn pycompat_tojson_strftime() {
        let t = ChatTemplate::new(
            "{{ messages[0]['content'].strip() }}|{{ messages[0] | tojson }}|{{ bos_token }}|{{ strftime_now('%Y') | length }}",
            vec![("bos_token".into(), "<s>".into())],
        )
        .unwrap();
        let out = t
            .render(
                &[json!({"role": "user", "content": " é<x> "})],
                false,
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "é<x>|{\"role\": \"user\", \"content\": \" é<x> \"}|<s>|4"
        );
        assert_eq!(
            strftime(0, "%d %B %Y %H:%M %a"),
            "01 January 1970 00:00 Thu"
        );
        assert_eq!(strftime(1_700_000_000, "%Y-%m-%d %A"), "2023-11-14 Tuesday");
    }

    #[test]
    fn common_prefix_chars() {
        assert_eq!(common_prefix("abcé", "abcéx"), "abcé");
        assert_eq!(common_prefix("abcdé", "abx"), "ab");
        assert_eq!(common_prefix("abc", "ab"), "ab");
    }
}
