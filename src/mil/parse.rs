//! MIL text -> graph: a small lexer and a recursive-descent parser for the
//! subset of MIL that anemone reads and writes (one function, the ops of
//! [`Op`]), in either dialect.
//!
//! Accepted beyond the canonical form of [`super::emit`](mod@super::emit):
//! - any whitespace and indentation, `//` line comments, `[1,2]` or `[1, 2]`;
//! - both dialects' scalar spellings anywhere (`fp16` or `tensor<fp16, []>`,
//!   `int32(1)` or `tensor<int32, []>(1)`); the dialect is set by the opset in
//!   `func main<ios16>` / `<ios18>` (any other opset is an error), the number in
//!   `program(...)` and the `buildInfo` entries are read and ignored;
//! - results of `split` declared bare (`T a, T b = split(...)`) or in parentheses;
//! - float values as decimals (`0.125000`, `1e-05`, `-1`), hex floats
//!   (`0x1p-3`, `0x1.8p+1`), `inf`, `-inf` and `nan`; integers in decimal or hex.
//!
//! Float values are rounded exactly once to the literal's dtype, to nearest
//! with ties to even (hex floats bit by bit, decimals by Rust's
//! correctly rounded parser plus a midpoint check for fp16). A finite value
//! that rounds to infinity is an error.
//!
//! Checked here: syntax, op and dtype names, literal values (well-formed, count
//! matching the shape, integers in range), a `name` attribute on every op,
//! one result for every op but `split`, variables defined once and before use,
//! outputs defined. Not checked here: parameter names, shapes and dtypes of
//! operands (see `infer` and `verify`); declared result types are taken as written.
//!
//! Every error is [`Error::Parse`] with the 1-based line and column (in
//! characters) of the offending token. The parser never panics.

use std::collections::HashMap;

use super::ir::{
    Arg, BlobRef, DType, Dialect, Function, Literal, Operation, Program, TensorType, Value, Var,
};
use super::op::Op;
use crate::{Error, Result};

/// Parse MIL text (either dialect) into a program. Errors carry line and column.
pub fn parse(text: &str) -> Result<Program> {
    Ok(parse_with_lines(text)?.0)
}

/// [`parse`], and the 1-based line on which each variable (input or result)
/// is declared, for tools that map the program back to its text.
pub fn parse_with_lines(text: &str) -> Result<(Program, HashMap<String, usize>)> {
    let tokens = lex(text)?;
    let mut parser = Parser {
        tokens,
        pos: 0,
        defined: HashMap::new(),
        in_blob: false,
    };
    let program = parser.program()?;
    Ok((program, parser.defined))
}

// ---- lexer ----------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    /// The raw text of an unsigned number: `12`, `0.125`, `1e-05`, `0x1.8p+1`.
    Number(String),
    Str(String),
    /// One of `( ) [ ] { } < > , = ; - +`.
    Punct(char),
    Arrow,
    Eof,
}

#[derive(Clone, Debug)]
struct Token {
    tok: Tok,
    line: usize,
    col: usize,
}

fn describe(tok: &Tok) -> String {
    match tok {
        Tok::Ident(s) => format!("`{s}`"),
        Tok::Number(s) => format!("number `{s}`"),
        Tok::Str(s) => format!("string {s:?}"),
        Tok::Punct(c) => format!("`{c}`"),
        Tok::Arrow => "`->`".to_string(),
        Tok::Eof => "end of input".to_string(),
    }
}

fn parse_error(line: usize, col: usize, msg: impl Into<String>) -> Error {
    Error::Parse {
        line,
        col,
        msg: msg.into(),
    }
}

fn lex(text: &str) -> Result<Vec<Token>> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let (mut i, mut line, mut col) = (0, 1, 1);
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        let (start_line, start_col) = (line, col);
        let start = i;
        let tok = if c == '\n' {
            i += 1;
            line += 1;
            col = 1;
            continue;
        } else if c.is_whitespace() {
            i += 1;
            col += 1;
            continue;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        } else if c.is_ascii_alphabetic() || c == '_' {
            while at(i).is_ascii_alphanumeric() || at(i) == '_' {
                i += 1;
            }
            Tok::Ident(chars[start..i].iter().collect())
        } else if c.is_ascii_digit() || (c == '.' && at(i + 1).is_ascii_digit()) {
            i = number_end(&chars, i);
            Tok::Number(chars[start..i].iter().collect())
        } else if c == '"' {
            let mut s = String::new();
            i += 1;
            loop {
                match at(i) {
                    '"' if i < chars.len() => break,
                    '\\' if i + 1 < chars.len() => {
                        s.push(match chars[i + 1] {
                            'n' => '\n',
                            'r' => '\r',
                            't' => '\t',
                            '\\' => '\\',
                            '"' => '"',
                            other => {
                                return Err(parse_error(
                                    line,
                                    col + (i - start),
                                    format!("unknown escape `\\{other}` in string"),
                                ));
                            }
                        });
                        i += 2;
                    }
                    '\n' => return Err(parse_error(line, col, "unterminated string")),
                    _ if i >= chars.len() => {
                        return Err(parse_error(line, col, "unterminated string"));
                    }
                    other => {
                        s.push(other);
                        i += 1;
                    }
                }
            }
            i += 1;
            Tok::Str(s)
        } else if c == '-' && at(i + 1) == '>' {
            i += 2;
            Tok::Arrow
        } else if "()[]{}<>,=;-+".contains(c) {
            i += 1;
            Tok::Punct(c)
        } else {
            return Err(parse_error(
                line,
                col,
                format!("unexpected character {c:?}"),
            ));
        };
        col += i - start;
        tokens.push(Token {
            tok,
            line: start_line,
            col: start_col,
        });
    }
    tokens.push(Token {
        tok: Tok::Eof,
        line,
        col,
    });
    Ok(tokens)
}

