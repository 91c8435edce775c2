//! `run`, `inspect` and `serve` on crafted files (issue #15): a vocabulary mismatch and a KV
//! cache that cannot fit are clear errors with a non-zero exit (`serve` before it listens), a
//! context larger than memory is capped, and nothing aborts.

use rocmforge::gguf::{write_to_vec, TensorSpec, Value};
use rocmforge::model::{names::arch_key, tensor_name, ArchKey, TensorKind};
use rocmforge::quant::GgmlType;
use rocmforge::synth::{plan, Preset, SynthConfig};
use rocmforge_actors::cli::KV_LIMIT_ENV;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Built-in tokenizer size of the tiny preset (256 bytes, bos, eos).
const TOKENS: u64 = 258;

/// A one-layer tiny-preset llama with zero f16 weights written to `dir/name`: `embd_rows`
/// embedding and output rows, `<arch>.vocab_size` = `vocab_size`, and `extra` keys on top.
fn tiny(
    dir: &Path,
    name: &str,
    embd_rows: u64,
    vocab_size: u64,
    extra: &[(ArchKey, u32)],
) -> PathBuf {
    let cfg = SynthConfig {
        preset: Preset::Tiny,
        qtype: GgmlType::F16,
        seed: 1,
        tokenizer: None,
    };
    let (mut md, specs) = plan(&cfg).unwrap();
    let key = |k| arch_key("llama", k);
    md.insert(key(ArchKey::BlockCount), Value::U32(1));
    md.insert(key(ArchKey::VocabSize), Value::U32(vocab_size as u32));
    for &(k, v) in extra {
        md.insert(key(k), Value::U32(v));
    }
    let get = |k| md.get_u64(&key(k)).unwrap();
    let n_head = get(ArchKey::HeadCount).unwrap();
    let n_head_kv = get(ArchKey::HeadCountKv).unwrap();
    let e = get(ArchKey::EmbeddingLength).unwrap();
    let ff = get(ArchKey::FeedForwardLength).unwrap();
    let head_dim = get(ArchKey::KeyLength).unwrap_or(e / n_head);
    let (q, kv) = (n_head * head_dim, n_head_kv * head_dim);
    let global = |k| tensor_name(k, None);
    let layer = |k| tensor_name(k, Some(0));
    let tensors: Vec<(TensorSpec, Vec<u8>)> = specs
        .into_iter()
        .filter(|s| !s.name.starts_with("blk.") || s.name.starts_with("blk.0."))
        .map(|mut s| {
            // Shapes follow the (possibly overridden) widths and head counts.
            let n = &s.name;
            s.shape = if *n == global(TensorKind::TokenEmbd) || *n == global(TensorKind::Output) {
                vec![e, embd_rows]
            } else if *n == layer(TensorKind::AttnQ) {
                vec![e, q]
            } else if *n == layer(TensorKind::AttnK) || *n == layer(TensorKind::AttnV) {
                vec![e, kv]
            } else if *n == layer(TensorKind::AttnOutput) {
                vec![q, e]
            } else if *n == layer(TensorKind::FfnGate) || *n == layer(TensorKind::FfnUp) {
                vec![e, ff]
            } else if *n == layer(TensorKind::FfnDown) {
                vec![ff, e]
            } else {
                vec![e] // norms
            };
            let n: u64 = s.shape.iter().product();
            let bytes = n as usize * if s.ggml_type == GgmlType::F32 { 4 } else { 2 };
            (s, vec![0u8; bytes])
        })
        .collect();
    let p = dir.join(name);
    std::fs::write(&p, write_to_vec(&md, &tensors).unwrap()).unwrap();
    p
}

