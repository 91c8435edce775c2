//! `-m hf:OWNER/REPO/FILE.gguf` and `rocmforge pull` against a local server that answers like
//! the Hugging Face Hub: `/{owner}/{repo}/resolve/main/{file}` redirects to a "CDN" on another
//! port with the file's sha256 in `X-Linked-Etag` and its size in `X-Linked-Size`; the CDN
//! serves the bytes with `Range` support and can drop the connection mid-body once.

use rocmforge_actors::cli::fetch::{fetch, FetchError, HfFile, Hub};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

const SPEC: &str = "hf:test-owner/tiny-GGUF/tiny.Q4_0.gguf";
const HUB_PATH: &str = "/test-owner/tiny-GGUF/resolve/main/tiny.Q4_0.gguf";

/// A tiny random-weight llama (built-in byte vocabulary), written once per test binary.
fn gguf() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let cfg = rocmforge::synth::SynthConfig {
            preset: rocmforge::synth::Preset::Tiny,
            qtype: rocmforge::quant::GgmlType::Q4_0,
            seed: 7,
            tokenizer: None,
        };
        rocmforge::synth::write_synth_file(&path, &cfg).unwrap();
        std::fs::read(path).unwrap()
    })
}

fn sha256_hex(b: &[u8]) -> String {
    format!("{:x}", Sha256::digest(b))
}