/// End of the number starting at `i`: decimal `12`, `1.5`, `.5`, `1e-05`, or hex
/// `0x1F`, `0x1.8p+1`. Exponent letters are taken only when digits follow.
fn number_end(chars: &[char], mut i: usize) -> usize {
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    let exponent = |i: usize, letters: &str| -> Option<usize> {
        if !letters.contains(at(i)) {
            return None;
        }
        let j = if at(i + 1) == '+' || at(i + 1) == '-' {
            i + 2
        } else {
            i + 1
        };
        at(j).is_ascii_digit().then(|| {
            let mut k = j;
            while at(k).is_ascii_digit() {
                k += 1;
            }
            k
        })
    };
    if at(i) == '0' && (at(i + 1) == 'x' || at(i + 1) == 'X') {
        i += 2;
        while at(i).is_ascii_hexdigit() || at(i) == '.' {
            i += 1;
        }
        return exponent(i, "pP").unwrap_or(i);
    }
    while at(i).is_ascii_digit() {
        i += 1;
    }
    if at(i) == '.' {
        i += 1;
        while at(i).is_ascii_digit() {
            i += 1;
        }
    }
    exponent(i, "eE").unwrap_or(i)
}

// ---- numbers ----------------------------------------------------------------

/// Significand bits, minimum and maximum normal exponent of a binary float format.
struct FloatFormat {
    precision: i64,
    min_exp: i64,
    max_exp: i64,
}

const FP16: FloatFormat = FloatFormat {
    precision: 11,
    min_exp: -14,
    max_exp: 15,
};
const FP32: FloatFormat = FloatFormat {
    precision: 24,
    min_exp: -126,
    max_exp: 127,
};

/// Round `mant * 2^exp2` (plus a nonzero amount below its last bit when
/// `sticky`) to `format`, ties to even, subnormals included; overflow gives infinity.
fn round_binary(mant: u128, exp2: i64, sticky: bool, format: &FloatFormat) -> f64 {
    if mant == 0 {
        return 0.0;
    }
    let bits = 128 - i64::from(mant.leading_zeros());
    let top = exp2.saturating_add(bits - 1);
    if top > format.max_exp {
        return f64::INFINITY;
    }
    let keep = if top >= format.min_exp {
        format.precision
    } else {
        format.precision.saturating_sub(format.min_exp - top)
    };
    let shift = bits.saturating_sub(keep);
    let (q, e) = if shift <= 0 {
        (mant, exp2)
    } else {
        let q = u32::try_from(shift)
            .ok()
            .and_then(|s| mant.checked_shr(s))
            .unwrap_or(0);
        let rem = if shift >= 128 {
            mant
        } else {
            mant & ((1u128 << shift) - 1)
        };
        let round_up = if shift > 128 {
            false // mant < 2^128 <= half of the last kept bit
        } else {
            let half = 1u128 << (shift - 1);
            rem > half || (rem == half && (sticky || q & 1 == 1))
        };
        (q + u128::from(round_up), exp2 + shift)
    };
    if q == 0 {
        return 0.0;
    }
    // q <= 2^precision and min_exp - precision < e <= max_exp: both exact in f64.
    let value = q as f64 * 2f64.powi(e as i32);
    let largest = (2.0 - 2f64.powi(1 - format.precision as i32)) * 2f64.powi(format.max_exp as i32);
    if value > largest {
        f64::INFINITY
    } else {
        value
    }
}

/// A hex float `0x<hex>[.<hex>][p<exp>]` rounded to `format`; `None` if malformed.
fn hex_float(text: &str, format: &FloatFormat) -> Option<f64> {
    let body = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))?;
    let (digits, exponent) = match body.find(['p', 'P']) {
        Some(p) => (&body[..p], &body[p + 1..]),
        None => (body, "0"),
    };
    let exponent: i64 = match exponent.parse::<i64>() {
        Ok(e) => e.clamp(-1 << 40, 1 << 40),
        Err(_)
            if !exponent.is_empty()
                && exponent
                    .trim_start_matches(['+', '-'])
                    .bytes()
                    .all(|b| b.is_ascii_digit()) =>
        {
            if exponent.starts_with('-') {
                -1 << 40
            } else {
                1 << 40
            }
        }
        Err(_) => return None,
    };
    let (mut mant, mut exp2, mut sticky, mut any, mut after_point) =
        (0u128, 0i64, false, false, false);
    for c in digits.chars() {
        if c == '.' {
            if after_point {
                return None;
            }
            after_point = true;
            continue;
        }
        let d = c.to_digit(16)?;
        any = true;
        if mant >> 124 == 0 {
            mant = (mant << 4) | u128::from(d);
            if after_point {
                exp2 -= 4;
            }
        } else {
            sticky |= d != 0;
            if !after_point {
                exp2 += 4;
            }
        }
    }
    any.then(|| round_binary(mant, exp2.saturating_add(exponent), sticky, format))
}

