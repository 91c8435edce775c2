//! What a llama.cpp or ollama user reaches for first: `--version`, shell completions, and the
//! model found from any directory.

use std::path::PathBuf;
use std::process::Command;

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn rocmforge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rocmforge"))
}

#[test]
fn version_names_the_commit_and_the_backends() {
    let out = rocmforge().arg("--version").output().unwrap();
    assert!(out.status.success());
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(v.contains(env!("CARGO_PKG_VERSION")), "{v}");
    assert!(v.contains("commit "), "{v}");
    assert!(v.contains("backends: cpu, cuda"), "{v}");
}

#[test]
fn completions_for_bash_and_zsh() {
    for shell in ["bash", "zsh", "fish"] {
        let out = rocmforge().args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}");
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(
            s.contains("rocmforge") && s.contains("memory-budget"),
            "{shell}: {s}"
        );
    }
    assert!(!rocmforge()
        .args(["completions", "cmd.exe"])
        .output()
        .unwrap()
        .status
        .success());
}

/// A bare model name is looked up in `$ROCMFORGE_MODELS`, then the data directory, then
/// `./models`; one found nowhere is an error that says where it looked.
#[test]
fn models_are_found_from_any_directory_in_order() {
    let m = model();
    assert!(m.exists(), "run scripts/fetch-model.sh");
    let name = m.file_name().unwrap().to_str().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let first = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let data_models = data.path().join("rocmforge/models");
    std::fs::create_dir_all(&data_models).unwrap();
    // `inspect --json` names the file it opened.
    let opened = |models_env: Option<&std::path::Path>| {
        let mut c = rocmforge();
        c.current_dir(cwd.path())
            .env("XDG_DATA_HOME", data.path())
            .env_remove("ROCMFORGE_MODELS")
            .args(["inspect", name, "--json"]);
        if let Some(d) = models_env {
            c.env("ROCMFORGE_MODELS", d);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // Nowhere yet: a clear error listing the places.
    let (ok, _, err) = opened(None);
    assert!(!ok);
    assert!(
        err.contains("not found in") && err.contains("rocmforge/models"),
        "{err}"
    );
    // ./models of the working directory.
    std::fs::create_dir_all(cwd.path().join("models")).unwrap();
    std::os::unix::fs::symlink(&m, cwd.path().join("models").join(name)).unwrap();
    let (ok, out, err) = opened(None);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("models/{name}")), "{out}");
    // The data directory comes before ./models.
    std::os::unix::fs::symlink(&m, data_models.join(name)).unwrap();
    let (ok, out, err) = opened(None);
    assert!(ok, "{err}");
    assert!(out.contains(&data_models.display().to_string()), "{out}");
    // $ROCMFORGE_MODELS comes first.
    std::os::unix::fs::symlink(&m, first.path().join(name)).unwrap();
    let (ok, out, err) = opened(Some(first.path()));
    assert!(ok, "{err}");
    assert!(out.contains(&first.path().display().to_string()), "{out}");
    // `list` shows all three places, in that order, with what each file is.
    let out = rocmforge()
        .current_dir(cwd.path())
        .env("XDG_DATA_HOME", data.path())
        .env("ROCMFORGE_MODELS", first.path())
        .args(["list", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(listed[0]["path"]
        .as_str()
        .unwrap()
        .starts_with(&first.path().display().to_string()));
    assert!(listed[1]["path"]
        .as_str()
        .unwrap()
        .starts_with(&data_models.display().to_string()));
    assert_eq!(listed[2]["path"], format!("models/{name}"));
    for m in listed {
        assert_eq!(m["architecture"], "llama");
        assert_eq!(m["quant"], "Q4_1");
    }
}

/// Ctrl-C while a reply is being written stops that reply; the chat goes on with the next turn.
#[test]
fn chat_ctrl_c_stops_the_reply_and_keeps_the_session() {
    use std::io::{Read, Write};
    use std::process::Stdio;
    let m = model();
    let mut child = rocmforge()
        .args(["chat", "--model", m.to_str().unwrap(), "--backend", "cpu"])
        .args(["--temp", "0", "-n", "1000", "-t", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    stdin
        .write_all(b"Write the numbers from 1 to 500, one per line.\n")
        .unwrap();
    stdin.flush().unwrap();
    // The reply has started once text arrives (a blocking read, no timing guess).
    let mut first = [0u8; 16];
    let n = stdout.read(&mut first).unwrap();
    assert!(n > 0, "no reply text");
    // SAFETY: sends SIGINT to the child this test started and still owns.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0);
    stdin.write_all(b"What is 2+2?\n/bye\n").unwrap();
    drop(stdin);
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "chat ended with {:?}: {err}",
        out.status
    );
    assert!(err.contains("[stopped]"), "{err}");
    // The session went on: the stopped reply prints no statistics line, the next turn does.
    assert_eq!(err.matches(" prompt tokens (").count(), 1, "{err}");
}
