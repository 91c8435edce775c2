//! End-to-end tests of `rocmforge run` and `rocmforge bench` on SmolLM2 (the binary, through
//! `CARGO_BIN_EXE_rocmforge`), including the bad-input errors a user can cause.

use rocmforge::gguf::{write_to_vec, Metadata, Value};
use serde_json::Value as Json;
use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("actors/ has a parent")
        .to_path_buf()
}

fn model() -> PathBuf {
    let p = std::env::var_os("ROCMFORGE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        p.exists(),
        "test model {} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
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
        m.to_str().unwrap(),
        "--json",
        "--threads",
        "2",
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

fn ids(j: &Json, key: &str) -> Vec<u64> {
    j[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} missing in {j}"))
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

fn reference_case(name: &str) -> Json {
    let p = root().join("tests/data/smollm2-logits/cases.json");
    let cases: Json = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    cases
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
        .clone()
}

/// The prompt tokenizes as the reference does and greedy decoding follows the reference up to
/// step 8 (its first near-tie is at step 18).
#[test]
fn run_greedy_json_matches_reference() {
    let case = reference_case("plain_english");
    let prompt = case["prompt"].as_str().unwrap();
    let j = run_json(&["--prompt", prompt, "-n", "8", "--temp", "0"]);
    assert_eq!(ids(&j, "prompt_ids"), ids(&case, "hf_prompt_ids"));
    assert_eq!(ids(&j, "ids"), ids(&case, "hf_greedy_ids")[..8].to_vec());
    let text = j["text"].as_str().unwrap();
    assert!(
        case["hf_greedy_text"].as_str().unwrap().starts_with(text),
        "{text:?}"
    );
    assert!(
        j["timings"]["gen"]["prompt_tokens_per_second"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

#[test]
fn sampling_is_reproducible_and_top_k_1_is_greedy() {
    let p = ["--prompt", "Once upon a time", "-n", "12"];
    let a = run_json(&[&p[..], &["--temp", "0.9", "--seed", "7"]].concat());
    let b = run_json(&[&p[..], &["--temp", "0.9", "--seed", "7"]].concat());
    assert_eq!(a["text"], b["text"]);
    assert_eq!(ids(&a, "ids"), ids(&b, "ids"));
    let greedy = run_json(&[&p[..], &["--temp", "0"]].concat());
    let top1 = run_json(&[&p[..], &["--temp", "1.5", "--top-k", "1", "--seed", "3"]].concat());
    assert_eq!(ids(&greedy, "ids"), ids(&top1, "ids"));
}

fn expect_error(args: &[&str], needle: &str) {
    let out = rocmforge(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(
        err.contains(needle),
        "{args:?}: stderr {err:?} lacks {needle:?}"
    );
}

#[test]
fn empty_prompt_is_an_error() {
    let m = model();
    expect_error(
        &["run", "--model", m.to_str().unwrap(), "--prompt", ""],
        "empty prompt",
    );
}

#[test]
fn prompt_longer_than_context_is_an_error() {
    let m = model();
    let long = "word ".repeat(40);
    expect_error(
        &[
            "run",
            "--model",
            m.to_str().unwrap(),
            "--ctx",
            "16",
            "--prompt",
            &long,
        ],
        "the prompt has 41 tokens, the context holds 16",
    );
}

#[test]
fn invalid_utf8_prompt_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("prompt.txt");
    std::fs::write(&f, b"hello \xff\xfe world").unwrap();
    let m = model();
    expect_error(
        &[
            "run",
            "--model",
            m.to_str().unwrap(),
            "--prompt-file",
            f.to_str().unwrap(),
        ],
        "not valid UTF-8 (first bad byte at offset 6)",
    );
}

#[test]
fn unsupported_architecture_is_an_error() {
    let mut md = Metadata::new();
    md.insert("general.architecture", Value::String("gpt2".into()));
    md.insert("gpt2.context_length", Value::U32(128));
    let bytes = write_to_vec(&md, &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("gpt2.gguf");
    std::fs::write(&f, bytes).unwrap();
    expect_error(
        &["run", "--model", f.to_str().unwrap(), "--prompt", "hi"],
        "unsupported architecture \"gpt2\"",
    );
}

#[test]
fn bench_json_reports_pp_tg_and_batched_tg() {
    let m = model();
    let out = rocmforge(&[
        "bench",
        "--model",
        m.to_str().unwrap(),
        "-p",
        "16",
        "-n",
        "4",
        "-d",
        "8",
        "-r",
        "2",
        "--parallel",
        // 20: more than the default request queue (16) takes at once.
        "3,20",
        "--json",
        "--threads",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: Json = serde_json::from_slice(&out.stdout).unwrap();
    let tests: Vec<&str> = j
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["test"].as_str().unwrap())
        .collect();
    assert_eq!(tests, ["pp16", "tg4@d8", "tg4x3@d8", "tg4x20@d8"]);
    for t in j.as_array().unwrap() {
        assert_eq!(t["samples"].as_array().unwrap().len(), 2);
        assert!(t["tokens_per_second"].as_f64().unwrap() > 0.0);
        assert_eq!(t["backend"], "cpu");
        assert_eq!(t["threads"], 2);
    }
}

/// SmolLM2 with `tokenizer.ggml.pre` replaced: the model loads, the tokenizer refuses.
#[test]
fn unknown_pre_tokenizer_is_an_error() {
    use rocmforge::gguf::{GgufFile, GgufWriter, TensorSpec};
    let src = GgufFile::open(model()).unwrap();
    let mut md = src.metadata().clone();
    md.insert("tokenizer.ggml.pre", Value::String("no-such-pre".into()));
    let specs: Vec<TensorSpec> = src
        .tensors()
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            shape: t.shape.clone(),
            ggml_type: t.ggml_type,
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("odd-pre.gguf");
    let out = std::io::BufWriter::new(std::fs::File::create(&f).unwrap());
    let mut w = GgufWriter::new(out, &md, &specs).unwrap();
    for t in src.tensors() {
        w.write_tensor(src.tensor_data(t)).unwrap();
    }
    w.finish().unwrap();
    expect_error(
        &["run", "--model", f.to_str().unwrap(), "--prompt", "hi"],
        "no-such-pre",
    );
}

/// A counting prompt that greedy decoding continues without ending the text, so the context
/// fills before an end-of-generation token.
const COUNTING: &str = "1, 2, 3, 4, 5, 6, 7, 8,";

/// `-n` far beyond the context once aborted on a 400 GB allocation: it is bounded by the context
/// and filling the context is a normal finish, on the direct and the pipelined path alike.
#[test]
fn huge_n_predict_stops_cleanly_at_the_context() {
    for extra in [&[][..], &["--pipeline"][..]] {
        let mut args = vec![
            "--prompt",
            COUNTING,
            "-n",
            "99999999999",
            "--ctx",
            "40",
            "--temp",
            "0",
            "--backend",
            "cpu",
        ];
        args.extend_from_slice(extra);
        let j = run_json(&args);
        assert_eq!(j["stop_reason"], "context", "{extra:?}: {j}");
        let n = ids(&j, "prompt_ids").len() + ids(&j, "ids").len();
        assert!(n <= 41, "{extra:?}: {n} tokens in a context of 40");
    }
}

/// No seed: a random one, reported; the same seed: the same tokens.
#[test]
fn seeds_are_random_unless_given_and_reported() {
    let sampled = |extra: &[&str]| {
        let mut args = vec![
            "--prompt",
            "Tell me a story",
            "-n",
            "12",
            "--temp",
            "1.5",
            "--top-k",
            "0",
            "--top-p",
            "1",
            "--min-p",
            "0",
            "--backend",
            "cpu",
        ];
        args.extend_from_slice(extra);
        let j = run_json(&args);
        (j["seed"].as_u64().expect("seed reported"), ids(&j, "ids"))
    };
    let (s1, _) = sampled(&[]);
    let (s2, _) = sampled(&[]);
    assert_ne!(s1, s2, "two runs without a seed drew the same one");
    let (a_seed, a) = sampled(&["--seed", "42"]);
    let (b_seed, b) = sampled(&["-s", "42", "--pipeline"]);
    assert_eq!((a_seed, b_seed), (42, 42));
    assert_eq!(
        a, b,
        "the same seed gave different tokens (direct vs pipelined)"
    );
}

/// The CLI's sampling defaults are `SamplingParams::default()`'s (the server's and the API's).
#[test]
fn cli_sampling_defaults_match_the_shared_defaults() {
    let d = rocmforge::sample::SamplingParams::default();
    let out = rocmforge(&["run", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, v) in [
        ("--temp", d.temperature.to_string()),
        ("--top-k", d.top_k.to_string()),
        ("--top-p", d.top_p.to_string()),
        ("--min-p", d.min_p.to_string()),
        ("--repeat-penalty", d.repeat_penalty.to_string()),
    ] {
        // Long help: the flag's line, its description, then `[default: v]`.
        let default_line = help
            .lines()
            .skip_while(|l| !l.trim_start().starts_with(flag))
            .find(|l| l.contains("[default"))
            .unwrap_or_else(|| panic!("{flag} has no default in {help}"));
        assert!(
            default_line.contains(&format!("[default: {v}]")),
            "{flag}: expected default {v}, help says {default_line:?}"
        );
    }
}

/// `quantize`: SmolLM2 (Q4_1) rewritten as Q8_0 loads, says what it did, and still answers the
/// reference question greedily; a bad type and the input as output are errors that leave
/// nothing behind.
#[test]
fn quantize_rewrites_a_model_that_still_runs() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let quantize = |out: &std::path::Path, ty: &str| {
        let o = rocmforge(&[
            "quantize",
            m.to_str().unwrap(),
            out.to_str().unwrap(),
            "--type",
            ty,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        o
    };
    let out = dir.path().join("smollm2-q8_0.gguf");
    let o = quantize(&out, "q8_0");
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains("Q4_1 -> Q8_0") && said.contains("F32 kept"),
        "{said}"
    );
    let f = rocmforge::gguf::GgufFile::open(&out).unwrap();
    assert!(f
        .tensors()
        .iter()
        .filter(|t| t.shape.len() == 2)
        .all(|t| t.ggml_type == rocmforge::quant::GgmlType::Q8_0));
    let r = rocmforge(&[
        "run",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "-n",
        "3",
        "--temp",
        "0",
        "--backend",
        "cpu",
        "--threads",
        "2",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(text.starts_with(" Paris"), "{text:?}");
    // The Q4_K_M mix: Q6_K for some layers' ffn_down (1,536-element rows; SmolLM2's
    // 576-element rows are not whole super-blocks and fall back to Q8_0), file type 15.
    let mix = dir.path().join("smollm2-q4_k_m.gguf");
    quantize(&mix, "q4_k_m");
    let f = rocmforge::gguf::GgufFile::open(&mix).unwrap();
    let down = |i: usize| {
        let name = format!("blk.{i}.ffn_down.weight");
        f.tensors()
            .iter()
            .find(|t| t.name == name)
            .unwrap()
            .ggml_type
    };
    use rocmforge::quant::GgmlType::{Q4_K, Q6_K};
    assert_eq!(
        (down(0), down(3), down(5), down(29)),
        (Q6_K, Q4_K, Q6_K, Q6_K)
    );
    assert_eq!(
        f.metadata().get("general.file_type"),
        Some(&rocmforge::gguf::Value::U32(15))
    );
    expect_error(
        &[
            "quantize",
            m.to_str().unwrap(),
            "/tmp/never.gguf",
            "--type",
            "q9_9",
        ],
        "unknown type \"q9_9\"",
    );
    expect_error(
        &[
            "quantize",
            out.to_str().unwrap(),
            out.to_str().unwrap(),
            "--type",
            "q4_0",
        ],
        "is the input file",
    );
    assert!(!std::path::Path::new("/tmp/never.gguf").exists());
}

/// `--explain` on the CPU: the placement under the budget (some layers streamed), then the
/// expected decode rate from the rates measured at start.
#[test]
fn explain_prints_the_placement_and_an_expected_rate() {
    let m = model();
    let out = rocmforge(&[
        "run",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "Hi",
        "-n",
        "1",
        "--memory-budget",
        "40%",
        "--explain",
        "--backend",
        "cpu",
        "--threads",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("placement: budget"), "{err}");
    assert!(err.contains("streamed each token"), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("expected decode: ~"))
        .unwrap_or_else(|| panic!("no expected rate in {err}"));
    assert!(
        line.contains("measured on Q4_1") && line.contains("Mmap mode"),
        "{line}"
    );
}
