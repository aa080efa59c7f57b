//! Tool-call arguments made from the tool's own JSON Schema, so that an agent
//! receiving them can run the tool (knob `tools = "agent"`).
//!
//! A real agent checks the arguments against the schema it sent: Codex's
//! `shell` wants `{"command": [..]}`, its `exec_command` wants `{"cmd": ".."}`,
//! Claude Code's `Bash` wants `{"command": ".."}`. Arguments that do not fit
//! come back as an error ("missing field `cmd`") and the agent asks again,
//! forever. [`generate`] builds the smallest value that fits:
//!
//! - objects: every `required` property, and nothing else (so
//!   `additionalProperties: false` holds); more of the listed properties only
//!   to reach `minProperties`;
//! - `const` → that value; `enum` → its first value;
//! - `anyOf`/`oneOf` → the first alternative that is not `null`; `allOf` →
//!   its members' properties and `required` merged; `$ref` to `#/…` is
//!   followed (`$defs`, `definitions`);
//! - `type` may be a list (`["string","null"]`): the first type not `null`;
//!   without `type`, `properties` means an object, `items` an array, else a
//!   string;
//! - strings: a command-like property (`command`, `cmd`, …) gets the harmless
//!   [`COMMAND`]; a few `format`s get a sample; others [`TEXT`];
//!   `minLength`/`maxLength` are met by padding or cutting;
//! - arrays: one item from `items` (or the `prefixItems`/tuple items), more
//!   to reach `minItems`; a command-like array of strings is the argv
//!   [`COMMAND_ARGV`] (`bash -lc "echo afr-mock"`), as Codex's `shell` takes;
//! - integers and numbers: 1 (a `timeout` property: 10 000), moved inside
//!   `minimum`/`maximum`/`exclusiveMinimum`/`exclusiveMaximum` and up to a
//!   `multipleOf`; booleans `false`; `null` `null`.
//!
//! `pattern` is not honoured (no regex engine in the mock).

use serde_json::{Map, Value};

/// The command a command-like string property gets: prints and changes nothing.
pub const COMMAND: &str = "echo afr-mock";
/// A command-like array of strings: the argv running [`COMMAND`].
pub const COMMAND_ARGV: [&str; 3] = ["bash", "-lc", COMMAND];
/// Any other string.
pub const TEXT: &str = "afr-mock";

/// `$ref`s followed in a row before giving up (a schema may refer to itself).
const MAX_DEPTH: usize = 32;

/// Arguments valid against `schema`, a tool's `parameters` / `input_schema`.
/// `None` or a schema that is not an object gives `{}`, as a tool without
/// parameters takes.
pub fn generate(schema: Option<&Value>) -> Value {
    match schema {
        Some(s @ Value::Object(_)) => {
            let v = value(s, s, "", 0);
            if v.is_object() {
                v
            } else {
                // Tool arguments are always an object.
                Value::Object(Map::new())
            }
        }
        _ => Value::Object(Map::new()),
    }
}

/// Whether a property of this name holds a shell command.
pub fn is_command(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n == "cmd" || n == "argv" || n == "script" || n.contains("command")
}

/// `schema` with its `$ref` followed (within `root`), if it has one.
fn resolve<'a>(schema: &'a Value, root: &'a Value, depth: usize) -> Option<&'a Value> {
    match schema.get("$ref").and_then(Value::as_str) {
        None => Some(schema),
        Some(_) if depth >= MAX_DEPTH => None,
        Some(r) => {
            let target = root.pointer(r.strip_prefix('#')?)?;
            resolve(target, root, depth + 1)
        }
    }
}