/// One request as the fake Hub saw it.
#[derive(Debug, Clone)]
struct Seen {
    cdn: bool,
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

struct FakeHub {
    endpoint: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

struct Files {
    body: Vec<u8>,
    /// What `X-Linked-Etag` announces (a wrong one for the mismatch test).
    sha256: String,
    /// Send half the body and close the connection, once.
    drop_once: AtomicBool,
    cdn_port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeHub {
    fn start(body: Vec<u8>, sha256: String, drop_once: bool) -> Self {
        let hub = TcpListener::bind("127.0.0.1:0").unwrap();
        let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let files = Arc::new(Files {
            body,
            sha256,
            drop_once: AtomicBool::new(drop_once),
            cdn_port: cdn.local_addr().unwrap().port(),
            seen: seen.clone(),
        });
        let endpoint = format!("http://{}", hub.local_addr().unwrap());
        for (listener, is_cdn) in [(hub, false), (cdn, true)] {
            let files = files.clone();
            // Serves until the test process ends.
            std::thread::spawn(move || {
                for conn in listener.incoming().flatten() {
                    let _ = serve(conn, is_cdn, &files);
                }
            });
        }
        Self { endpoint, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve(mut conn: TcpStream, cdn: bool, f: &Files) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let (mut range, mut auth) = (None, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(v.trim().to_string()),
                "authorization" => auth = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    f.seen.lock().unwrap().push(Seen {
        cdn,
        path: path.clone(),
        range: range.clone(),
        auth,
    });
    let len = f.body.len();
    if !cdn {
        if path != HUB_PATH {
            return conn.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
        // What the Hub sends for an LFS file: the object's id and size, then the CDN.
        let head = format!(
            "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{}/blob/tiny?signed=1\r\n\
             X-Linked-Etag: \"{}\"\r\nX-Linked-Size: {len}\r\nETag: \"{}\"\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n",
            f.cdn_port, f.sha256, f.sha256
        );
        return conn.write_all(head.as_bytes());
    }
    let from: usize = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    if from >= len {
        let head = format!(
            "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
        return conn.write_all(head.as_bytes());
    }
    let head = if range.is_some() {
        format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{len}\r\n\
             Content-Length: {}\r\nETag: \"cdn-object\"\r\nConnection: close\r\n\r\n",
            len - 1,
            len - from
        )
    } else {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nETag: \"cdn-object\"\r\n\
             Connection: close\r\n\r\n"
        )
    };
    conn.write_all(head.as_bytes())?;
    if f.drop_once.swap(false, Ordering::SeqCst) {
        conn.write_all(&f.body[from..from + (len - from) / 2])?;
        return conn.shutdown(std::net::Shutdown::Both);
    }
    conn.write_all(&f.body[from..])
}

fn hub(h: &FakeHub, token: Option<&str>) -> Hub {
    Hub {
        endpoint: h.endpoint.clone(),
        token: token.map(str::to_string),
        progress: false,
    }
}

fn spec() -> HfFile {
    HfFile::parse(SPEC).unwrap().unwrap()
}

fn part_of(p: &Path) -> PathBuf {
    PathBuf::from(format!("{}.part", p.display()))
}

/// A fresh download lands under `hf/OWNER/REPO/` of the first directory with the Hub's bytes;
/// the token goes to the Hub, never to the CDN; a second fetch makes no request.
#[test]
fn a_download_is_verified_kept_and_then_used_without_a_request() {
    let body = gguf().to_vec();
    let server = FakeHub::start(body.clone(), sha256_hex(&body), false);
    let dir = tempfile::tempdir().unwrap();
    let dirs = [dir.path().to_path_buf()];
    let got = fetch(&spec(), &hub(&server, Some("secret")), &dirs).unwrap();
    assert_eq!(
        got,
        dir.path().join("hf/test-owner/tiny-GGUF/tiny.Q4_0.gguf")
    );
    assert_eq!(std::fs::read(&got).unwrap(), body);
    assert!(!part_of(&got).exists());
    let seen = server.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(!seen[0].cdn && seen[0].path == HUB_PATH, "{seen:?}");
    assert_eq!(seen[0].auth.as_deref(), Some("Bearer secret"));
    assert!(seen[1].cdn && seen[1].auth.is_none(), "{seen:?}");
    assert!(seen.iter().all(|s| s.range.is_none()));

    let again = fetch(&spec(), &hub(&server, Some("secret")), &dirs).unwrap();
    assert_eq!(again, got);
    assert_eq!(server.seen().len(), 2, "the cached copy needs no request");
}

/// The connection drops mid-body: the error says so and keeps the partial; the next fetch asks
/// only for the rest (`Range`) and the whole still matches the sha256.
#[test]
fn an_interrupted_download_resumes_from_the_partial() {
    let body = gguf().to_vec();
    let server = FakeHub::start(body.clone(), sha256_hex(&body), true);
    let dir = tempfile::tempdir().unwrap();
    let dirs = [dir.path().to_path_buf()];
    let dest = dir.path().join("hf/test-owner/tiny-GGUF/tiny.Q4_0.gguf");
    let err = fetch(&spec(), &hub(&server, None), &dirs).unwrap_err();
    assert!(matches!(err, FetchError::Interrupted { .. }), "{err}");
    assert!(err.to_string().contains("resume"), "{err}");
    let have = std::fs::metadata(part_of(&dest)).unwrap().len();
    assert!(have > 0 && (have as usize) < body.len(), "{have}");
    assert!(!dest.exists());

    let got = fetch(&spec(), &hub(&server, None), &dirs).unwrap();
    assert_eq!(std::fs::read(&got).unwrap(), body);
    assert!(!part_of(&dest).exists());
    let last = server.seen().pop().unwrap();
    assert!(last.cdn);
    assert_eq!(last.range, Some(format!("bytes={have}-")));
}

/// Bytes that do not hash to the Hub's sha256 are an error, and the partial is removed (a
/// resume would only extend wrong bytes).
#[test]
fn a_checksum_mismatch_is_an_error_and_removes_the_download() {
    let body = gguf().to_vec();
    let server = FakeHub::start(body, sha256_hex(b"other bytes"), false);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("hf/test-owner/tiny-GGUF/tiny.Q4_0.gguf");
    let err = fetch(&spec(), &hub(&server, None), &[dir.path().to_path_buf()]).unwrap_err();
    assert!(matches!(err, FetchError::Checksum { .. }), "{err}");
    assert!(
        err.to_string().contains(&sha256_hex(b"other bytes")),
        "{err}"
    );
    assert!(!dest.exists() && !part_of(&dest).exists());
}

#[test]
fn a_missing_file_is_not_found_and_leaves_nothing() {
    let server = FakeHub::start(gguf().to_vec(), sha256_hex(gguf()), false);
    let dir = tempfile::tempdir().unwrap();
    let spec = HfFile::parse("hf:test-owner/tiny-GGUF/nope.gguf")
        .unwrap()
        .unwrap();
    let err = fetch(&spec, &hub(&server, None), &[dir.path().to_path_buf()]).unwrap_err();
    assert!(matches!(err, FetchError::NotFound { .. }), "{err}");
    let dest = dir.path().join("hf/test-owner/tiny-GGUF/nope.gguf");
    assert!(!part_of(&dest).exists());
}

fn rocmforge(models: &Path, endpoint: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_rocmforge"));
    c.env("ROCMFORGE_MODELS", models)
        .env("XDG_DATA_HOME", models.join("xdg"))
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_TOKEN");
    c
}

/// The CLI: `pull` prints where the model went; `run -m hf:...` then opens that copy with no
/// request; a bad spec or a missing file is a clear error.
#[test]
fn pull_then_run_by_hub_name() {
    let body = gguf().to_vec();
    let server = FakeHub::start(body.clone(), sha256_hex(&body), false);
    let models = tempfile::tempdir().unwrap();
    let out = rocmforge(models.path(), &server.endpoint)
        .args(["pull", SPEC])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(std::fs::read(&path).unwrap(), body);
    let requests = server.seen().len();

    let out = rocmforge(models.path(), &server.endpoint)
        .args([
            "run",
            "-m",
            SPEC,
            "-p",
            "hi",
            "-n",
            "2",
            "--backend",
            "cpu",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.seen().len(), requests);

    let out = rocmforge(models.path(), &server.endpoint)
        .args(["list", "--json"])
        .output()
        .unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["path"], path.as_str(), "{listed}");

    let out = rocmforge(models.path(), &server.endpoint)
        .args(["pull", "hf:test-owner/tiny-GGUF/missing.gguf"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not found (HTTP 404)"),
        "{err}"
    );

    let out = rocmforge(models.path(), &server.endpoint)
        .args(["run", "-m", "hf:only-owner/file.gguf"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("hf:OWNER/REPO/FILE.gguf"),
        "{err}"
    );
}

/// A models directory that cannot be created (here a file stands in its way) is passed over
/// for the next one in the lookup order.
#[test]
fn a_download_goes_to_the_first_usable_directory() {
    let body = gguf().to_vec();
    let server = FakeHub::start(body.clone(), sha256_hex(&body), false);
    let root = tempfile::tempdir().unwrap();
    let blocked = root.path().join("blocked");
    std::fs::write(&blocked, b"a file, not a directory").unwrap();
    let usable = root.path().join("usable");
    let got = fetch(&spec(), &hub(&server, None), &[blocked, usable.clone()]).unwrap();
    assert!(got.starts_with(&usable), "{}", got.display());
    assert_eq!(std::fs::read(&got).unwrap(), body);
}
