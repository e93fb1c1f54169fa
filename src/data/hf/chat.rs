//! Chat templates: the Jinja program in `chat_template.jinja` or
//! `tokenizer_config.json`'s `chat_template`, rendered as transformers'
//! `apply_chat_template` renders it, with `minijinja`.
//!
//! The environment copies transformers' (`chat_template_utils`):
//! `trim_blocks` and `lstrip_blocks`, `break`/`continue`, Python's string,
//! list and dict methods (`minijinja-contrib`'s pycompat: `startswith`,
//! `strip`, `split`, `items`, ...), `raise_exception(msg)` failing the render
//! with `msg`, `strftime_now(fmt)`, a `tojson` filter that writes what
//! Python's `json.dumps` writes, and the variables `messages`, `tools` and
//! `documents` (none), `add_generation_prompt`, the tokenizer's named special
//! tokens and any extra variables (`enable_thinking`, ...).
//! `{% generation %}` blocks (transformers' assistant-mask extension) render
//! their body as is.
//!
//! Differences from Python that remain: `strftime_now` formats UTC (Python
//! uses the local time zone, UTC in most containers), and messages carry
//! `role` and `content` only.
//!
//! Not here: tokenizing the rendered text (`super::tokenizer`).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, UndefinedBehavior, Value};

use super::tokenizer::{read_optional_json, read_special_tokens};
use crate::{Error, Result};

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ... (the template decides what it accepts).
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The name the template is registered under, as error messages show it.
const TEMPLATE_NAME: &str = "chat_template";
/// Prefix that marks the errors `raise_exception` raises.
const RAISED: &str = "raise_exception: ";

/// A compiled chat template with the special tokens it sees.
pub struct ChatTemplate {
    /// The file it came from (`chat_template.jinja` or `tokenizer_config.json`).
    path: PathBuf,
    source: String,
    special_tokens: Vec<(String, String)>,
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("path", &self.path)
            .field("special_tokens", &self.special_tokens)
            .finish()
    }
}

impl ChatTemplate {
    /// The template of a model directory: `dir/chat_template.jinja` (the 5.x
    /// layout), else `tokenizer_config.json`'s `chat_template` (a string, or a
    /// list of `{name, template}` of which `default` is taken); `None` when
    /// there is neither. The special tokens come from `tokenizer_config.json`.
    pub fn open(dir: &Path) -> Result<Option<ChatTemplate>> {
        let special_tokens = read_special_tokens(dir)?;
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            let source = crate::memory::read_text(&jinja)?;
            return Ok(Some(
                ChatTemplate::from_source(&jinja, &source)?.with_special_tokens(special_tokens),
            ));
        }
        let config_path = dir.join("tokenizer_config.json");
        let Some(config) = read_optional_json(&config_path)? else {
            return Ok(None);
        };
        let source = match config.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(source)) => source.clone(),
            Some(serde_json::Value::Array(named)) => {
                let default = named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
                match default
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                {
                    Some(source) => source.to_string(),
                    None => {
                        let names: Vec<String> = named
                            .iter()
                            .filter_map(|t| t.get("name").map(|n| n.to_string()))
                            .collect();
                        return Err(Error::format(
                            &config_path,
                            "chat_template",
                            format!("no template named \"default\" among [{}]", names.join(", ")),
                        ));
                    }
                }
            }
            Some(other) => {
                return Err(Error::format(
                    &config_path,
                    "chat_template",
                    format!("expected a string or a list of {{name, template}}, found {other}"),
                ));
            }
        };
        Ok(Some(
            ChatTemplate::from_source(&config_path, &source)?.with_special_tokens(special_tokens),
        ))
    }

    /// Compile `source`; `path` names it in errors.
    pub fn from_source(path: &Path, source: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| Error::format(path, TEMPLATE_NAME, e.to_string()))?;
        env.set_syntax(syntax);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("{RAISED}{message}"),
                ))
            },
        );
        env.add_function("strftime_now", |format: String| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            format_utc(&format, now)
        });
        env.add_filter("tojson", tojson);
        let source = without_generation_tags(source).into_owned();
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| Error::format(path, TEMPLATE_NAME, describe(&e)))?;
        Ok(ChatTemplate {
            path: path.to_path_buf(),
            source,
            special_tokens: Vec::new(),
            env,
        })
    }

    /// The named special tokens (`("eos_token", "</s>")`, ...) the template
    /// sees as variables.
    pub fn with_special_tokens(mut self, special_tokens: Vec<(String, String)>) -> ChatTemplate {
        self.special_tokens = special_tokens;
        self
    }

    /// The template text (after `{% generation %}` tags became plain blocks).
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The text of `messages` as `apply_chat_template(messages,
    /// add_generation_prompt=.., tokenize=False, **extra)` renders it. Extra
    /// variables override the special tokens, `tools` and `documents`;
    /// `messages` and `add_generation_prompt` always come from the arguments.
    /// An error (a `raise_exception` in the template among them) names the
    /// file and carries the template's message.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let mut context: Vec<(String, Value)> = self
            .special_tokens
            .iter()
            .map(|(name, content)| (name.clone(), Value::from(content.as_str())))
            .collect();
        context.push(("tools".into(), Value::from(())));
        context.push(("documents".into(), Value::from(())));
        context.extend(extra.iter().map(|(k, v)| (k.clone(), json_to_value(v))));
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        context.push(("messages".into(), Value::from(messages)));
        context.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::format(&self.path, TEMPLATE_NAME, describe(&e)))?;
        template
            .render(Value::from_pairs(context))
            .map_err(|e| Error::format(&self.path, TEMPLATE_NAME, describe(&e)))
    }
}