/// A decimal (`0.125`, `1e-05`, `-1` without its sign) rounded once to fp16, ties
/// to even; `None` if malformed. Rust parses it correctly rounded to `f64`; that
/// second rounding can only go wrong when it lands exactly on an fp16 midpoint,
/// which is then settled by comparing the text with the midpoint digit by digit.
fn decimal_fp16(text: &str) -> Option<f64> {
    use half::f16;
    let x: f64 = text.parse().ok()?;
    let near = f16::from_f64(x);
    // Past the largest finite fp16 the next step would be 2^16.
    let value = |h: f16| if h.is_infinite() { 65536.0 } else { h.to_f64() };
    if !x.is_finite() || value(near) == x {
        return Some(near.to_f64());
    }
    let other = f16::from_bits(if value(near) < x {
        near.to_bits() + 1
    } else {
        near.to_bits() - 1
    });
    if (value(near) + value(other)) / 2.0 != x {
        return Some(near.to_f64());
    }
    let (low, high) = if value(near) < value(other) {
        (near, other)
    } else {
        (other, near)
    };
    let pick = match compare_decimal(text, x)? {
        std::cmp::Ordering::Less => low,
        std::cmp::Ordering::Greater => high,
        std::cmp::Ordering::Equal if low.to_bits() % 2 == 0 => low,
        std::cmp::Ordering::Equal => high,
    };
    Some(pick.to_f64())
}

/// Compare the decimal `text` with `m`, a positive `f64` with a short mantissa and
/// an exponent within 2^-60..2^60 (an fp16 midpoint), exactly.
fn compare_decimal(text: &str, m: f64) -> Option<std::cmp::Ordering> {
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], text[i + 1..].parse::<i64>().ok()?),
        None => (text, 0),
    };
    let fraction_digits = mantissa.find('.').map_or(0, |p| mantissa.len() - p - 1);
    let all: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let digits = all.trim_start_matches('0');
    let trimmed = digits.trim_end_matches('0');
    let exp10 = exponent
        .saturating_sub(fraction_digits as i64)
        .saturating_add((digits.len() - trimmed.len()) as i64);
    // m = k * 2^e exactly, then as integer digits times a power of ten.
    let bits = m.to_bits();
    let (mut k, mut e) = (
        u128::from((bits & ((1 << 52) - 1)) | (1 << 52)),
        ((bits >> 52) & 0x7ff) as i64 - 1075,
    );
    while k & 1 == 0 {
        k >>= 1;
        e += 1;
    }
    if !(-60..=60).contains(&e) || k >> 20 != 0 {
        return None;
    }
    let (m_digits, m_exp10) = if e >= 0 {
        ((k << e).to_string(), 0)
    } else {
        ((k * 5u128.pow((-e) as u32)).to_string(), e)
    };
    let m_trimmed = m_digits.trim_end_matches('0');
    let m_exp10 = m_exp10 + (m_digits.len() - m_trimmed.len()) as i64;
    if trimmed.is_empty() {
        return Some(std::cmp::Ordering::Less);
    }
    // Compare magnitudes (position of the leading digit), then digits.
    let magnitude = exp10.saturating_add(trimmed.len() as i64);
    let m_magnitude = m_exp10 + m_trimmed.len() as i64;
    Some(magnitude.cmp(&m_magnitude).then_with(|| {
        let n = trimmed.len().max(m_trimmed.len());
        let pad = |s: &str| format!("{s:0<n$}");
        pad(trimmed).cmp(&pad(m_trimmed))
    }))
}

/// An unsigned integer in decimal or `0x` hex; `None` if malformed, `Some(None)` if too large.
fn unsigned_int(text: &str) -> Option<Option<u128>> {
    let (digits, radix) = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (text, 10),
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    Some(u128::from_str_radix(digits, radix).ok())
}

// ---- parser -------------------------------------------------------------------

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    /// Every variable defined so far, with the line of its definition.
    defined: HashMap<String, usize>,
    /// Inside `BLOBFILE(...)`, whose fields must be plain literals (bounds the recursion).
    in_blob: bool,
}

/// A declared result or input before it is entered into scope.
struct Declared {
    var: Var,
    token: Token,
}

