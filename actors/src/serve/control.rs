//! The control socket: a Unix domain socket where host services steer the runtime.
//!
//! Frame format (both directions): a `u32` little-endian payload length, then that many bytes
//! of `bincode` 1.x (default options: little-endian, fixed-width integers, enum variants as
//! `u32` indices, lengths as `u64`). Requests are `ControlRequest`, each answered by exactly one
//! `ControlResponse`, in order. A frame longer than `MAX_FRAME` or one that does not decode
//! closes that connection only (the server keeps serving everyone else).

use crate::messages::{Hint, LoadProgress, ModelHealth, Stats};
use crate::runtime::RuntimeHandle;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Largest payload accepted (a `Stats` of a 1000-layer model is a few tens of KiB).
pub const MAX_FRAME: u32 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Prefetch / pin / release / warm-up; answered `Ok` or `Error`.
    Hint(Hint),
    Stats,
    LoadProgress,
    /// Accepts the model file as it is now and loads the weights from it again
    /// (`RuntimeHandle::reload`); answered `Ok` or `Error`.
    Reload,
    /// `ModelHealth`: failed units, load failures, whether the file changed.
    Health,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// One reply per control request, moved once: its size does not matter, and boxing `Stats`
// would change the type every client matches on.
#[allow(clippy::large_enum_variant)]
pub enum ControlResponse {
    Ok,
    Stats(Stats),
    LoadProgress(LoadProgress),
    /// The request was understood but failed (e.g. a hint the budget cannot honour).
    Error(String),
    Health(ModelHealth),
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("control frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(u32),
    #[error("control frame does not decode: {0}")]
    Decode(#[from] bincode::Error),
}

/// Serves connections until `stop` fires.
pub async fn serve(listener: tokio::net::UnixListener, rt: RuntimeHandle, stop: CancellationToken) {
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let rt = rt.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        r = connection(stream, rt) => {
                            if let Err(e) = r {
                                tracing::warn!("control connection closed: {e}");
                            }
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!("control socket accept: {e}");
                // Out of file descriptors and the like: do not spin.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(mut s: tokio::net::UnixStream, rt: RuntimeHandle) -> Result<(), ControlError> {
    loop {
        let mut len = [0u8; 4];
        match s.read_exact(&mut len).await {
            Ok(_) => {}
            // The client hung up between frames: a normal end.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_le_bytes(len);
        if len > MAX_FRAME {
            return Err(ControlError::TooLarge(len));
        }
        let mut buf = vec![0u8; len as usize];
        s.read_exact(&mut buf).await?;
        let req: ControlRequest = bincode::deserialize(&buf)?;
        let resp = match req {
            ControlRequest::Stats => ControlResponse::Stats(rt.stats()),
            ControlRequest::LoadProgress => ControlResponse::LoadProgress(rt.load_progress()),
            ControlRequest::Reload => {
                let rt = rt.clone();
                // Opens and compares the file, then waits for the scheduler: blocking.
                match tokio::task::spawn_blocking(move || rt.reload()).await {
                    Ok(Ok(())) => ControlResponse::Ok,
                    Ok(Err(e)) => ControlResponse::Error(e.to_string()),
                    Err(e) => ControlResponse::Error(format!("reload task failed: {e}")),
                }
            }
            ControlRequest::Health => {
                let rt = rt.clone();
                match tokio::task::spawn_blocking(move || rt.model_health()).await {
                    Ok(h) => ControlResponse::Health(h),
                    Err(e) => ControlResponse::Error(format!("health task failed: {e}")),
                }
            }
            ControlRequest::Hint(h) => {
                let rt = rt.clone();
                // `hint` waits for the scheduler's verdict (never on I/O), off the async threads.
                match tokio::task::spawn_blocking(move || rt.hint(h)).await {
                    Ok(Ok(())) => ControlResponse::Ok,
                    Ok(Err(e)) => ControlResponse::Error(e.to_string()),
                    Err(e) => ControlResponse::Error(format!("hint task failed: {e}")),
                }
            }
        };
        let frame = encode_frame(&resp)?;
        s.write_all(&frame).await?;
    }
}

/// `len (u32 LE) ++ bincode(msg)`.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, ControlError> {
    let payload = bincode::serialize(msg)?;
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or(ControlError::TooLarge(u32::MAX))?;
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// A blocking client, for tools and tests.
pub struct ControlClient {
    stream: std::os::unix::net::UnixStream,
}

impl ControlClient {
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ControlError> {
        Ok(Self {
            stream: std::os::unix::net::UnixStream::connect(path)?,
        })
    }

    pub fn request(&mut self, req: &ControlRequest) -> Result<ControlResponse, ControlError> {
        self.stream.write_all(&encode_frame(req)?)?;
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len);
        if len > MAX_FRAME {
            return Err(ControlError::TooLarge(len));
        }
        let mut buf = vec![0u8; len as usize];
        self.stream.read_exact(&mut buf)?;
        Ok(bincode::deserialize(&buf)?)
    }

    /// The raw stream, for sending hand-made (e.g. malformed) frames.
    pub fn stream(&mut self) -> &mut std::os::unix::net::UnixStream {
        &mut self.stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_layout() {
        let f = encode_frame(&ControlRequest::Stats).unwrap();
        // Variant index 1 as a u32, nothing else.
        assert_eq!(f, vec![4, 0, 0, 0, 1, 0, 0, 0]);
        let h = ControlRequest::Hint(Hint::Prefetch { layers: vec![3] });
        let f = encode_frame(&h).unwrap();
        // Variant, variant, vector length (u64), element (u64): as docs/SERVING.md shows.
        let mut want = vec![24, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(f, want);
        assert_eq!(bincode::deserialize::<ControlRequest>(&f[4..]).unwrap(), h);
    }
}
