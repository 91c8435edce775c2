//! GBNF (llama.cpp's grammar format, `grammars/README.md` there) to llguidance's Lark syntax,
//! so a client or a grammar file written for llama.cpp works here unchanged. llguidance reads
//! Lark only (its GBNF converter is a Python script), so the translation is ours: a small
//! tokenizer over the GBNF text, rules re-emitted one a line.
//!
//! What maps to what:
//! - `name ::= ...` → a Lark rule `g_name: ...` (every name renamed, so that GBNF names with
//!   capitals do not become Lark terminals, and `root` → `start: g_root`);
//! - `"lit"` (escapes `\n \r \t \\ \" \xHH \uHHHH \UHHHHHHHH`) → a JSON-quoted Lark string;
//! - `[a-z\n]`, `[^"]` → a regex character class with every character written as `\x{HEX}`;
//! - `.` → any character; `( )`, `|`, `* + ?` and `{m}`, `{m,}`, `{m,n}` as they are;
//! - `# comments` dropped. A rule ends at a newline unless inside parentheses or right after
//!   `::=` or `|` (llama.cpp's rule).

use std::fmt::Write as _;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Name(String),
    Define,
    Lit(String),
    Class {
        negated: bool,
        items: Vec<(char, char)>,
    },
    Any,
    Bar,
    Open,
    Close,
    /// `*`, `+`, `?` or `{m,n}` as written.
    Repeat(String),
    Newline,
}

fn escape(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Result<char, String> {
    let c = chars.next().ok_or("a backslash at the end")?;
    let hex = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>, n: usize| {
        let s: String = (0..n).filter_map(|_| chars.next()).collect();
        u32::from_str_radix(&s, 16)
            .ok()
            .and_then(char::from_u32)
            .ok_or_else(|| format!("bad escape \\{c}{s}"))
    };
    Ok(match c {
        'n' => '\n',
        'r' => '\r',
        't' => '\t',
        'x' => hex(chars, 2)?,
        'u' => hex(chars, 4)?,
        'U' => hex(chars, 8)?,
        other => other,
    })
}

fn tokenize(src: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = src.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            '\n' => {
                chars.next();
                out.push(Tok::Newline);
            }
            c if c.is_whitespace() => {
                chars.next();
            }
            '#' => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
            }
            ':' => {
                chars.next();
                if chars.next() != Some(':') || chars.next() != Some('=') {
                    return Err("expected ::=".into());
                }
                out.push(Tok::Define);
            }
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None => return Err("unterminated string".into()),
                        Some('"') => break,
                        Some('\\') => s.push(escape(&mut chars)?),
                        Some(c) => s.push(c),
                    }
                }
                out.push(Tok::Lit(s));
            }
            '[' => {
                chars.next();
                let negated = chars.next_if_eq(&'^').is_some();
                let mut items = Vec::new();
                loop {
                    let lo = match chars.next() {
                        None => return Err("unterminated character class".into()),
                        Some(']') => break,
                        Some('\\') => escape(&mut chars)?,
                        Some(c) => c,
                    };
                    let mut hi = lo;
                    let mut ahead = chars.clone();
                    if ahead.next() == Some('-') && ahead.peek().is_some_and(|&c| c != ']') {
                        chars.next();
                        hi = match chars.next() {
                            Some('\\') => escape(&mut chars)?,
                            Some(c) => c,
                            None => return Err("unterminated character class".into()),
                        };
                        if hi < lo {
                            return Err(format!("empty range {lo:?}-{hi:?}"));
                        }
                    }
                    items.push((lo, hi));
                }
                out.push(Tok::Class { negated, items });
            }
            '.' => {
                chars.next();
                out.push(Tok::Any);
            }
            '|' => {
                chars.next();
                out.push(Tok::Bar);
            }
            '(' => {
                chars.next();
                out.push(Tok::Open);
            }
            ')' => {
                chars.next();
                out.push(Tok::Close);
            }
            '*' | '+' | '?' => {
                chars.next();
                out.push(Tok::Repeat(c.to_string()));
            }
            '{' => {
                let mut s = String::new();
                for c in chars.by_ref() {
                    s.push(c);
                    if c == '}' {
                        break;
                    }
                }
                let inner = &s[1..s.len().saturating_sub(1)];
                let ok = s.ends_with('}')
                    && !inner.is_empty()
                    && inner
                        .chars()
                        .all(|c| c.is_ascii_digit() || c == ',' || c == ' ')
                    && inner.matches(',').count() <= 1;
                if !ok {
                    return Err(format!("bad repetition {s:?}"));
                }
                out.push(Tok::Repeat(s.replace(' ', "")));
            }
            c if c.is_ascii_alphanumeric() || c == '-' || c == '_' => {
                let mut s = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        s.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Name(s));
            }
            other => return Err(format!("unexpected character {other:?}")),
        }
    }
    Ok(out)
}

