//! The official `openai` Python client against the `rocmforge serve` binary on loopback:
//! completion, chat completion, streamed chat (equal to the non-streamed text at temperature 0).
//! Then SIGTERM: the server shuts down gracefully and exits 0.
//!
//! Needs python3 with `openai` (scripts/requirements-test.txt); fails with that message if not.

mod serve_common;

use serve_common::{smollm2, MODEL};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the server if the test fails midway.
struct Reaper(Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_with_deadline(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if let Some(s) = child.try_wait().expect("poll child") {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_client() {
    let py = Command::new("python3")
        .args(["-c", "import openai; print(openai.__version__)"])
        .output();
    match py {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "python3 cannot import `openai` ({}): pip install -r scripts/requirements-test.txt",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("python3 is not available ({e}); this test needs python3 with `openai`"),
    }

    let mut child = Command::new(env!("CARGO_BIN_EXE_rocmforge"))
        .args(["serve", "--port", "0", "--model-name", MODEL, "--model"])
        .arg(smollm2())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start rocmforge serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut server = Reaper(child);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read the listening line");
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .expect("address");

    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let h = rocmforge_actors::serve::client::request(addr, "GET", "/health", None).await;
        if h.is_ok_and(|r| r.status == 200) {
            break;
        }
        assert!(Instant::now() < until, "server not ready in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/serve_openai_client.py");
    let mut py = Command::new("python3")
        .arg(&script)
        .arg(format!("http://{addr}/v1"))
        .arg(MODEL)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the python client");
    let status = wait_with_deadline(&mut py, Duration::from_secs(300));
    if status.is_none() {
        let _ = py.kill();
    }
    let out = py.wait_with_output().expect("python output");
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(status.is_some(), "python client timed out\n{so}\n{se}");
    assert!(
        out.status.success(),
        "python client failed\nstdout:\n{so}\nstderr:\n{se}"
    );
    assert_eq!(so.trim(), "ok");

    // Graceful shutdown on SIGTERM.
    let pid = libc::pid_t::try_from(server.0.id()).expect("pid fits");
    // SAFETY: kill(2) with a pid of a child this test spawned and has not reaped yet.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    assert_eq!(rc, 0, "kill failed");
    let st = wait_with_deadline(&mut server.0, Duration::from_secs(30))
        .expect("server exits within 30 s of SIGTERM");
    assert!(st.success(), "server exit status {st:?}");
}