/// A render error as one line: the template's own message for
/// `raise_exception`, else minijinja's description; with the line.
fn describe(error: &minijinja::Error) -> String {
    let line = error
        .line()
        .map(|l| format!(" (line {l})"))
        .unwrap_or_default();
    match error.detail() {
        Some(detail) if detail.starts_with(RAISED) => {
            format!("{}{line}", &detail[RAISED.len()..])
        }
        _ => {
            let mut text = error.to_string();
            let mut source = std::error::Error::source(error);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
    }
}

/// `serde_json` -> minijinja, keeping object key order.
fn json_to_value(json: &serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => {
            Value::from(items.iter().map(json_to_value).collect::<Vec<_>>())
        }
        serde_json::Value::Object(map) => {
            Value::from_pairs(map.iter().map(|(k, v)| (k.as_str(), json_to_value(v))))
        }
    }
}

/// `{% generation %}` / `{% endgeneration %}` (with any `-`/`+` whitespace
/// control) as `{% if true %}` / `{% endif %}`: the same text, the same trimming.
fn without_generation_tags(source: &str) -> Cow<'_, str> {
    if !source.contains("generation") {
        return Cow::Borrowed(source);
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            break;
        };
        let inner = &tag[2..end];
        let (open, body) = match inner.strip_prefix(['-', '+']) {
            Some(body) => (&inner[..1], body),
            None => ("", inner),
        };
        let (body, close) = match body.strip_suffix(['-', '+']) {
            Some(trimmed) => (trimmed, &body[trimmed.len()..]),
            None => (body, ""),
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(word) => out.push_str(&format!("{{%{open} {word} {close}%}}")),
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// transformers' `tojson`: Python's `json.dumps(x, ensure_ascii=False,
/// indent=None, separators=None, sort_keys=False)` with those keywords.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.max(0) as usize)),
            (_, Some(s)) => Some(s.to_string()),
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        },
    };
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ));
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let writer = JsonWriter {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    writer.write(value, 0, &mut out)?;
    Ok(Value::from(out))
}

