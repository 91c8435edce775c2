//! `-m hf:OWNER/REPO/FILE.gguf` and `rocmforge pull`: a model file from the Hugging Face Hub,
//! downloaded once into the models directory (`models::search_dirs()`), then used from there
//! without a request.
//!
//! The file is `{endpoint}/{owner}/{repo}/resolve/main/{file}`. The Hub answers an LFS file
//! (every GGUF) with a redirect to its CDN whose headers carry the file's sha256
//! (`X-Linked-Etag`) and size (`X-Linked-Size`); the redirects are followed by hand so those
//! headers are seen, and `HF_TOKEN` is sent only to the endpoint's host, never to the CDN.
//! Bytes go to `FILE.part` beside the destination; a later run resumes it with an HTTP
//! `Range` request. The finished file is checked against the sha256 when the Hub sent one (a
//! 64-hex `X-Linked-Etag`, or an `ETag` of that shape) and against the size otherwise (a
//! non-LFS file's ETag is a git hash, not a checksum of the bytes), then renamed into place.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The `-m` prefix of a Hub file.
pub const HF_PREFIX: &str = "hf:";
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Redirects followed by hand (a renamed repository, then the CDN).
const MAX_REDIRECTS: usize = 8;

/// Why a Hub file could not be had. The partial download is kept where a rerun can resume it
/// (a dropped connection, a full disk) and removed where its bytes are wrong (a checksum or
/// size mismatch).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("bad model {spec}: {why} (expected hf:OWNER/REPO/FILE.gguf)")]
    BadSpec { spec: String, why: &'static str },
    #[error("{url}: not found (HTTP 404): check the owner, the repository and the file name")]
    NotFound { url: String },
    #[error("{url}: HTTP {status}: a gated or private repository needs HF_TOKEN set to a token that may read it")]
    Denied { url: String, status: u16 },
    #[error("{url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: more than {MAX_REDIRECTS} redirects, or one without a usable Location")]
    Redirect { url: String },
    #[error("{url}: the server answered a resume from byte {asked} with bytes from {got}")]
    BadRange {
        url: String,
        asked: u64,
        got: String,
    },
    #[error("{url}: {source}")]
    Request { url: String, source: ureq::Error },
    #[error("{url}: connection lost after {have} of {total} bytes ({source}); run again to resume {part}")]
    Interrupted {
        url: String,
        part: PathBuf,
        have: u64,
        total: String,
        source: std::io::Error,
    },
    #[error("disk full writing {part} ({have} bytes so far); free space and run again to resume")]
    DiskFull { part: PathBuf, have: u64 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{url}: sha256 {actual} differs from the Hub's {expected}; the download was removed")]
    Checksum {
        url: String,
        expected: String,
        actual: String,
    },
    #[error(
        "{url}: got {actual} bytes where the Hub announced {expected}; the download was removed"
    )]
    Size {
        url: String,
        expected: u64,
        actual: u64,
    },
    #[error("{part} is being downloaded by another process")]
    Busy { part: PathBuf },
    #[error("no writable models directory (tried {tried})")]
    NoModelsDir { tried: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One file of a Hub repository, from `hf:OWNER/REPO/PATH/IN/REPO.gguf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfFile {
    pub owner: String,
    pub repo: String,
    /// The path inside the repository (may have folders).
    pub file: String,
    /// Branch, tag or commit; `main` (a spec has no way to name another yet).
    pub revision: String,
}

impl HfFile {
    /// `Ok(None)` for anything that is not an `hf:` spec; an error for a malformed one.
    pub fn parse(spec: &str) -> Result<Option<Self>, FetchError> {
        let Some(rest) = spec.strip_prefix(HF_PREFIX) else {
            return Ok(None);
        };
        let bad = |why| FetchError::BadSpec {
            spec: spec.to_string(),
            why,
        };
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() < 3 {
            return Err(bad("an owner, a repository and a file are needed"));
        }
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad("empty path segment"));
        }
        // The spec becomes a path under the models directory: nothing may climb out of it.
        if parts
            .iter()
            .any(|p| *p == "." || *p == ".." || p.contains(['\\', '\0', '?', '#']))
        {
            return Err(bad("`.`, `..`, `\\`, `?` or `#` in the path"));
        }
        Ok(Some(Self {
            owner: parts[0].to_string(),
            repo: parts[1].to_string(),
            file: parts[2..].join("/"),
            revision: "main".to_string(),
        }))
    }

    /// `{endpoint}/{owner}/{repo}/resolve/{revision}/{file}`.
    pub fn url(&self, endpoint: &str) -> String {
        format!(
            "{}/{}/{}/resolve/{}/{}",
            endpoint.trim_end_matches('/'),
            self.owner,
            self.repo,
            self.revision,
            self.file
        )
    }

    /// Where the file lives under a models directory: `hf/OWNER/REPO/FILE`.
    pub fn local_path(&self) -> PathBuf {
        let mut p = PathBuf::from("hf");
        p.push(&self.owner);
        p.push(&self.repo);
        for seg in self.file.split('/') {
            p.push(seg);
        }
        p
    }
}

