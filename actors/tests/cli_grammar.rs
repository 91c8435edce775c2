//! `rocmforge run --grammar FILE`, `--json-schema FILE|JSON` and `--json-object` on SmolLM2:
//! the same constraint the server's `grammar` and `response_format` build, through the same
//! runtime request; the output follows it (checked by hand here), and bad flags are errors
//! that name what was given.

use serde_json::Value as Json;
use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("actors/ has a parent")
        .to_path_buf()
}

fn model() -> String {
    let p = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "test model {} is missing", p.display());
    p.to_string_lossy().into_owned()
}

fn rocmforge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rocmforge"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("the rocmforge binary runs")
}

fn run_json(extra: &[&str]) -> Json {
    let m = model();
    let mut args = vec![
        "run",
        "--model",
        &m,
        "--json",
        "--threads",
        "2",
        "--backend",
        "cpu",
    ];
    args.extend_from_slice(extra);
    let out = rocmforge(&args);
    assert!(
        out.status.success(),
        "rocmforge {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

#[test]
fn grammar_file_gbnf_and_lark() {
    let dir = tempfile::tempdir().unwrap();
    let gbnf = dir.path().join("answer.gbnf");
    std::fs::write(&gbnf, "root ::= (\"yes\" | \"no\") \" \" [0-9]{1,3}\n").unwrap();
    let lark = dir.path().join("color.lark");
    std::fs::write(&lark, "%llguidance {}\nstart: (\"red\" | \"blue\") \"!\"\n").unwrap();
    for seed in ["1", "2"] {
        let j = run_json(&[
            "--prompt",
            "Answer:",
            "-n",
            "12",
            "--temp",
            "1",
            "--seed",
            seed,
            "--grammar",
            gbnf.to_str().unwrap(),
        ]);
        let t = j["text"].as_str().unwrap();
        let d = t.strip_prefix("yes ").or_else(|| t.strip_prefix("no "));
        assert!(
            d.is_some_and(|d| (1..=3).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit())),
            "{j}"
        );
        assert_eq!(j["stop_reason"], "eog", "{j}");
        let j = run_json(&[
            "--prompt",
            "Color:",
            "-n",
            "8",
            "--temp",
            "1",
            "--seed",
            seed,
            "--grammar",
            lark.to_str().unwrap(),
        ]);
        assert!(
            ["red!", "blue!"].contains(&j["text"].as_str().unwrap()),
            "{j}"
        );
    }
}

#[test]
fn json_schema_inline_or_file_and_json_object() {
    let schema = r#"{"type": "object", "properties": {"ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["ok", "n"],
        "additionalProperties": false}"#;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("schema.json");
    std::fs::write(&file, schema).unwrap();
    for given in [schema, file.to_str().unwrap()] {
        let j = run_json(&[
            "--prompt",
            "JSON:",
            "-n",
            "40",
            "--temp",
            "0",
            "--json-schema",
            given,
        ]);
        let v: Json = serde_json::from_str(j["text"].as_str().unwrap()).expect("JSON text");
        let o = v.as_object().expect("an object");
        assert_eq!(o.len(), 2, "{v}");
        assert!(o["ok"].is_boolean(), "{v}");
        assert!(o["n"].as_u64().is_some_and(|n| n <= 9), "{v}");
    }
    let j = run_json(&[
        "--prompt",
        "JSON:",
        "-n",
        "64",
        "--temp",
        "0",
        "--json-object",
    ]);
    let t = j["text"].as_str().unwrap();
    assert!(t.starts_with('{'), "{j}");
    if j["stop_reason"] == "eog" {
        assert!(serde_json::from_str::<Json>(t).unwrap().is_object(), "{j}");
    }
}

#[test]
fn bad_constraint_flags_are_errors() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gbnf");
    std::fs::write(&bad, "root ::= undefined-rule\n").unwrap();
    let missing = dir.path().join("missing.gbnf");
    for (flags, needle) in [
        (
            vec!["--grammar", missing.to_str().unwrap()],
            "cannot read grammar file",
        ),
        (vec!["--grammar", bad.to_str().unwrap()], "undefined-rule"),
        (vec!["--json-schema", "[1, 2]"], "--json-schema"),
        (vec!["--json-schema", "{\"type\": \"nope\"}"], "nope"),
        (
            vec!["--json-object", "--json-schema", "{}"],
            "cannot be used with",
        ),
    ] {
        let mut args = vec!["run", "--model", &m, "--prompt", "hi", "-n", "2"];
        args.extend(flags.iter().copied());
        let out = rocmforge(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} succeeded");
        assert!(err.contains(needle), "{flags:?}: {err}");
    }
}