/// A Lark rule name for GBNF's `name`: distinct for distinct names, lowercase.
fn rule_name(name: &str) -> String {
    let mut s = String::from("g_");
    for c in name.chars() {
        match c {
            'A'..='Z' => {
                s.push_str("_u");
                s.push(c.to_ascii_lowercase());
            }
            '-' => s.push_str("_d"),
            '_' => s.push_str("__"),
            c => s.push(c),
        }
    }
    s
}

fn class_regex(negated: bool, items: &[(char, char)]) -> String {
    let mut s = String::from("/[");
    if negated {
        s.push('^');
    }
    for &(lo, hi) in items {
        let _ = write!(s, "\\x{{{:X}}}", lo as u32);
        if hi != lo {
            let _ = write!(s, "-\\x{{{:X}}}", hi as u32);
        }
    }
    s.push_str("]/");
    s
}

/// The Lark text of a GBNF grammar (which must define `root`).
pub fn to_lark(src: &str) -> Result<String, String> {
    let toks = tokenize(src)?;
    let mut rules: Vec<(String, String)> = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Newline => {
                i += 1;
                continue;
            }
            Tok::Name(n) if toks.get(i + 1) == Some(&Tok::Define) => {
                let name = n.clone();
                i += 2;
                let mut body = String::new();
                let mut depth = 0usize;
                // A newline is inside the rule right after `::=` or `|` and within parentheses.
                let mut continues = true;
                while i < toks.len() {
                    let t = &toks[i];
                    if *t == Tok::Newline {
                        if depth == 0 && !continues {
                            break;
                        }
                        i += 1;
                        continue;
                    }
                    if let (Tok::Name(_), Some(Tok::Define)) = (t, toks.get(i + 1)) {
                        if depth == 0 {
                            break;
                        }
                        return Err(format!("rule {name}: unclosed parenthesis"));
                    }
                    continues = matches!(t, Tok::Bar);
                    if !body.is_empty() {
                        body.push(' ');
                    }
                    match t {
                        Tok::Name(r) => body.push_str(&rule_name(r)),
                        Tok::Lit(s) => {
                            body.push_str(&serde_json::Value::from(s.as_str()).to_string())
                        }
                        Tok::Class { negated, items } => {
                            body.push_str(&class_regex(*negated, items))
                        }
                        Tok::Any => body.push_str("/(?s:.)/"),
                        Tok::Bar => body.push('|'),
                        Tok::Open => {
                            depth += 1;
                            body.push('(');
                        }
                        Tok::Close => {
                            depth = depth
                                .checked_sub(1)
                                .ok_or_else(|| format!("rule {name}: unmatched ')'"))?;
                            body.push(')');
                        }
                        Tok::Repeat(r) => {
                            // Postfix: glued to what it repeats.
                            body.pop();
                            body.push_str(r);
                        }
                        Tok::Define | Tok::Newline => unreachable!("handled above"),
                    }
                    i += 1;
                }
                if depth != 0 {
                    return Err(format!("rule {name}: unclosed parenthesis"));
                }
                if body.is_empty() {
                    // An empty rule matches the empty string.
                    body.push_str("\"\"");
                }
                if rules.iter().any(|(n, _)| n == &name) {
                    return Err(format!("rule {name} is defined twice"));
                }
                rules.push((name, body));
            }
            other => return Err(format!("expected a rule `name ::= ...`, found {other:?}")),
        }
    }
    if !rules.iter().any(|(n, _)| n == "root") {
        return Err("the grammar has no `root` rule".into());
    }
    for t in &toks {
        if let Tok::Name(n) = t {
            if !rules.iter().any(|(r, _)| r == n) {
                return Err(format!("rule {n} is used but not defined"));
            }
        }
    }
    let mut out = String::from("%llguidance {}\nstart: g_root\n");
    for (name, body) in rules {
        let _ = writeln!(out, "{}: {body}", rule_name(&name));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_the_constructs() {
        let g = r#"
# yes or no, then digits
root ::= answer " " num{1,3} ( "!" | [^a-c\n] )*
answer ::=
    "yes" |
    "no\x21"
num ::= [0-9] .
"#;
        let l = to_lark(g).unwrap();
        assert!(l.contains("start: g_root\n"), "{l}");
        assert!(
            l.contains(r#"g_root: g_answer " " g_num{1,3} ( "!" | /[^\x{61}-\x{63}\x{A}]/ )*"#),
            "{l}"
        );
        assert!(l.contains(r#"g_answer: "yes" | "no!""#), "{l}");
        assert!(l.contains(r#"g_num: /[\x{30}-\x{39}]/ /(?s:.)/"#), "{l}");
    }

    #[test]
    fn errors_are_reported() {
        for bad in [
            "root ::= \"a",
            "root ::= [a-",
            "root ::= (\"a\"",
            "root ::= other",
            "start ::= \"a\"",
            "root ::= \"a\"\nroot ::= \"b\"",
            "root ::= \"a\"{x}",
            "root = \"a\"",
        ] {
            assert!(to_lark(bad).is_err(), "{bad:?} converted");
        }
    }
}