/// Where and how to reach the Hub: `HF_ENDPOINT` (default `https://huggingface.co`) and
/// `HF_TOKEN`.
#[derive(Debug, Clone)]
pub struct Hub {
    pub endpoint: String,
    pub token: Option<String>,
    /// Draw a progress bar on stderr (it stays hidden when stderr is not a terminal).
    pub progress: bool,
}

impl Hub {
    pub fn from_env(progress: bool) -> Self {
        let var = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
        Self {
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            token: var("HF_TOKEN"),
            progress,
        }
    }
}

/// The local copy of `spec`: found in one of `dirs` (no request), or downloaded into the first
/// of them that can be written.
pub fn fetch(spec: &HfFile, hub: &Hub, dirs: &[PathBuf]) -> Result<PathBuf, FetchError> {
    let rel = spec.local_path();
    if let Some(found) = dirs.iter().map(|d| d.join(&rel)).find(|p| p.is_file()) {
        return Ok(found);
    }
    // The first directory where the partial file can be created (or is there to resume): a
    // directory that exists but cannot be written is passed over.
    let mut tried = Vec::new();
    for dir in dirs {
        let dest = dir.join(&rel);
        let part_path = part_path(&dest);
        let opened = match dest.parent().map(std::fs::create_dir_all) {
            Some(Ok(())) => PartFile::open(&part_path),
            Some(Err(source)) => Err(FetchError::Io {
                path: dir.clone(),
                source,
            }),
            None => continue,
        };
        match opened {
            Ok(part) => {
                download(&spec.url(&hub.endpoint), hub, &dest, part)?;
                return Ok(dest);
            }
            Err(FetchError::Io { path, source }) => {
                tried.push(format!("{}: {source}", path.display()))
            }
            Err(e) => return Err(e),
        }
    }
    Err(FetchError::NoModelsDir {
        tried: tried.join("; "),
    })
}

/// `FILE.part` beside `dest`.
fn part_path(dest: &Path) -> PathBuf {
    let mut p = dest.as_os_str().to_owned();
    p.push(".part");
    PathBuf::from(p)
}

/// What the Hub said about the file before its bytes.
#[derive(Debug, Default)]
struct Announced {
    sha256: Option<String>,
    size: Option<u64>,
}

impl Announced {
    fn note(&mut self, r: &ureq::http::Response<ureq::Body>) {
        let h = |k| r.headers().get(k).and_then(|v| v.to_str().ok());
        // The Hub's first answer (the redirect) carries the LFS object's id; the CDN's own
        // ETag that follows is something else, so the first sha256 seen wins.
        if self.sha256.is_none() {
            self.sha256 = h("x-linked-etag").or(h("etag")).and_then(sha256_etag);
        }
        if self.size.is_none() {
            self.size = h("x-linked-size").and_then(|s| s.trim().parse().ok());
        }
    }
}

/// An ETag that is a sha256 (64 hex digits, quoted, maybe weak) as lower-case hex.
fn sha256_etag(v: &str) -> Option<String> {
    let v = v.trim().trim_start_matches("W/").trim_matches('"');
    (v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit())).then(|| v.to_ascii_lowercase())
}

/// The authority (`host:port`) of an absolute URL.
fn authority(url: &str) -> Option<String> {
    url.parse::<ureq::http::Uri>()
        .ok()?
        .authority()
        .map(|a| a.as_str().to_string())
}

