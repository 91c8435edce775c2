//! Where the CLI finds a model: a path that exists is used as it is; a bare file name (the
//! default model's included) is looked up in `$ROCMFORGE_MODELS`, then the user's data
//! directory (`$XDG_DATA_HOME/rocmforge/models`, else `~/.local/share/rocmforge/models`), then
//! `./models`. So `rocmforge run` works from any directory once the model sits in one of them.

use std::path::{Path, PathBuf};

/// The default model's file name (`scripts/fetch-model.sh` puts it in `./models`).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The directories searched for a bare model name, in order.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("ROCMFORGE_MODELS").filter(|v| !v.is_empty()) {
        dirs.push(PathBuf::from(d));
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".local").join("share"))
        });
    if let Some(d) = data {
        dirs.push(d.join("rocmforge").join("models"));
    }
    dirs.push(PathBuf::from("models"));
    dirs
}

/// `clap` value parser of `--model`: the path as given when it exists or has a directory part
/// (opening it then reports what is wrong), else the first match of the bare name in
/// `search_dirs()`; a bare name found nowhere is an error naming where it was looked for.
pub fn resolve(arg: &str) -> Result<PathBuf, String> {
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