/// A value valid against `schema`; `name` is the property it is for ("" at
/// the top), which picks commands and timeouts.
fn value(schema: &Value, root: &Value, name: &str, depth: usize) -> Value {
    if depth >= MAX_DEPTH {
        return Value::Null;
    }
    let schema = match schema {
        // `true` accepts anything, `false` nothing: a string either way.
        Value::Bool(_) => return Value::String(TEXT.to_owned()),
        s => match resolve(s, root, depth) {
            Some(s) => s,
            None => return Value::Null,
        },
    };
    if let Some(c) = schema.get("const") {
        return c.clone();
    }
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(alts) = schema.get(key).and_then(Value::as_array) {
            let not_null = |a: &&Value| {
                resolve(a, root, depth).and_then(|a| a.get("type")) != Some(&Value::from("null"))
            };
            if let Some(alt) = alts.iter().find(not_null).or(alts.first()) {
                return value(alt, root, name, depth + 1);
            }
        }
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        return value(
            &merge_all_of(schema, all, root, depth),
            root,
            name,
            depth + 1,
        );
    }
    match type_of(schema) {
        "object" => object(schema, root, depth),
        "array" => array(schema, root, name, depth),
        "integer" => number(schema, name, true),
        "number" => number(schema, name, false),
        "boolean" => Value::Bool(false),
        "null" => Value::Null,
        _ => string(schema, name),
    }
}

/// The schema's type: the first of its `type` list that is not `null`, or
/// guessed from its keywords.
fn type_of(schema: &Value) -> &str {
    match schema.get("type") {
        Some(Value::String(t)) => t,
        Some(Value::Array(ts)) => {
            let mut names = ts.iter().filter_map(Value::as_str);
            let first = names.clone().next().unwrap_or("string");
            names.find(|t| *t != "null").unwrap_or(first)
        }
        _ if schema.get("properties").is_some() || schema.get("required").is_some() => "object",
        _ if schema.get("items").is_some() || schema.get("prefixItems").is_some() => "array",
        _ => "string",
    }
}