/// Python `json.dumps` formatting options.
struct JsonWriter {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl JsonWriter {
    fn write(
        &self,
        value: &Value,
        level: usize,
        out: &mut String,
    ) -> std::result::Result<(), minijinja::Error> {
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number if value.is_integer() => out.push_str(&value.to_string()),
            ValueKind::Number => out.push_str(&python_float(f64::try_from(value.clone())?)),
            ValueKind::String => self.write_string(value.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                self.write_container(out, level, '[', ']', &items, |item, level, out| {
                    self.write(item, level, out)
                })?;
            }
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = value
                    .try_iter()?
                    .map(|key| {
                        let item = value.get_item(&key)?;
                        let key = key.as_str().map_or_else(|| key.to_string(), str::to_string);
                        Ok((key, item))
                    })
                    .collect::<std::result::Result<_, minijinja::Error>>()?;
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                self.write_container(out, level, '{', '}', &entries, |(key, item), level, out| {
                    self.write_string(key, out);
                    out.push_str(&self.key_sep);
                    self.write(item, level, out)
                })?;
            }
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: a value of type {other} is not JSON serializable"),
                ));
            }
        }
        Ok(())
    }

    fn write_container<T>(
        &self,
        out: &mut String,
        level: usize,
        open: char,
        close: char,
        items: &[T],
        write_item: impl Fn(&T, usize, &mut String) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        out.push(open);
        if items.is_empty() {
            out.push(close);
            return Ok(());
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&self.item_sep);
            }
            if let Some(indent) = &self.indent {
                out.push('\n');
                out.push_str(&indent.repeat(level + 1));
            }
            write_item(item, level + 1, out)?;
        }
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(level));
        }
        out.push(close);
        Ok(())
    }

    fn write_string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)` (what `json.dumps` writes): the shortest digits
/// that round-trip, positional for exponents -4..16, else `1e-05` style.
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "-1.2345e-5".
    let scientific = format!("{:e}", x.abs());
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if x.is_sign_negative() { "-" } else { "" };
    if (-4..16).contains(&exponent) {
        let point = exponent + 1;
        let text = if point <= 0 {
            format!("0.{}{digits}", "0".repeat((-point) as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{text}")
    } else {
        let mantissa = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exponent.abs())
    }
}

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
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// `(year, month 1..=12, day 1..=31)` of a day counted from 1970-01-01, in
/// the proleptic Gregorian calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// C `strftime` of the UTC time `unix_seconds` for the directives chat
/// templates use: `%Y %y %m %B %b %h %d %e %j %A %a %w %H %I %M %S %p %F %T
/// %D %Z %z %% %n %t`, and glibc's `%-d`-style unpadded forms. An unknown
/// directive is copied as is, as glibc does.
pub fn format_utc(format: &str, unix_seconds: i64) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let seconds_of_day = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (
        seconds_of_day / 3600,
        seconds_of_day / 60 % 60,
        seconds_of_day % 60,
    );
    let weekday = (days + 4).rem_euclid(7) as usize;
    let days_before_month = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let day_of_year =
        days_before_month[month as usize - 1] + day as i64 + i64::from(month > 2 && is_leap(year));
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let month_name = MONTHS[month as usize - 1];

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let number = |n: i64, width: usize| {
            if unpadded {
                n.to_string()
            } else {
                format!("{n:0width$}")
            }
        };
        let text = match chars.next() {
            Some('Y') => year.to_string(),
            Some('y') => number(year.rem_euclid(100), 2),
            Some('m') => number(month as i64, 2),
            Some('B') => month_name.to_string(),
            Some('b') | Some('h') => month_name[..3].to_string(),
            Some('d') => number(day as i64, 2),
            Some('e') if unpadded => day.to_string(),
            Some('e') => format!("{day:2}"),
            Some('j') => number(day_of_year, 3),
            Some('A') => WEEKDAYS[weekday].to_string(),
            Some('a') => WEEKDAYS[weekday][..3].to_string(),
            Some('w') => weekday.to_string(),
            Some('H') => number(hour, 2),
            Some('I') => number(hour12, 2),
            Some('M') => number(minute, 2),
            Some('S') => number(second, 2),
            Some('p') => if hour < 12 { "AM" } else { "PM" }.to_string(),
            Some('F') => format!("{year}-{month:02}-{day:02}"),
            Some('T') => format!("{hour:02}:{minute:02}:{second:02}"),
            Some('D') => format!("{month:02}/{day:02}/{:02}", year.rem_euclid(100)),
            Some('Z') => "UTC".to_string(),
            Some('z') => "+0000".to_string(),
            Some('%') => "%".to_string(),
            Some('n') => "\n".to_string(),
            Some('t') => "\t".to_string(),
            Some(other) => format!("%{}{other}", if unpadded { "-" } else { "" }),
            None => format!("%{}", if unpadded { "-" } else { "" }),
        };
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, extra: serde_json::Value) -> Result<String> {
        let template = ChatTemplate::from_source(Path::new("t.jinja"), source)?
            .with_special_tokens(vec![("eos_token".into(), "</s>".into())]);
        let messages = [ChatMessage::new("user", "hi")];
        template.render(&messages, true, extra.as_object().unwrap())
    }

    #[test]
    fn dates_from_python_strftime() {
        // Python: datetime.fromtimestamp(t, timezone.utc).strftime(fmt)
        let t = 1_721_399_445; // 2024-07-19 14:30:45 UTC, a Friday
        assert_eq!(format_utc("%d %b %Y", t), "19 Jul 2024");
        assert_eq!(
            format_utc("%A, %B %-d %Y %H:%M:%S %p %I %j %y", t),
            "Friday, July 19 2024 14:30:45 PM 02 201 24"
        );
        assert_eq!(
            format_utc("%F %T %Z %% %q", t),
            "2024-07-19 14:30:45 UTC % %q"
        );
        assert_eq!(format_utc("%Y-%m-%d %a", 0), "1970-01-01 Thu");
        assert_eq!(format_utc("%Y-%m-%d %j", 951_782_400), "2000-02-29 060");
        assert_eq!(format_utc("%Y-%m-%d %j", 4_107_542_399), "2100-02-28 059");
        assert_eq!(format_utc("%Y-%m-%d %e|", -86_400), "1969-12-31 31|");
    }

    #[test]
    fn tojson_writes_what_json_dumps_writes() {
        // Python: json.dumps(x, ensure_ascii=False) and with indent=2 / sort_keys.
        let x = serde_json::json!({"x": {"b": [1, 2.5, 1e-5, 1e16, -0.0, true, null],
                                         "a": "é\"\n\u{1}", "e": [], "f": {}}});
        assert_eq!(
            render("{{ x | tojson }}", x.clone()).unwrap(),
            r#"{"a": "é\"\n\u0001", "b": [1, 2.5, 1e-05, 1e+16, -0.0, true, null], "e": [], "f": {}}"#
        );
        assert_eq!(
            render("{{ x.b[:2] | tojson(indent=2) }}", x.clone()).unwrap(),
            "[\n  1,\n  2.5\n]"
        );
        assert_eq!(
            render("{{ x.a | tojson(ensure_ascii=true) }}|{{ {'z': 1, 'y': 2} | tojson(sort_keys=true, separators=[',', ':']) }}", x).unwrap(),
            r#""\u00e9\"\n\u0001"|{"y":2,"z":1}"#
        );
        assert_eq!(python_float(0.0001), "0.0001");
        assert_eq!(python_float(123456789012345680.0), "1.2345678901234568e+17");
        assert_eq!(python_float(1234.5), "1234.5");
        assert_eq!(python_float(100.0), "100.0");
    }

    #[test]
    fn generation_blocks_render_their_body_with_the_same_trimming() {
        let source = "{% for m in messages %}\n{%- generation -%}\n  [{{ m.content }}]\n{%- endgeneration %}\n{% endfor %}";
        assert_eq!(render(source, serde_json::json!({})).unwrap(), "[hi]");
        assert!(
            without_generation_tags("{%+ generation %}x{% endgeneration +%}")
                .contains("{%+ if true %}x{% endif +%}")
        );
    }

    #[test]
    fn variables_errors_and_python_methods() {
        // Python's Jinja prints booleans as True/False too.
        assert_eq!(
            render("{{ eos_token }}|{{ add_generation_prompt }}|{{ tools is none }}|{{ flag }}|{{ '  a,b '.strip().split(',') | join('+') }}", serde_json::json!({"flag": false})).unwrap(),
            "</s>|True|True|False|a+b"
        );
        let err = render(
            "{{ raise_exception('no tools here') }}",
            serde_json::json!({}),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(err, "t.jinja: chat_template: no tools here (line 1)");
        let err = ChatTemplate::from_source(Path::new("t.jinja"), "{% if %}")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("t.jinja: chat_template: syntax error"),
            "{err}"
        );
    }
}