/// A `Location` made absolute against the URL that answered it.
fn follow(base: &str, location: &str) -> Option<String> {
    if location.contains("://") {
        return Some(location.to_string());
    }
    let uri = base.parse::<ureq::http::Uri>().ok()?;
    let origin = format!("{}://{}", uri.scheme_str()?, uri.authority()?);
    if location.starts_with('/') {
        Some(format!("{origin}{location}"))
    } else {
        let dir = uri.path().rsplit_once('/').map_or("", |(d, _)| d);
        Some(format!("{origin}{dir}/{location}"))
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        // Redirects by hand: the first one's headers carry the checksum, and the token must
        // not follow it to another host.
        .max_redirects(0)
        .http_status_as_error(false)
        .user_agent(concat!("rocmforge/", env!("CARGO_PKG_VERSION")))
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        // A stalled transfer ends (and can be resumed) rather than hanging forever.
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// Holds an exclusive `flock` on the `.part` file, so two processes never write one download.
struct PartFile {
    file: File,
    path: PathBuf,
}

impl PartFile {
    fn open(path: &Path) -> Result<Self, FetchError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err(path))?;
        use std::os::fd::AsRawFd;
        // A lock held only for a moment is not another download: a process of ours forking a
        // child (which shares the descriptor until it execs) right after an earlier fetch of
        // this file let go of it. So a held lock is tried again for up to a second before it
        // counts as another process's download.
        let mut tries = 0;
        loop {
            // SAFETY: the descriptor is open (owned by `file`, alive for this call); flock
            // takes no pointers. The lock is released when the descriptor closes.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                break;
            }
            tries += 1;
            if tries > 20 {
                return Err(FetchError::Busy {
                    part: path.to_path_buf(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    /// The bytes already there, hashed (a resume continues the same digest).
    fn resume_state(&mut self) -> Result<(u64, Sha256), FetchError> {
        let mut hasher = Sha256::new();
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(io_err(&self.path))?;
        let have = std::io::copy(&mut (&self.file).take(u64::MAX), &mut hasher)
            .map_err(io_err(&self.path))?;
        Ok((have, hasher))
    }

    fn restart(&mut self) -> Result<(), FetchError> {
        self.file.set_len(0).map_err(io_err(&self.path))?;
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(io_err(&self.path))?;
        Ok(())
    }
}

/// Downloads `url` into `dest` through `part` (its `.part` file, locked), resuming what is
/// there.
fn download(url: &str, hub: &Hub, dest: &Path, mut part: PartFile) -> Result<(), FetchError> {
    let part_path = part.path.clone();
    let (mut have, mut hasher) = part.resume_state()?;
    let agent = agent();
    let hub_host = authority(&hub.endpoint);
    let mut announced = Announced::default();

    // At most two rounds: a resume the server cannot serve (416, or a 200 that ignores the
    // range) starts once more from byte 0.
    let (mut response, start) = 'done: {
        'rounds: for _round in 0..2 {
            let mut at = url.to_string();
            for _hop in 0..=MAX_REDIRECTS {
                let mut req = agent.get(&at).header("Accept-Encoding", "identity");
                if have > 0 {
                    req = req.header("Range", format!("bytes={have}-"));
                }
                if let Some(t) = &hub.token {
                    if authority(&at) == hub_host {
                        req = req.header("Authorization", format!("Bearer {t}"));
                    }
                }
                let r = req.call().map_err(|source| FetchError::Request {
                    url: url.to_string(),
                    source,
                })?;
                announced.note(&r);
                let status = r.status().as_u16();
                match status {
                    300..=399 => {
                        let next = r
                            .headers()
                            .get("location")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|l| follow(&at, l));
                        at = next.ok_or_else(|| FetchError::Redirect {
                            url: url.to_string(),
                        })?;
                    }
                    200 => {
                        if have > 0 {
                            tracing::info!("{url}: the server ignored the resume; starting over");
                            part.restart()?;
                            have = 0;
                            hasher = Sha256::new();
                        }
                        break 'done (r, 0);
                    }
                    206 => {
                        let range = r
                            .headers()
                            .get("content-range")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let from = range
                            .strip_prefix("bytes ")
                            .and_then(|s| s.split('-').next())
                            .and_then(|s| s.parse::<u64>().ok());
                        if from != Some(have) {
                            return Err(FetchError::BadRange {
                                url: url.to_string(),
                                asked: have,
                                got: range,
                            });
                        }
                        if announced.size.is_none() {
                            announced.size = range.rsplit('/').next().and_then(|t| t.parse().ok());
                        }
                        break 'done (r, have);
                    }
                    // The partial is as long as the file or longer (the file changed): again
                    // from the start.
                    416 if have > 0 => {
                        part.restart()?;
                        have = 0;
                        hasher = Sha256::new();
                        continue 'rounds;
                    }
                    404 => {
                        drop(part);
                        remove_if_empty(&part_path);
                        return Err(FetchError::NotFound {
                            url: url.to_string(),
                        });
                    }
                    401 | 403 => {
                        drop(part);
                        remove_if_empty(&part_path);
                        return Err(FetchError::Denied {
                            url: url.to_string(),
                            status,
                        });
                    }
                    _ => {
                        return Err(FetchError::Status {
                            url: url.to_string(),
                            status,
                        })
                    }
                }
            }
            return Err(FetchError::Redirect {
                url: url.to_string(),
            });
        }
        return Err(FetchError::BadRange {
            url: url.to_string(),
            asked: have,
            got: "416 twice".into(),
        });
    };

    let total = announced.size.or_else(|| {
        response
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|n| n + start)
    });
    let bar = progress_bar(hub.progress, total, dest);
    bar.set_position(have);
    part.file
        .seek(SeekFrom::Start(have))
        .map_err(io_err(&part_path))?;
    let mut body = response.body_mut().as_reader();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                bar.abandon();
                return Err(FetchError::Interrupted {
                    url: url.to_string(),
                    part: part_path,
                    have,
                    total: total.map_or("?".into(), |t| t.to_string()),
                    source,
                });
            }
        };
        if let Err(e) = part.file.write_all(&buf[..n]) {
            bar.abandon();
            // Keep what was written: freeing space and running again resumes from there.
            let _ = part.file.sync_data();
            let have = part.file.metadata().map_or(have, |m| m.len());
            return Err(if e.kind() == std::io::ErrorKind::StorageFull {
                FetchError::DiskFull {
                    part: part_path,
                    have,
                }
            } else {
                FetchError::Io {
                    path: part_path,
                    source: e,
                }
            });
        }
        hasher.update(&buf[..n]);
        have += n as u64;
        bar.set_position(have);
    }
    part.file.sync_all().map_err(io_err(&part_path))?;
    bar.finish_and_clear();

    if let Some(expected) = total.filter(|&t| t != have) {
        drop(part);
        let _ = std::fs::remove_file(&part_path);
        return Err(FetchError::Size {
            url: url.to_string(),
            expected,
            actual: have,
        });
    }
    let actual = format!("{:x}", hasher.finalize());
    match &announced.sha256 {
        Some(expected) if *expected != actual => {
            drop(part);
            let _ = std::fs::remove_file(&part_path);
            return Err(FetchError::Checksum {
                url: url.to_string(),
                expected: expected.clone(),
                actual,
            });
        }
        Some(_) => tracing::info!("{url}: sha256 {actual} verified"),
        None => tracing::warn!("{url}: the server sent no sha256; only the size was checked"),
    }
    std::fs::rename(&part_path, dest).map_err(io_err(dest))?;
    Ok(())
}