/// `schema` without its `allOf`, with the members' `properties` and
/// `required` merged in (other keywords: the first one seen wins).
fn merge_all_of(schema: &Value, all: &[Value], root: &Value, depth: usize) -> Value {
    let mut out = schema.as_object().cloned().unwrap_or_default();
    out.remove("allOf");
    for member in all.iter().filter_map(|m| resolve(m, root, depth)) {
        let Some(member) = member.as_object() else {
            continue;
        };
        for (k, v) in member {
            match (k.as_str(), out.get_mut(k)) {
                ("properties", Some(Value::Object(props))) => {
                    if let Value::Object(more) = v {
                        for (p, s) in more {
                            props.entry(p.clone()).or_insert_with(|| s.clone());
                        }
                    }
                }
                ("required", Some(Value::Array(req))) => {
                    for r in v.as_array().into_iter().flatten() {
                        if !req.contains(r) {
                            req.push(r.clone());
                        }
                    }
                }
                (_, Some(_)) => {}
                (_, None) => {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
    }
    Value::Object(out)
}

/// Every required property (from `properties`, else `additionalProperties`
/// when it is a schema), then listed ones up to `minProperties`.
fn object(schema: &Value, root: &Value, depth: usize) -> Value {
    let empty = Map::new();
    let props = schema
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let extra = schema
        .get("additionalProperties")
        .filter(|a| a.is_object())
        .unwrap_or(&Value::Bool(true));
    let mut out = Map::new();
    for name in schema
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        let sub = props.get(name).unwrap_or(extra);
        out.insert(name.to_owned(), value(sub, root, name, depth + 1));
    }
    let min = schema
        .get("minProperties")
        .and_then(Value::as_u64)
        .unwrap_or(0) as usize;
    for (name, sub) in props {
        if out.len() >= min {
            break;
        }
        if !out.contains_key(name) {
            out.insert(name.clone(), value(sub, root, name, depth + 1));
        }
    }
    Value::Object(out)
}

/// One item (more for `minItems`, none for `maxItems: 0`); a command-like
/// array of strings is [`COMMAND_ARGV`] when three items are allowed.
fn array(schema: &Value, root: &Value, name: &str, depth: usize) -> Value {
    let min = schema.get("minItems").and_then(Value::as_u64).unwrap_or(0) as usize;
    let max = schema
        .get("maxItems")
        .and_then(Value::as_u64)
        .map_or(usize::MAX, |m| m as usize);
    // Tuple items: 2020-12 `prefixItems`, or the older `items: [..]`.
    let tuple = schema
        .get("prefixItems")
        .or_else(|| schema.get("items").filter(|i| i.is_array()))
        .and_then(Value::as_array);
    let rest = match schema.get("items") {
        Some(i) if !i.is_array() => i,
        _ => schema
            .get("additionalItems")
            .filter(|i| i.is_object())
            .unwrap_or(&Value::Bool(true)),
    };
    let argv_fits = min <= COMMAND_ARGV.len() && COMMAND_ARGV.len() <= max;
    let items_are_strings = resolve(rest, root, depth).is_some_and(|r| {
        r.get("enum").is_none() && r.get("const").is_none() && type_of(r) == "string"
    });
    if tuple.is_none() && is_command(name) && items_are_strings && argv_fits {
        return Value::Array(
            COMMAND_ARGV
                .iter()
                .map(|s| Value::String((*s).to_owned()))
                .collect(),
        );
    }
    let tuple = tuple.map_or(&[][..], Vec::as_slice);
    let count = min.max(1).max(tuple.len()).min(max);
    Value::Array(
        (0..count)
            .map(|i| value(tuple.get(i).unwrap_or(rest), root, name, depth + 1))
            .collect(),
    )
}

/// 1 (10 000 for a timeout) within the schema's bounds and `multipleOf`.
fn number(schema: &Value, name: &str, integer: bool) -> Value {
    let f = |k: &str| schema.get(k).and_then(Value::as_f64);
    // Draft 4 marks exclusivity with a boolean next to minimum/maximum;
    // later drafts put the bound itself in exclusiveMinimum/Maximum.
    let flag = |k: &str| schema.get(k).and_then(Value::as_bool) == Some(true);
    let lo = f("exclusiveMinimum")
        .map(|v| (v, true))
        .or_else(|| f("minimum").map(|v| (v, flag("exclusiveMinimum"))));
    let hi = f("exclusiveMaximum")
        .map(|v| (v, true))
        .or_else(|| f("maximum").map(|v| (v, flag("exclusiveMaximum"))));
    let mut v: f64 = if name.to_ascii_lowercase().contains("timeout") {
        10_000.0
    } else {
        1.0
    };
    if let Some((l, ex)) = lo {
        if v < l || (ex && v <= l) {
            v = match (integer, ex) {
                (true, true) => l.floor() + 1.0,
                (true, false) => l.ceil(),
                (false, true) => hi.map_or(l + 1.0, |(h, _)| (l + h) / 2.0),
                (false, false) => l,
            };
        }
    }
    if let Some((h, ex)) = hi {
        if v > h || (ex && v >= h) {
            v = match (integer, ex) {
                (true, true) => h.ceil() - 1.0,
                (true, false) => h.floor(),
                (false, true) => lo.map_or(h - 1.0, |(l, _)| (l + h) / 2.0),
                (false, false) => h,
            };
        }
    }
    if let Some(m) = f("multipleOf").filter(|m| *m > 0.0) {
        let up = (v / m).ceil() * m;
        let within = hi.is_none_or(|(h, ex)| up < h || (!ex && up <= h));
        v = if within { up } else { (v / m).floor() * m };
    }
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        Value::from(v as i64)
    } else {
        Value::from(v)
    }
}

/// [`COMMAND`] for a command-like property, a sample for a known `format`,
/// else [`TEXT`]; padded or cut to `minLength`/`maxLength`.
fn string(schema: &Value, name: &str) -> Value {
    let format = schema.get("format").and_then(Value::as_str).unwrap_or("");
    let mut s = if is_command(name) {
        COMMAND
    } else {
        match format {
            "date-time" => "2025-01-01T00:00:00Z",
            "date" => "2025-01-01",
            "time" => "00:00:00Z",
            "email" => "afr-mock@example.com",
            "uri" | "url" | "iri" => "https://example.com/",
            "uuid" => "00000000-0000-4000-8000-000000000000",
            "ipv4" => "127.0.0.1",
            "ipv6" => "::1",
            "hostname" => "example.com",
            _ => TEXT,
        }
    }
    .to_owned();
    let len = |k: &str| schema.get(k).and_then(Value::as_u64).map(|n| n as usize);
    if let Some(min) = len("minLength") {
        while s.chars().count() < min {
            s.push('-');
        }
    }
    if let Some(max) = len("maxLength") {
        s = s.chars().take(max).collect();
    }
    Value::String(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Claude Code's `Bash` tool `input_schema` (Messages API), cut to its
    /// properties.
    fn claude_bash() -> Value {
        json!({"type": "object", "properties": {
            "command": {"type": "string", "description": "The command to execute"},
            "timeout": {"type": "number", "description": "Optional timeout in milliseconds (max 600000)"},
            "description": {"type": "string"},
            "run_in_background": {"type": "boolean"}},
          "required": ["command"], "additionalProperties": false,
          "$schema": "http://json-schema.org/draft-07/schema#"})
    }

    /// Codex's `shell` function tool `parameters` (Responses API).
    fn codex_shell() -> Value {
        json!({"type": "object", "properties": {
            "command": {"type": "array", "items": {"type": "string"}, "description": "The command to execute"},
            "workdir": {"type": "string"},
            "timeout_ms": {"type": "number"},
            "with_escalated_permissions": {"type": "boolean"},
            "justification": {"type": "string"}},
          "required": ["command"], "additionalProperties": false})
    }

    /// Codex's `exec_command` function tool `parameters`.
    fn codex_exec_command() -> Value {
        json!({"type": "object", "properties": {
            "cmd": {"type": "string", "description": "Shell command to execute."},
            "workdir": {"type": "string"},
            "shell": {"type": "string"},
            "login": {"type": "boolean"},
            "yield_time_ms": {"type": "number"},
            "max_output_tokens": {"type": "number"}},
          "required": ["cmd"], "additionalProperties": false})
    }

    #[test]
    fn agents_shell_tools_get_a_harmless_command() {
        assert_eq!(
            generate(Some(&claude_bash())),
            json!({"command": "echo afr-mock"})
        );
        assert_eq!(
            generate(Some(&codex_shell())),
            json!({"command": ["bash", "-lc", "echo afr-mock"]})
        );
        assert_eq!(
            generate(Some(&codex_exec_command())),
            json!({"cmd": "echo afr-mock"})
        );
    }

    #[test]
    fn only_required_properties_so_additional_properties_false_holds() {
        let s = json!({"type": "object", "additionalProperties": false,
            "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "required": ["b"]});
        assert_eq!(generate(Some(&s)), json!({"b": 1}));
        // No schema, or one without required properties: `{}`.
        assert_eq!(generate(None), json!({}));
        assert_eq!(
            generate(Some(
                &json!({"type": "object", "properties": {"x": {"type": "string"}}})
            )),
            json!({})
        );
        // minProperties pulls in listed properties, in order.
        let s = json!({"type": "object", "minProperties": 1,
            "properties": {"x": {"type": "boolean"}, "y": {"type": "string"}}});
        assert_eq!(generate(Some(&s)), json!({"x": false}));
    }

    #[test]
    fn nested_objects_arrays_enums_and_consts() {
        let s = json!({"type": "object", "required": ["edits", "mode", "kind", "opts", "flag", "nothing"],
            "properties": {
                "edits": {"type": "array", "minItems": 2, "items": {"type": "object", "additionalProperties": false,
                    "properties": {"path": {"type": "string"}, "line": {"type": "integer", "minimum": 5}, "note": {"type": "string"}},
                    "required": ["path", "line"]}},
                "mode": {"type": "string", "enum": ["fast", "slow"]},
                "kind": {"const": "patch"},
                "opts": {"type": "object", "required": ["depth"], "properties": {"depth": {"type": ["integer", "null"], "maximum": 0}}},
                "flag": {"type": "boolean"},
                "nothing": {"type": "null"}}});
        let line = json!({"path": "afr-mock", "line": 5});
        assert_eq!(
            generate(Some(&s)),
            json!({"edits": [line, line], "mode": "fast", "kind": "patch",
                "opts": {"depth": 0}, "flag": false, "nothing": null})
        );
    }

    #[test]
    fn numbers_stay_within_their_bounds() {
        let n = |s: Value| number(&s, "n", s["type"] == "integer");
        assert_eq!(n(json!({"type": "integer"})), json!(1));
        assert_eq!(
            n(json!({"type": "integer", "minimum": 3, "maximum": 9})),
            json!(3)
        );
        assert_eq!(
            n(json!({"type": "integer", "exclusiveMinimum": 1})),
            json!(2)
        );
        assert_eq!(
            n(json!({"type": "integer", "minimum": 1, "exclusiveMinimum": true})),
            json!(2)
        );
        assert_eq!(
            n(json!({"type": "integer", "exclusiveMaximum": 0})),
            json!(-1)
        );
        assert_eq!(
            n(json!({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1})),
            json!(0.5)
        );
        assert_eq!(
            n(json!({"type": "number", "minimum": 0, "exclusiveMaximum": 1})),
            json!(0.5)
        );
        assert_eq!(
            n(json!({"type": "integer", "minimum": 2, "multipleOf": 5})),
            json!(5)
        );
        // A timeout is long enough for the command to finish.
        assert_eq!(
            number(
                &json!({"type": "integer", "maximum": 600000}),
                "timeout_ms",
                true
            ),
            json!(10000)
        );
    }

    #[test]
    fn strings_meet_length_and_format() {
        assert_eq!(
            string(&json!({"type": "string", "minLength": 10}), "x"),
            json!("afr-mock--")
        );
        assert_eq!(
            string(&json!({"type": "string", "maxLength": 3}), "x"),
            json!("afr")
        );
        assert_eq!(
            string(&json!({"type": "string", "format": "uri"}), "x"),
            json!("https://example.com/")
        );
    }

    #[test]
    fn refs_unions_and_all_of() {
        let s = json!({"type": "object", "required": ["a", "b", "c", "d"],
            "$defs": {"Cmd": {"type": "object", "required": ["command"], "properties": {"command": {"type": "string"}}}},
            "properties": {
                "a": {"$ref": "#/$defs/Cmd"},
                "b": {"anyOf": [{"type": "null"}, {"type": "integer"}]},
                "c": {"allOf": [{"$ref": "#/$defs/Cmd"}, {"required": ["n"], "properties": {"n": {"type": "boolean"}}}]},
                "d": {"$ref": "#/properties/d"}}});
        assert_eq!(
            generate(Some(&s)),
            json!({"a": {"command": "echo afr-mock"}, "b": 1,
                "c": {"command": "echo afr-mock", "n": false}, "d": null})
        );
    }

    #[test]
    fn command_arrays_fit_their_item_limits() {
        let argv = |s: Value| array(&s, &s, "command", 0);
        assert_eq!(
            argv(json!({"type": "array", "items": {"type": "string"}, "maxItems": 1})),
            json!(["echo afr-mock"])
        );
        assert_eq!(
            argv(json!({"type": "array", "items": {"type": "string"}, "minItems": 4})),
            json!([
                "echo afr-mock",
                "echo afr-mock",
                "echo afr-mock",
                "echo afr-mock"
            ])
        );
        assert_eq!(
            array(
                &json!({"type": "array", "items": {"type": "string"}}),
                &Value::Null,
                "paths",
                0
            ),
            json!(["afr-mock"])
        );
        let tuple =
            json!({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}]});
        assert_eq!(array(&tuple, &tuple, "p", 0), json!([1, false]));
    }
}
