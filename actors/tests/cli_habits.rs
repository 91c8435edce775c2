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

/// On a terminal, chat edits lines: Ctrl-C drops the line being typed, the up arrow recalls
/// the last one, Ctrl-D exits cleanly, and the lines are kept in the data directory's history.
#[test]
fn chat_in_a_terminal_edits_lines_and_keeps_history() {
    use std::io::{Read, Write};
    use std::os::fd::{FromRawFd, OwnedFd};
    let data = tempfile::tempdir().unwrap();
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize {
        ws_row: 24,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: the out-pointers are live locals; no name buffer and default terminal settings
    // are asked for (null), the window size points at a live local.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: openpty returned two new descriptors that nothing else owns.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let m = model();
    let mut child = rocmforge()
        .args(["chat", "--model", m.to_str().unwrap(), "--backend", "cpu"])
        .env("XDG_DATA_HOME", data.path())
        .env("TERM", "xterm")
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let mut term = std::fs::File::from(master);
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut reader = term.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // Ends with EIO once the child has exited and closed the terminal.
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut all = String::new();
    let mut pending = String::new();
    // Waits for `needle` in the output not yet consumed (a hang guard, not a timing check).
    let mut expect = |needle: &str| loop {
        if let Some(i) = pending.find(needle) {
            pending.drain(..i + needle.len());
            return;
        }
        let chunk = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("no {needle:?} in {all:?}"));
        let s = String::from_utf8_lossy(&chunk).to_string();
        all.push_str(&s);
        pending.push_str(&s);
    };
    expect("> ");
    // Typed, then dropped with Ctrl-C: never sent.
    term.write_all(b"/nonsense\x03").unwrap();
    expect("> ");
    term.write_all(b"/help\r").unwrap();
    expect("stop the reply");
    expect("> ");
    // Up arrow: the last line again.
    term.write_all(b"\x1b[A\r").unwrap();
    expect("stop the reply");
    expect("> ");
    term.write_all(b"\x04").unwrap();
    assert!(!all.contains("unknown command"), "{all}");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let history = std::fs::read_to_string(data.path().join("rocmforge/chat_history")).unwrap();
    assert!(history.contains("/help"), "{history}");
    assert!(!history.contains("/nonsense"), "{history}");
}
