//! `anemone mil fmt`: the canonical text of [`emit`](super::emit::emit) with
//! the source's `//` comments kept, so formatting a file in place loses
//! nothing but whitespace.
//!
//! A comment on a line of its own goes before the statement that follows it
//! in the source (indented like it), or before the function's closing line
//! when no statement follows; comments above the `func` line stay at the top
//! of the file, comments after the program's last `}` at the end. A comment
//! after code on the same line stays at the end of that statement's line.
//! Comments inside a statement that spans several lines move before it.

use std::collections::HashMap;

use super::emit::emit;
use super::parse::parse_with_lines;
use crate::Result;

/// One `//` comment of the source.
struct Comment {
    /// 1-based line.
    line: usize,
    /// From `//` to the end of the line, trailing whitespace removed.
    text: String,
    /// Code precedes it on its line.
    trailing: bool,
}

/// Where a comment goes in the output.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Place {
    Top,
    /// Before statement `i` (on its own line), or at the end of its line.
    Before(usize),
    After(usize),
    /// Before the function's closing `} -> (...)` line.
    BeforeClose,
    End,
}

/// Format MIL `text` canonically, keeping its comments.
pub fn format(text: &str) -> Result<String> {
    let (program, lines) = parse_with_lines(text)?;
    let comments = comments(text);
    let canonical = emit(&program);
    if comments.is_empty() {
        return Ok(canonical);
    }
    // The source line of each statement: that of its first result.
    let op_lines: Vec<usize> = program
        .main
        .ops
        .iter()
        .map(|op| {
            op.outputs
                .first()
                .and_then(|v| lines.get(&v.name).copied())
                .unwrap_or(0)
        })
        .collect();
    let source: Vec<&str> = text.lines().collect();
    let func_line = source
        .iter()
        .position(|l| l.trim_start().starts_with("func "))
        .map_or(0, |i| i + 1);
    let close_line = source
        .iter()
        .rposition(|l| l.trim_start().starts_with('}') && l.contains("->"))
        .map_or(usize::MAX, |i| i + 1);
    let mut placed: HashMap<Place, Vec<String>> = HashMap::new();
    for comment in &comments {
        let place = if comment.trailing
            && let Some(i) = op_lines.iter().position(|&l| l == comment.line)
        {
            Place::After(i)
        } else if comment.line < func_line {
            Place::Top
        } else if comment.line > close_line {
            Place::End
        } else {
            match op_lines.iter().position(|&l| l > comment.line) {
                Some(i) => Place::Before(i),
                None => Place::BeforeClose,
            }
        };
        placed.entry(place).or_default().push(comment.text.clone());
    }
    Ok(weave(&canonical, program.main.ops.len(), &placed))
}

/// The canonical text with the comments inserted at their places.
fn weave(canonical: &str, n_ops: usize, placed: &HashMap<Place, Vec<String>>) -> String {
    let mut out = String::new();
    let own_lines = |out: &mut String, place: Place, indent: &str| {
        for text in placed.get(&place).into_iter().flatten() {
            out.push_str(&format!("{indent}{text}\n"));
        }
    };
    own_lines(&mut out, Place::Top, "");
    // The canonical text: header lines, one line per statement (indented 8),
    // the closing line and the program's `}`.
    let lines: Vec<&str> = canonical.lines().collect();
    let first_op = lines
        .iter()
        .position(|l| l.starts_with("    func "))
        .map_or(0, |i| i + 1);
    for (i, line) in lines.iter().enumerate() {
        let op = i.checked_sub(first_op).filter(|&k| k < n_ops);
        if let Some(k) = op {
            own_lines(&mut out, Place::Before(k), "        ");
        }
        if i == first_op + n_ops {
            own_lines(&mut out, Place::BeforeClose, "        ");
        }
        out.push_str(line);
        if let Some(k) = op {
            for text in placed.get(&Place::After(k)).into_iter().flatten() {
                out.push(' ');
                out.push_str(text);
            }
        }
        out.push('\n');
    }
    own_lines(&mut out, Place::End, "");
    out
}

/// The `//` comments of `text`, outside string literals.
fn comments(text: &str) -> Vec<Comment> {
    let mut out = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let mut in_string = false;
        let mut escaped = false;
        let mut previous = ' ';
        for (at, c) in line.char_indices() {
            if in_string {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => in_string = false,
                    _ => {}
                }
            } else if c == '"' {
                in_string = true;
            } else if c == '/' && previous == '/' {
                let start = at - 1;
                out.push(Comment {
                    line: index + 1,
                    text: line[start..].trim_end().to_string(),
                    trailing: !line[..start].trim().is_empty(),
                });
                break;
            }
            previous = if in_string { ' ' } else { c };
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = "// a kernel that adds\nprogram(1.3)\n\
        [buildInfo = dict<string, string>({{\"coremlc-component-MIL\", \"3510.2.1\"}})]\n{\n\
        func main<ios18>(tensor<fp32, [2]> x) {\n\
        // the sum\n\
        tensor<fp32, [2]> y = add(x = x, y = x)[name = string(\"y\")]; // twice x\n\
        tensor<fp32, [2]> z = mul(x = y, y = y)[name = string(\"z // not a comment\")];\n\
        // nothing after this\n\
        } -> (z);\n}\n// the end\n";

    #[test]
    fn comments_survive_formatting_in_place() {
        let formatted = format(SOURCE).unwrap();
        let lines: Vec<&str> = formatted.lines().collect();
        assert_eq!(lines[0], "// a kernel that adds");
        let y = lines.iter().position(|l| l.contains("= add(")).unwrap();
        assert_eq!(lines[y - 1], "        // the sum");
        assert!(lines[y].ends_with("; // twice x"), "{}", lines[y]);
        let close = lines
            .iter()
            .position(|l| l.starts_with("    } -> "))
            .unwrap();
        assert_eq!(lines[close - 1], "        // nothing after this");
        assert_eq!(lines.last(), Some(&"// the end"));
        assert_eq!(formatted.matches("//").count(), 6, "{formatted}");
        // Formatting is idempotent and the program is unchanged.
        assert_eq!(format(&formatted).unwrap(), formatted);
        assert_eq!(
            super::super::parse(&formatted).unwrap(),
            super::super::parse(SOURCE).unwrap()
        );
    }

    #[test]
    fn a_file_without_comments_is_the_canonical_text() {
        let source: String = SOURCE
            .lines()
            .filter(|l| !l.starts_with("//"))
            .map(|l| format!("{}\n", l.replace("; // twice x", ";")))
            .collect();
        assert!(comments(&source).is_empty(), "{source}");
        let canonical = emit(&super::super::parse(&source).unwrap());
        assert_eq!(format(&source).unwrap(), canonical);
    }
}