impl Parser {
    fn peek(&self) -> &Token {
        // The token list always ends with Eof and `pos` never passes it.
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn peek_at(&self, ahead: usize) -> &Tok {
        let i = (self.pos + ahead).min(self.tokens.len() - 1);
        &self.tokens[i].tok
    }

    fn next(&mut self) -> Token {
        let token = self.peek().clone();
        if token.tok != Tok::Eof {
            self.pos += 1;
        }
        token
    }

    fn error_at(&self, token: &Token, msg: impl Into<String>) -> Error {
        parse_error(token.line, token.col, msg)
    }

    fn is_punct(&self, c: char) -> bool {
        self.peek().tok == Tok::Punct(c)
    }

    fn eat_punct(&mut self, c: char) -> bool {
        let yes = self.is_punct(c);
        if yes {
            self.next();
        }
        yes
    }

    fn expect_punct(&mut self, c: char, context: &str) -> Result<Token> {
        let token = self.next();
        if token.tok == Tok::Punct(c) {
            Ok(token)
        } else {
            Err(self.error_at(
                &token,
                format!("expected `{c}` {context}, found {}", describe(&token.tok)),
            ))
        }
    }

    fn expect_ident(&mut self, context: &str) -> Result<(String, Token)> {
        let token = self.next();
        match &token.tok {
            Tok::Ident(s) => Ok((s.clone(), token.clone())),
            other => Err(self.error_at(
                &token,
                format!("expected {context}, found {}", describe(other)),
            )),
        }
    }

    fn expect_keyword(&mut self, word: &str) -> Result<()> {
        let token = self.next();
        match &token.tok {
            Tok::Ident(s) if s == word => Ok(()),
            other => Err(self.error_at(
                &token,
                format!("expected `{word}`, found {}", describe(other)),
            )),
        }
    }

    // ---- program structure ----

    fn program(&mut self) -> Result<Program> {
        self.expect_keyword("program")?;
        self.expect_punct('(', "after `program`")?;
        let version = self.next();
        if !matches!(version.tok, Tok::Number(_)) {
            return Err(self.error_at(
                &version,
                format!(
                    "expected a program version such as `1.3`, found {}",
                    describe(&version.tok)
                ),
            ));
        }
        self.expect_punct(')', "after the program version")?;
        if self.is_punct('[') {
            self.program_attributes()?;
        }
        self.expect_punct('{', "to open the program body")?;
        self.expect_keyword("func")?;
        let (name, _) = self.expect_ident("a function name")?;
        self.expect_punct('<', "before the function's opset")?;
        let (opset, opset_token) = self.expect_ident("an opset such as `ios18`")?;
        let dialect = match opset.as_str() {
            "ios18" => Dialect::Ios18,
            "ios16" => Dialect::Ios16,
            _ => {
                return Err(self.error_at(
                    &opset_token,
                    format!("unsupported opset `{opset}`: anemone reads `ios16` and `ios18`"),
                ));
            }
        };
        self.expect_punct('>', "after the opset")?;
        self.expect_punct('(', "to open the function inputs")?;
        let mut inputs = Vec::new();
        if !self.eat_punct(')') {
            loop {
                let ty = self.tensor_type()?;
                let (name, token) = self.expect_ident("an input name")?;
                let declared = Declared {
                    var: Var::new(name, ty),
                    token,
                };
                self.check_new(&declared, &[])?;
                self.defined
                    .insert(declared.var.name.clone(), declared.token.line);
                inputs.push(declared.var);
                if !self.eat_punct(',') {
                    self.expect_punct(')', "to close the function inputs")?;
                    break;
                }
            }
        }
        self.expect_punct('{', "to open the function body")?;
        let mut ops = Vec::new();
        while !self.is_punct('}') {
            ops.push(self.statement()?);
        }
        self.next();
        let arrow = self.next();
        if arrow.tok != Tok::Arrow {
            return Err(self.error_at(
                &arrow,
                format!(
                    "expected `->` and the function outputs, found {}",
                    describe(&arrow.tok)
                ),
            ));
        }
        self.expect_punct('(', "to open the function outputs")?;
        let mut outputs = Vec::new();
        if !self.eat_punct(')') {
            loop {
                let (name, token) = self.expect_ident("an output variable name")?;
                if !self.defined.contains_key(&name) {
                    return Err(
                        self.error_at(&token, format!("output `{name}` is not a defined variable"))
                    );
                }
                outputs.push(name);
                if !self.eat_punct(',') {
                    self.expect_punct(')', "to close the function outputs")?;
                    break;
                }
            }
        }
        self.expect_punct(';', "after the function outputs")?;
        if self.peek().tok == Tok::Ident("func".to_string()) {
            let token = self.peek().clone();
            return Err(self.error_at(
                &token,
                "a second function: anemone programs have exactly one function",
            ));
        }
        self.expect_punct('}', "to close the program")?;
        let end = self.next();
        if end.tok != Tok::Eof {
            return Err(self.error_at(
                &end,
                format!(
                    "unexpected {} after the end of the program",
                    describe(&end.tok)
                ),
            ));
        }
        Ok(Program {
            dialect,
            main: Function {
                name,
                inputs,
                ops,
                outputs,
            },
        })
    }

    /// `[buildInfo = dict<K, V>({{"k", "v"}, ...}), ...]`; read and dropped.
    fn program_attributes(&mut self) -> Result<()> {
        self.expect_punct('[', "")?;
        loop {
            self.expect_ident("a program attribute name such as `buildInfo`")?;
            self.expect_punct('=', "after the program attribute name")?;
            self.expect_keyword("dict")?;
            self.expect_punct('<', "after `dict`")?;
            self.tensor_type()?;
            self.expect_punct(',', "between the dict key and value types")?;
            self.tensor_type()?;
            self.expect_punct('>', "after the dict value type")?;
            self.expect_punct('(', "to open the dict")?;
            self.expect_punct('{', "to open the dict entries")?;
            if !self.eat_punct('}') {
                loop {
                    self.expect_punct('{', "to open a dict entry")?;
                    self.dict_string()?;
                    self.expect_punct(',', "between a dict key and value")?;
                    self.dict_string()?;
                    self.expect_punct('}', "to close a dict entry")?;
                    if !self.eat_punct(',') {
                        self.expect_punct('}', "to close the dict entries")?;
                        break;
                    }
                }
            }
            self.expect_punct(')', "to close the dict")?;
            if !self.eat_punct(',') {
                self.expect_punct(']', "to close the program attributes")?;
                return Ok(());
            }
        }
    }

    fn dict_string(&mut self) -> Result<()> {
        let token = self.next();
        match &token.tok {
            Tok::Str(_) => Ok(()),
            other => Err(self.error_at(
                &token,
                format!(
                    "expected a string in a dict entry, found {}",
                    describe(other)
                ),
            )),
        }
    }

    /// Error if `declared` names a variable already defined or in `pending`.
    fn check_new(&self, declared: &Declared, pending: &[Declared]) -> Result<()> {
        let name = &declared.var.name;
        let earlier = self.defined.get(name).copied().or_else(|| {
            pending
                .iter()
                .find(|d| &d.var.name == name)
                .map(|d| d.token.line)
        });
        match earlier {
            Some(line) => Err(self.error_at(
                &declared.token,
                format!("variable `{name}` is already defined (line {line})"),
            )),
            None => Ok(()),
        }
    }

    /// `<results> = <op>(<args>)[<attrs>];`
    fn statement(&mut self) -> Result<Operation> {
        let parenthesised = self.eat_punct('(');
        let mut results: Vec<Declared> = Vec::new();
        loop {
            let ty = self.tensor_type()?;
            let (name, token) = self.expect_ident("a result variable name")?;
            let declared = Declared {
                var: Var::new(name, ty),
                token,
            };
            self.check_new(&declared, &results)?;
            results.push(declared);
            if !self.eat_punct(',') {
                break;
            }
        }
        if parenthesised {
            self.expect_punct(')', "to close the result list")?;
        }
        self.expect_punct('=', "after the result variables")?;
        let (op_name, op_token) = self.expect_ident("an op name")?;
        let Some(op) = Op::from_mil_name(&op_name) else {
            let known: Vec<&str> = Op::ALL.iter().map(|o| o.mil_name()).collect();
            return Err(self.error_at(
                &op_token,
                format!("unknown op `{op_name}` (known ops: {})", known.join(", ")),
            ));
        };
        if let (false, Some(extra)) = (op == Op::Split, results.get(1)) {
            return Err(self.error_at(
                &extra.token,
                format!("op `{op_name}` has one result; only `split` declares several"),
            ));
        }
        self.expect_punct('(', "after the op name")?;
        let mut args: Vec<(String, Arg)> = Vec::new();
        if !self.eat_punct(')') {
            loop {
                let (key, key_token) = self.expect_ident("an argument name")?;
                if args.iter().any(|(k, _)| *k == key) {
                    return Err(
                        self.error_at(&key_token, format!("argument `{key}` is given twice"))
                    );
                }
                self.expect_punct('=', "after the argument name")?;
                let arg = self.argument(true)?;
                args.push((key, arg));
                if !self.eat_punct(',') {
                    self.expect_punct(')', "to close the op arguments")?;
                    break;
                }
            }
        }
        let mut name = None;
        let mut attrs: Vec<(String, Literal)> = Vec::new();
        if self.eat_punct('[') {
            loop {
                let (key, key_token) = self.expect_ident("an attribute name")?;
                if attrs.iter().any(|(k, _)| *k == key) || (key == "name" && name.is_some()) {
                    return Err(
                        self.error_at(&key_token, format!("attribute `{key}` is given twice"))
                    );
                }
                self.expect_punct('=', "after the attribute name")?;
                let value_token = self.peek().clone();
                let lit = self.literal()?;
                if key == "name" {
                    match (&lit.value, lit.ty.dtype) {
                        (Value::Str(v), DType::String) if v.len() == 1 && lit.ty.is_scalar() => {
                            name = Some(v[0].clone());
                        }
                        _ => {
                            return Err(self.error_at(
                                &value_token,
                                "attribute `name` must be a string such as `string(\"x\")`",
                            ));
                        }
                    }
                } else {
                    attrs.push((key, lit));
                }
                if !self.eat_punct(',') {
                    self.expect_punct(']', "to close the attributes")?;
                    break;
                }
            }
        }
        let Some(name) = name else {
            return Err(self.error_at(
                &op_token,
                format!("op `{op_name}` has no `name` attribute; add `[name = string(\"...\")]`"),
            ));
        };
        self.expect_punct(';', "at the end of the statement")?;
        for declared in &results {
            self.defined
                .insert(declared.var.name.clone(), declared.token.line);
        }
        Ok(Operation {
            op,
            name,
            outputs: results.into_iter().map(|d| d.var).collect(),
            args,
            attrs,
        })
    }

    /// A variable (which must be defined), a literal, or (at the top level) a tuple.
    fn argument(&mut self, top_level: bool) -> Result<Arg> {
        let token = self.peek().clone();
        match &token.tok {
            Tok::Punct('(') if top_level => {
                self.next();
                let mut items = Vec::new();
                if !self.eat_punct(')') {
                    loop {
                        items.push(self.argument(false)?);
                        if !self.eat_punct(',') {
                            self.expect_punct(')', "to close the tuple")?;
                            break;
                        }
                    }
                }
                Ok(Arg::Tuple(items))
            }
            Tok::Punct('(') => Err(self.error_at(&token, "tuples cannot be nested")),
            Tok::Ident(word) => {
                let next = self.peek_at(1);
                let is_literal =
                    *next == Tok::Punct('(') || (word == "tensor" && *next == Tok::Punct('<'));
                if is_literal {
                    return Ok(Arg::Lit(self.literal()?));
                }
                if !self.defined.contains_key(word) {
                    return Err(self.error_at(
                        &token,
                        format!("variable `{word}` is used before it is defined"),
                    ));
                }
                self.next();
                Ok(Arg::Var(word.clone()))
            }
            other => Err(self.error_at(
                &token,
                format!(
                    "expected a variable, a typed literal or a tuple, found {}",
                    describe(other)
                ),
            )),
        }
    }

    fn dtype(&mut self) -> Result<(DType, Token)> {
        let (word, token) = self.expect_ident("a dtype")?;
        match DType::from_mil_name(&word) {
            Some(dtype) => Ok((dtype, token)),
            None => {
                let known: Vec<&str> = DType::ALL.iter().map(|d| d.mil_name()).collect();
                Err(self.error_at(
                    &token,
                    format!("unknown dtype `{word}` (known: {})", known.join(", ")),
                ))
            }
        }
    }

    /// True at `tensor <`.
    fn at_tensor_type(&self) -> bool {
        matches!(&self.peek().tok, Tok::Ident(w) if w == "tensor")
            && *self.peek_at(1) == Tok::Punct('<')
    }

    /// `fp16` or `tensor<fp16, [d0, d1, ...]>`.
    fn tensor_type(&mut self) -> Result<TensorType> {
        if self.at_tensor_type() {
            self.next();
            self.next();
            let (dtype, _) = self.dtype()?;
            self.expect_punct(',', "between the dtype and the shape")?;
            let open = self.expect_punct('[', "to open the shape")?;
            let mut shape = Vec::new();
            if !self.eat_punct(']') {
                loop {
                    let token = self.next();
                    let dim = match &token.tok {
                        Tok::Number(text) => match unsigned_int(text) {
                            Some(Some(v)) => usize::try_from(v).ok(),
                            _ => None,
                        },
                        _ => None,
                    };
                    let Some(dim) = dim else {
                        return Err(self.error_at(
                            &token,
                            format!(
                                "shape dimension must be a non-negative integer, found {}",
                                describe(&token.tok)
                            ),
                        ));
                    };
                    shape.push(dim);
                    if !self.eat_punct(',') {
                        self.expect_punct(']', "to close the shape")?;
                        break;
                    }
                }
            }
            // Keep element and byte counts representable for every later consumer.
            let fits = shape
                .iter()
                .try_fold(8usize, |acc, &d| acc.checked_mul(d))
                .is_some();
            if !fits {
                return Err(self.error_at(&open, "shape has too many elements"));
            }
            self.expect_punct('>', "to close the tensor type")?;
            return Ok(TensorType::new(dtype, shape));
        }
        let (dtype, _) = self.dtype()?;
        Ok(TensorType::scalar(dtype))
    }

    /// `fp16(0.5)`, `tensor<int32, [2]>([1, 2])`, `tensor<fp16, []>(0.5)`, or
    /// `tensor<fp16, [..]>(BLOBFILE(path = string(".."), offset = uint64(64)))`.
    fn literal(&mut self) -> Result<Literal> {
        let start = self.peek().clone();
        if !self.at_tensor_type() {
            if !matches!(start.tok, Tok::Ident(_)) {
                return Err(self.error_at(
                    &start,
                    format!("expected a typed literal, found {}", describe(&start.tok)),
                ));
            }
            let (dtype, _) = self.dtype()?;
            self.expect_punct('(', "after the literal's dtype")?;
            let value = self.scalar_values(dtype, 1, &start)?;
            self.expect_punct(')', "to close the literal")?;
            return Ok(Literal {
                ty: TensorType::scalar(dtype),
                value,
            });
        }
        let ty = self.tensor_type()?;
        self.expect_punct('(', "after the literal's type")?;
        let value = if matches!(&self.peek().tok, Tok::Ident(w) if w == "BLOBFILE") {
            let blob_token = self.next();
            if ty.dtype == DType::String {
                let msg = "a string tensor cannot live in a BLOBFILE";
                return Err(self.error_at(&blob_token, msg));
            }
            if self.in_blob {
                return Err(self.error_at(&blob_token, "BLOBFILE fields cannot be BLOBFILEs"));
            }
            self.in_blob = true;
            let blob = self.blob()?;
            self.in_blob = false;
            Value::Blob(blob)
        } else if ty.is_scalar() {
            self.scalar_values(ty.dtype, 1, &start)?
        } else {
            let open = self.expect_punct('[', "to open the literal's values")?;
            let value = self.scalar_values(ty.dtype, ty.numel(), &open)?;
            self.expect_punct(']', "to close the literal's values")?;
            value
        };
        self.expect_punct(')', "to close the literal")?;
        Ok(Literal { ty, value })
    }

    /// `(path = string("..."), offset = uint64(N))`, after `BLOBFILE`.
    fn blob(&mut self) -> Result<BlobRef> {
        self.expect_punct('(', "after `BLOBFILE`")?;
        let (mut path, mut offset) = (None, None);
        loop {
            let (key, key_token) = self.expect_ident("`path` or `offset`")?;
            self.expect_punct('=', "after the BLOBFILE field name")?;
            let value_token = self.peek().clone();
            let lit = self.literal()?;
            let scalar = |dtype: DType| lit.ty.dtype == dtype && lit.ty.is_scalar();
            match (key.as_str(), &lit.value) {
                ("path", Value::Str(v)) if path.is_none() && scalar(DType::String) => {
                    path = v.first().cloned();
                }
                ("path", _) if path.is_none() => {
                    let msg = "BLOBFILE path must be a string such as `string(\"@model_path/weights/w.bin\")`";
                    return Err(self.error_at(&value_token, msg));
                }
                ("offset", Value::Int(v)) if offset.is_none() && scalar(DType::Uint64) => {
                    offset = v.first().map(|&o| o as u64);
                }
                ("offset", _) if offset.is_none() => {
                    let msg = "BLOBFILE offset must be a uint64 such as `uint64(64)`";
                    return Err(self.error_at(&value_token, msg));
                }
                _ => {
                    let msg = format!(
                        "unexpected BLOBFILE field `{key}` (expected `path` and `offset` once each)"
                    );
                    return Err(self.error_at(&key_token, msg));
                }
            }
            if !self.eat_punct(',') {
                let close = self.expect_punct(')', "to close BLOBFILE")?;
                return match (path, offset) {
                    (Some(path), Some(offset)) => Ok(BlobRef { path, offset }),
                    _ => Err(self.error_at(&close, "BLOBFILE needs both `path` and `offset`")),
                };
            }
        }
    }

    /// Comma-separated values of `dtype`; exactly `count` of them (error at `at` otherwise).
    fn scalar_values(&mut self, dtype: DType, count: usize, at: &Token) -> Result<Value> {
        let mut value = match dtype {
            DType::Fp16 | DType::Fp32 => Value::Float(Vec::new()),
            DType::Bool => Value::Bool(Vec::new()),
            DType::String => Value::Str(Vec::new()),
            _ => Value::Int(Vec::new()),
        };
        let mut n = 0usize;
        let empty = self.is_punct(']') || self.is_punct(')');
        if !empty {
            loop {
                match &mut value {
                    Value::Float(v) => v.push(self.float_value(dtype)?),
                    Value::Int(v) => v.push(self.int_value(dtype)?),
                    Value::Bool(v) => v.push(self.bool_value()?),
                    Value::Str(v) => v.push(self.string_value()?),
                    Value::Blob(_) => {}
                }
                n += 1;
                if !self.eat_punct(',') {
                    break;
                }
            }
        }
        if n != count {
            let shape = if count == 1 && n > 1 {
                "a scalar".to_string()
            } else {
                format!("{count} value(s)")
            };
            return Err(self.error_at(
                at,
                format!("literal of {dtype} has {n} value(s) but its type needs {shape}"),
            ));
        }
        Ok(value)
    }

    /// An optional sign, returning the token where the value starts and whether it is negative.
    fn sign(&mut self) -> (Token, bool) {
        let first = self.peek().clone();
        match first.tok {
            Tok::Punct('-') => {
                self.next();
                (first, true)
            }
            Tok::Punct('+') => {
                self.next();
                (first, false)
            }
            _ => (first, false),
        }
    }

    fn float_value(&mut self, dtype: DType) -> Result<f32> {
        let (first, negative) = self.sign();
        let token = self.next();
        let format = if dtype == DType::Fp16 { &FP16 } else { &FP32 };
        let magnitude = match &token.tok {
            Tok::Ident(w) if w == "inf" => Some(f64::INFINITY),
            Tok::Ident(w) if w == "nan" => Some(f64::NAN),
            Tok::Number(text) if text.starts_with("0x") || text.starts_with("0X") => {
                hex_float(text, format)
            }
            Tok::Number(text) if dtype == DType::Fp16 => decimal_fp16(text),
            Tok::Number(text) => text.parse::<f32>().ok().map(f64::from),
            _ => None,
        };
        let Some(magnitude) = magnitude else {
            return Err(self.error_at(
                &token,
                format!("malformed {dtype} value {}", describe(&token.tok)),
            ));
        };
        if magnitude.is_infinite() && matches!(token.tok, Tok::Number(_)) {
            return Err(self.error_at(
                &first,
                format!("value {} is out of range for {dtype}", describe(&token.tok)),
            ));
        }
        let x = magnitude as f32;
        Ok(if negative { -x } else { x })
    }

    fn int_value(&mut self, dtype: DType) -> Result<i64> {
        let (first, negative) = self.sign();
        let token = self.next();
        let magnitude = match &token.tok {
            Tok::Number(text) => unsigned_int(text),
            _ => None,
        };
        let Some(magnitude) = magnitude else {
            return Err(self.error_at(
                &token,
                format!(
                    "malformed {dtype} value {} (expected an integer)",
                    describe(&token.tok)
                ),
            ));
        };
        let (lo, hi) = dtype.int_range().unwrap_or((0, 0));
        let value = magnitude
            .and_then(|m| i128::try_from(m).ok())
            .map(|m| if negative { -m } else { m })
            .filter(|v| (lo..=hi).contains(v));
        let Some(value) = value else {
            let text = if let Tok::Number(t) = &token.tok {
                t.as_str()
            } else {
                ""
            };
            let sign = if negative { "-" } else { "" };
            return Err(self.error_at(
                &first,
                format!("value {sign}{text} is out of range for {dtype} ({lo}..={hi})"),
            ));
        };
        // uint64 values above i64::MAX keep their bits (see `Literal::uint64`).
        Ok(value as i64)
    }

    fn bool_value(&mut self) -> Result<bool> {
        let token = self.next();
        match &token.tok {
            Tok::Ident(w) if w == "true" => Ok(true),
            Tok::Ident(w) if w == "false" => Ok(false),
            other => Err(self.error_at(
                &token,
                format!(
                    "malformed bool value {} (expected `true` or `false`)",
                    describe(other)
                ),
            )),
        }
    }

    fn string_value(&mut self) -> Result<String> {
        let token = self.next();
        match &token.tok {
            Tok::Str(s) => Ok(s.clone()),
            other => Err(self.error_at(
                &token,
                format!(
                    "malformed string value {} (expected a quoted string)",
                    describe(other)
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_round_once_to_fp16() {
        let tie = 1.0 + 2f64.powi(-11); // halfway between 1 and 1 + 2^-10
        assert_eq!(decimal_fp16("1.00048828125"), Some(1.0));
        assert_eq!(decimal_fp16("1.00048828125e0"), Some(1.0));
        // Within 2^-53 of the tie: f64 parsing lands on it; the text decides.
        assert_eq!(
            decimal_fp16("1.000488281250000000001"),
            Some(tie + 2f64.powi(-11))
        );
        assert_eq!(decimal_fp16("1.000488281249999999999"), Some(1.0));
        assert_eq!(
            decimal_fp16("10004.8828125000000000001e-4"),
            Some(tie + 2f64.powi(-11))
        );
        // 1 + 3 * 2^-11 is a tie between 1 + 2^-10 (odd) and 1 + 2^-9 (even).
        assert_eq!(decimal_fp16("1.00146484375"), Some(1.0 + 2f64.powi(-9)));
        // 65520 is halfway to 2^16: ties to even overflows, just below does not.
        assert_eq!(decimal_fp16("65519.99999999999999999"), Some(65504.0));
        assert_eq!(decimal_fp16("65520"), Some(f64::INFINITY));
        // 2^-25 is halfway between 0 and the smallest subnormal.
        assert_eq!(decimal_fp16("2.98023223876953125e-8"), Some(0.0));
        assert_eq!(
            decimal_fp16("2.980232238769531250000001e-8"),
            Some(2f64.powi(-24))
        );
        assert_eq!(decimal_fp16("0.0000000298023223876953124999"), Some(0.0));
        assert_eq!(decimal_fp16("abc"), None);
    }

    #[test]
    fn hex_floats_round_to_nearest_even() {
        assert_eq!(hex_float("0x1p-3", &FP16), Some(0.125));
        assert_eq!(hex_float("0x1.8p+1", &FP32), Some(3.0));
        // 1 + 2^-11 is halfway between fp16 1.0 and 1 + 2^-10: ties to even (1.0).
        assert_eq!(hex_float("0x1.002p0", &FP16), Some(1.0));
        // A sticky bit beyond the halfway point rounds up.
        assert_eq!(
            hex_float("0x1.00200000000000000000000000000001p0", &FP16),
            Some(1.0 + 1.0 / 1024.0)
        );
        // Smallest fp16 subnormal 2^-24; half of it ties to even (0).
        assert_eq!(hex_float("0x1p-24", &FP16), Some(2f64.powi(-24)));
        assert_eq!(hex_float("0x1p-25", &FP16), Some(0.0));
        assert_eq!(hex_float("0x1.8p-25", &FP16), Some(2f64.powi(-24)));
        // 65520 rounds past the largest fp16 (65504).
        assert_eq!(hex_float("0x1.ffcp15", &FP16), Some(65504.0));
        assert_eq!(hex_float("0x1.ffep15", &FP16), Some(f64::INFINITY));
        assert_eq!(hex_float("0x1p-149", &FP32), Some(2f64.powi(-149)));
        assert_eq!(
            hex_float("0x1p99999999999999999999", &FP32),
            Some(f64::INFINITY)
        );
        assert_eq!(hex_float("0x", &FP32), None);
        assert_eq!(hex_float("0x1.2.3", &FP32), None);
    }
}