fn rocmforge(args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_rocmforge"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("the rocmforge binary runs");
    // An exit code, not a signal: an abort (SIGABRT) has none.
    assert!(
        out.status.code().is_some(),
        "rocmforge {args:?} was killed by a signal: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run(model: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut args = vec!["run", "--model", model.to_str().unwrap(), "--threads", "2"];
    args.extend_from_slice(&["--prompt", "hi", "-n", "2", "--temp", "0"]);
    args.extend_from_slice(extra);
    rocmforge(&args, env)
}

/// A huge trained context and 8 KV heads of width 256: 8 KiB of f16 KV per token, so asking for
/// the whole 2^24-token context wants 128 GiB (+ scores) from a 2 MB file.
fn huge_context(dir: &Path) -> PathBuf {
    tiny(
        dir,
        "huge-ctx.gguf",
        TOKENS,
        TOKENS,
        &[
            (ArchKey::ContextLength, 1 << 24),
            (ArchKey::EmbeddingLength, 64),
            (ArchKey::HeadCount, 8),
            (ArchKey::HeadCountKv, 8),
            (ArchKey::KeyLength, 256),
            (ArchKey::ValueLength, 256),
            (ArchKey::RopeDimensionCount, 256),
            (ArchKey::FeedForwardLength, 64),
        ],
    )
}

#[test]
fn a_context_larger_than_memory_is_capped_not_aborted() {
    let dir = tempfile::tempdir().unwrap();
    let m = huge_context(dir.path());
    // Half of MemAvailable holds far fewer than 2^24 tokens of 8 KiB on any test machine.
    let out = run(&m, &["--ctx", "16777216"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("capped"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_kv_cache_that_cannot_fit_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let m = huge_context(dir.path());
    // 1 MiB holds 127 tokens: below the 256 a capped context keeps.
    let env = [(KV_LIMIT_ENV, "1048576")];
    let out = run(&m, &[], &env);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("KV cache of 4096 tokens"), "{err}");
    let out = rocmforge(&["inspect", m.to_str().unwrap()], &env);
    assert!(!out.status.success(), "inspect exited 0");
    assert!(text(&out.stdout).contains("validation: PROBLEMS"));
    assert!(
        text(&out.stdout).contains("KV cache"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn a_vocab_mismatch_fails_run_and_inspect() {
    let dir = tempfile::tempdir().unwrap();
    // 258 tokens, 200 embedding rows (vocab_size agrees with the rows).
    let m = tiny(dir.path(), "vocab.gguf", 200, 200, &[]);
    let out = run(&m, &[], &[]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("vocabulary mismatch"), "{err}");
    assert!(err.contains("258") && err.contains("200"), "{err}");

    let out = rocmforge(&["inspect", m.to_str().unwrap()], &[]);
    assert!(!out.status.success(), "inspect exited 0");
    let so = text(&out.stdout);
    assert!(so.contains("validation: PROBLEMS"), "{so}");
    assert!(so.contains("vocabulary mismatch"), "{so}");
    let out = rocmforge(&["inspect", "--json", m.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["validation"]["ok"], false);
}

#[test]
fn a_padded_vocabulary_validates_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny(dir.path(), "padded.gguf", 300, 300, &[]);
    let out = rocmforge(&["inspect", m.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("validation: OK"));
    let out = run(&m, &[], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// `serve` on `model`: must exit (with an error) on its own, before it binds and prints
/// `listening on`. A server that starts is killed and the test fails.
fn serve_refuses(model: &Path, env: &[(&str, &str)]) -> String {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_rocmforge"))
        .args(["serve", "--model", model.to_str().unwrap()])
        .args(["--port", "0", "--backend", "cpu", "--no-warm-up"])
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the rocmforge binary runs");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "serve {} started instead of refusing the model",
                model.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.code().is_some(), "killed by a signal: {err}");
    assert!(!status.success(), "serve exited 0: {err}");
    assert!(!out.contains("listening"), "it listened first: {out}");
    err
}

#[test]
fn serve_refuses_bad_models_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = tiny(dir.path(), "vocab.gguf", 200, 200, &[]);
    let err = serve_refuses(&vocab, &[]);
    assert!(err.contains("vocabulary mismatch"), "{err}");

    let huge = huge_context(dir.path());
    let err = serve_refuses(&huge, &[(KV_LIMIT_ENV, "1048576")]);
    assert!(err.contains("KV cache"), "{err}");

    // A file cut inside its tensor table.
    let good = tiny(dir.path(), "good.gguf", TOKENS, TOKENS, &[]);
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let err = serve_refuses(&cut, &[]);
    assert!(err.contains("cut.gguf"), "{err}");
}