fn remove_if_empty(path: &Path) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
        let _ = std::fs::remove_file(path);
    }
}

fn progress_bar(show: bool, total: Option<u64>, dest: &Path) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:40}] {binary_bytes:>10}/{binary_total_bytes:<10} {binary_bytes_per_sec} {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(
        dest.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_into_owner_repo_and_file() {
        let f = HfFile::parse("hf:bartowski/SmolLM2-GGUF/sub/m.Q4_K_M.gguf")
            .unwrap()
            .unwrap();
        assert_eq!(f.owner, "bartowski");
        assert_eq!(f.repo, "SmolLM2-GGUF");
        assert_eq!(f.file, "sub/m.Q4_K_M.gguf");
        assert_eq!(
            f.url("http://h:1/"),
            "http://h:1/bartowski/SmolLM2-GGUF/resolve/main/sub/m.Q4_K_M.gguf"
        );
        assert_eq!(
            f.local_path(),
            Path::new("hf/bartowski/SmolLM2-GGUF/sub/m.Q4_K_M.gguf")
        );
        assert!(HfFile::parse("models/x.gguf").unwrap().is_none());
        for bad in [
            "hf:a/b",
            "hf:a//c.gguf",
            "hf:a/b/../../x.gguf",
            "hf:a/b/./x",
            "hf:a/b/x?y",
        ] {
            assert!(
                matches!(HfFile::parse(bad), Err(FetchError::BadSpec { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_a_sha256_etag_is_a_checksum() {
        let h = "A".repeat(64);
        assert_eq!(sha256_etag(&format!("\"{h}\"")), Some("a".repeat(64)));
        assert_eq!(sha256_etag(&format!("W/\"{h}\"")), Some("a".repeat(64)));
        // A git blob id (a non-LFS file) is no checksum of the bytes.
        assert_eq!(
            sha256_etag("\"0123456789abcdef0123456789abcdef01234567\""),
            None
        );
    }

    #[test]
    fn redirects_resolve_against_the_answering_url() {
        let base = "http://127.0.0.1:5/o/r/resolve/main/f.gguf";
        assert_eq!(
            follow(base, "/o2/r/resolve/main/f.gguf").unwrap(),
            "http://127.0.0.1:5/o2/r/resolve/main/f.gguf"
        );
        assert_eq!(
            follow(base, "https://cdn/x?sig=1").unwrap(),
            "https://cdn/x?sig=1"
        );
        assert_eq!(
            authority("http://127.0.0.1:5/x").as_deref(),
            Some("127.0.0.1:5")
        );
    }
}
