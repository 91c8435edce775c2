//! A small parser for the Prometheus text exposition format (0.0.4): `# HELP`, `# TYPE`, and
//! samples `name{label="value",...} value [timestamp]`. Enough to check our own `/metrics` page
//! and to read it from the load generator; it rejects what it does not understand.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Default, Clone)]
pub struct Exposition {
    /// Metric family name -> `counter`, `gauge`, `histogram`, ...
    pub types: BTreeMap<String, String>,
    pub help: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl Exposition {
    /// The value of the sample `name` whose labels include all of `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    /// Sum over every sample named `name`.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    is_name_start(c) || c.is_ascii_digit()
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

pub fn parse(text: &str) -> Result<Exposition, ParseError> {
    let mut out = Exposition::default();
    for (i, raw) in text.lines().enumerate() {
        let err = |m: &str| ParseError {
            line: i + 1,
            message: format!("{m}: {raw:?}"),
        };
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let mut parts = c.trim_start().splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("TYPE"), Some(name), Some(ty)) => {
                    let ty = ty.trim();
                    if !matches!(
                        ty,
                        "counter" | "gauge" | "histogram" | "summary" | "untyped"
                    ) {
                        return Err(err("unknown metric type"));
                    }
                    out.types.insert(name.to_string(), ty.to_string());
                }
                (Some("HELP"), Some(name), help) => {
                    out.help
                        .insert(name.to_string(), help.unwrap_or("").to_string());
                }
                // Other comments are allowed and ignored.
                _ => {}
            }
            continue;
        }
        let mut chars = line.char_indices().peekable();
        let name_end = loop {
            match chars.peek() {
                Some(&(0, c)) if !is_name_start(c) => return Err(err("bad metric name")),
                Some(&(_, c)) if is_name_char(c) => {
                    chars.next();
                }
                Some(&(j, _)) => break j,
                None => return Err(err("sample without value")),
            }
        };
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(r) = rest.strip_prefix('{') {
            let mut r = r;
            loop {
                r = r.trim_start();
                if let Some(after) = r.strip_prefix('}') {
                    rest = after;
                    break;
                }
                let eq = r.find('=').ok_or_else(|| err("label without '='"))?;
                let key = r[..eq].trim();
                if key.is_empty() || !key.chars().all(is_name_char) {
                    return Err(err("bad label name"));
                }
                let v = r[eq + 1..]
                    .strip_prefix('"')
                    .ok_or_else(|| err("label value not quoted"))?;
                let mut value = String::new();
                let mut it = v.char_indices();
                let end = loop {
                    match it.next() {
                        Some((j, '"')) => break j,
                        Some((_, '\\')) => match it.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c @ ('\\' | '"'))) => value.push(c),
                            _ => return Err(err("bad escape in label value")),
                        },
                        Some((_, c)) => value.push(c),
                        None => return Err(err("unterminated label value")),
                    }
                };
                labels.insert(key.to_string(), value);
                r = v[end + 1..].trim_start();
                r = r.strip_prefix(',').unwrap_or(r);
            }
        }
        let mut fields = rest.split_whitespace();
        let value = fields
            .next()
            .and_then(parse_value)
            .ok_or_else(|| err("bad sample value"))?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| err("bad timestamp"))?;
        }
        if fields.next().is_some() {
            return Err(err("trailing fields"));
        }
        out.samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_types_labels_and_values() {
        let t = "# HELP a_total things\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"z\"} 3\n\
                 h_bucket{le=\"+Inf\"} 2 1700000000\nh_sum 1.5e-3\n";
        let e = parse(t).unwrap();
        assert_eq!(e.types["a_total"], "counter");
        assert_eq!(e.get("a_total", &[("y", "q\"z")]), Some(3.0));
        assert_eq!(e.get("h_bucket", &[("le", "+Inf")]), Some(2.0));
        assert_eq!(e.get("h_sum", &[]), Some(0.0015));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("1abc 3\n").is_err());
        assert!(parse("a{x=1} 3\n").is_err());
        assert!(parse("a 3 4 5\n").is_err());
        assert!(parse("a{x=\"1\" 3\n").is_err());
        assert!(parse("a notanumber\n").is_err());
    }
}
