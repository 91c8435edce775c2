//! Where the CLI finds a model: a path that exists is used as it is; a bare file name (the
//! default model's included) is looked up in `$ROCMFORGE_MODELS`, then the user's data
//! directory (`$XDG_DATA_HOME/rocmforge/models`, else `~/.local/share/rocmforge/models`), then
//! `./models`. So `rocmforge run` works from any directory once the model sits in one of them.

use std::path::{Path, PathBuf};

/// The default model's file name (`scripts/fetch-model.sh` puts it in `./models`).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The user's data directory of rocmforge: `$XDG_DATA_HOME/rocmforge`, else
/// `~/.local/share/rocmforge` (models, chat history).
pub fn data_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".local").join("share"))
        })
        .map(|d| d.join("rocmforge"))
}

/// The directories searched for a bare model name, in order.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("ROCMFORGE_MODELS").filter(|v| !v.is_empty()) {
        dirs.push(PathBuf::from(d));
    }
    if let Some(d) = data_dir() {
        dirs.push(d.join("models"));
    }
    dirs.push(PathBuf::from("models"));
    dirs
}

/// `clap` value parser of `--model`: an `hf:OWNER/REPO/FILE` spec as given (checked here,
/// fetched by `fetch_remote` before the command runs); the path as given when it exists or has
/// a directory part (opening it then reports what is wrong), else the first match of the bare
/// name in `search_dirs()`; a bare name found nowhere is an error naming where it was looked
/// for.
pub fn resolve(arg: &str) -> Result<PathBuf, String> {
    if super::fetch::HfFile::parse(arg)
        .map_err(|e| e.to_string())?
        .is_some()
    {
        return Ok(PathBuf::from(arg));
    }
    let p = Path::new(arg);
    if p.exists() || p.components().count() > 1 {
        return Ok(p.to_path_buf());
    }
    let dirs = search_dirs();
    if let Some(found) = dirs.iter().map(|d| d.join(p)).find(|c| c.is_file()) {
        return Ok(found);
    }
    let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    let hint = if arg == DEFAULT_MODEL_FILE {
        " (scripts/fetch-model.sh fetches it into ./models)"
    } else {
        ""
    };
    Err(format!(
        "model {arg} not found in {}{hint}",
        looked.join(", ")
    ))
}

/// Replaces an `hf:` spec by its local copy, downloading it the first time (into the first
/// writable of `search_dirs()`); any other path is left as it is.
pub fn fetch_remote(model: &mut PathBuf, progress: bool) -> Result<(), super::fetch::FetchError> {
    let Some(spec) = model
        .to_str()
        .map(super::fetch::HfFile::parse)
        .transpose()?
        .flatten()
    else {
        return Ok(());
    };
    let hub = super::fetch::Hub::from_env(progress);
    *model = super::fetch::fetch(&spec, &hub, &search_dirs())?;
    Ok(())
}

/// One model file found by `rocmforge list`.
#[derive(Debug, serde::Serialize)]
pub struct LocalModel {
    pub path: PathBuf,
    pub bytes: u64,
    /// `general.architecture`, or why the file could not be read.
    pub architecture: String,
    /// The tensor type holding the most bytes (what "Q4_K_M" files mostly are).
    pub quant: String,
}

/// The `*.gguf` files under `dir`, sorted, down to the depth of a Hub download
/// (`hf/OWNER/REPO/FILE`, a few folders more inside the repository).
fn gguf_files(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.extension().is_some_and(|e| e == "gguf") && p.is_file() {
            out.push(p);
        } else if depth > 0 && p.is_dir() {
            gguf_files(&p, depth - 1, out);
        }
    }
}

/// Every `*.gguf` in `search_dirs()` (Hub downloads included), in search order (an unreadable
/// file is listed with the reason instead of its architecture).
pub fn list() -> Vec<LocalModel> {
    let mut out = Vec::new();
    for dir in search_dirs() {
        let mut paths = Vec::new();
        gguf_files(&dir, 5, &mut paths);
        for path in paths {
            let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
            let (architecture, quant) = match rocmforge::gguf::GgufFile::open(&path) {
                Ok(f) => {
                    let arch = f
                        .metadata()
                        .architecture()
                        .map_or_else(|e| format!("? ({e})"), str::to_string);
                    let mut by_type: std::collections::HashMap<&'static str, u64> =
                        Default::default();
                    for t in f.tensors() {
                        *by_type.entry(t.ggml_type.name()).or_default() += t.n_bytes;
                    }
                    let quant = by_type
                        .into_iter()
                        .max_by_key(|&(name, b)| (b, name))
                        .map_or("-".to_string(), |(name, _)| name.to_string());
                    (arch, quant)
                }
                Err(e) => (format!("unreadable: {e}"), "-".into()),
            };
            out.push(LocalModel {
                path,
                bytes,
                architecture,
                quant,
            });
        }
    }
    out
}
