//! The HTTP accept loop: hyper's HTTP/1 connection driver under the axum router, with what
//! `axum::serve` does not offer.
//!
//! - A connection limit. Past it a new connection is answered `503` at once and closed, rather
//!   than left waiting or left to exhaust the process's file descriptors.
//! - hyper's header read timeout. hyper starts it whenever a connection waits for a request
//!   head, so it ends slow or partial heads and idle keep-alive connections alike. (Slow bodies
//!   are the handlers' business: they read the body under a deadline.)
//! - Draining: on stop, connections finish their requests and close (hyper's graceful
//!   shutdown); on kill, they are dropped, which cancels their requests.
//! - A write timeout (`WriteTimeout`): a response write that makes no progress for that long
//!   (a client that stopped reading a stream it asked for) ends the connection, which drops the
//!   response and cancels its request. Without it such a client would hold the runtime, which
//!   serves one request at a time, until it read or hung up.
//!
//! Not done yet: an idle timeout separate from the header timeout (hyper has one timer for
//! both).

use super::error::ApiError;
use axum::http::StatusCode;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub write_timeout: Duration,
}

/// Descriptors kept back from connections: the model file, the control socket, the runtime's
/// threads and files, a refusal in flight.
const FD_RESERVE: usize = 64;
/// Refusals being written at once; past it a refused connection is just closed.
const REFUSALS_AT_ONCE: usize = 32;
/// How long a refusal may take: write the 503, then read what the client sent until it hangs
/// up, so closing does not reset the connection and lose the 503 (TCP sends RST when unread
/// data is discarded).
const REFUSAL_TIME: Duration = Duration::from_secs(2);
/// After a failed `accept` (out of descriptors, most likely): the kernel offers no readiness
/// event for "a descriptor became free", so the loop waits a moment before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// `want`, lowered to fit the process's open-file limit (less a reserve).
pub(crate) fn fd_capped(want: usize) -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass, which lives for the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return want.max(1);
    }
    let room = usize::try_from(lim.rlim_cur)
        .unwrap_or(usize::MAX)
        .saturating_sub(FD_RESERVE)
        .max(1);
    if want > room {
        tracing::warn!(
            "max connections {want} lowered to {room}: the open-file limit is {}",
            lim.rlim_cur
        );
    }
    want.min(room).max(1)
}

/// Serves until `stop`, then drains: returns when every connection has closed (or was dropped
/// on `kill`).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stop: CancellationToken,
    kill: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let refusal_slots = Arc::new(Semaphore::new(REFUSALS_AT_ONCE));
    let refusal = Arc::new(refusal_response());
    let tracker = TaskTracker::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("accepting a connection: {e}");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    }
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if let Ok(r) = refusal_slots.clone().try_acquire_owned() {
                let body = refusal.clone();
                tracker.spawn(async move {
                    let _slot = r;
                    let _ = tokio::time::timeout(REFUSAL_TIME, refuse(stream, &body)).await;
                });
            }
            continue;
        };
        // Small SSE events go out as they are produced.
        let _ = stream.set_nodelay(true);
        let conn = builder.serve_connection(
            TokioIo::new(WriteTimeout::new(stream, limits.write_timeout)),
            TowerToHyperService::new(router.clone()),
        );
        let (stop, kill) = (stop.clone(), kill.clone());
        tracker.spawn(async move {
            let _slot = slot;
            tokio::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = kill.cancelled() => return,
                _ = stop.cancelled() => {
                    // Finish the request in flight, then close instead of keeping alive.
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        r = conn.as_mut() => r,
                        _ = kill.cancelled() => return,
                    }
                }
            };
            if let Err(e) = r {
                // Timeouts and clients that hang up: routine, not warnings.
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// A stream whose writes fail with `TimedOut` once one has waited `limit` without progress.
/// Reads are untouched (hyper times the request head itself; the handlers time the body).
pub(crate) struct WriteTimeout<S> {
    inner: S,
    limit: Duration,
    /// Armed while a write waits; disarmed by any progress.
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteTimeout<S> {
    pub(crate) fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            timer: None,
        }
    }

    /// What a write that returned `r` becomes: progress disarms the timer; waiting arms it and
    /// fails once it fires.
    fn check<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        r: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        use std::task::Poll;
        if r.is_ready() {
            self.timer = None;
            return r;
        }
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.timer = None;
                tracing::debug!("closing a connection whose client read nothing for {limit:?}");
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the client read nothing for {limit:?}"),
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteTimeout<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, r)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, r)
    }
}

fn refusal_response() -> Vec<u8> {
    let body = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "too many open connections; retry later",
    )
    .code("too_many_connections")
    .retry_after(1)
    .to_json();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn refuse(mut stream: TcpStream, response: &[u8]) {
    if stream.write_all(response).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    // Bounded by the caller's timeout and by this many bytes.
    let mut left = 1usize << 20;
    let mut buf = [0u8; 4096];
    while left > 0 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_nobody_reads_times_out_and_progress_rearms() {
        let limit = Duration::from_millis(400);
        let (a, mut b) = tokio::io::duplex(64);
        let mut w = WriteTimeout::new(a, limit);
        // Fills the pipe, then waits for a reader.
        w.write_all(&[1u8; 64]).await.unwrap();
        let slow = tokio::spawn(async move {
            // Reads a little now and then, each time well within the limit: no timeout, though
            // the whole write takes several limits.
            let mut buf = [0u8; 16];
            for _ in 0..14 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                b.read_exact(&mut buf).await.unwrap();
            }
            b
        });
        w.write_all(&[2u8; 160]).await.unwrap();
        let _b = slow.await.unwrap();
        // Now nobody reads: the next write that cannot proceed fails after the limit.
        let start = std::time::Instant::now();
        let e = w.write_all(&[3u8; 128]).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= limit);
    }
}
