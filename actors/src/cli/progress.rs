//! Progress bars (indicatif) for the initial load: bytes read, transcoded and uploaded
//! (`run` and `chat`; a Hub download has its own bar, in `fetch`).

use crate::runtime::RuntimeHandle;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::thread::JoinHandle;
use std::time::Duration;

/// Shows three bars until the initial load is resident; stops when dropped.
pub struct LoadProgressBars {
    /// Dropped to stop the bars: the thread's wait between redraws ends at once (a plain sleep
    /// held a short `run` up to a redraw period at exit).
    stop: Option<flume::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl LoadProgressBars {
    /// Draws on stderr; hidden when stderr is not a terminal (indicatif checks) or with `-q`.
    pub fn show(handle: &RuntimeHandle) -> Self {
        let target = if super::quiet() {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        Self::with_target(handle, target)
    }

    /// Blocks until the initial load is resident (or the runtime stopped), the bars drawn to
    /// the end: for a command that should not start before the model is in place (`chat`).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    pub fn with_target(handle: &RuntimeHandle, target: ProgressDrawTarget) -> Self {
        let (stop, stopped) = flume::bounded::<()>(1);
        let handle = handle.clone();
        let thread = std::thread::Builder::new()
            .name("rf-progress".into())
            .spawn(move || {
                let multi = MultiProgress::with_draw_target(target);
                let style = ProgressStyle::with_template(
                    "{prefix:>10} [{bar:40}] {binary_bytes:>10}/{binary_total_bytes:<10} {binary_bytes_per_sec}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                let total = handle.load_progress().initial_bytes.max(1);
                let bars: Vec<ProgressBar> = ["read", "transcode", "upload"]
                    .iter()
                    .map(|name| {
                        let b = multi.add(ProgressBar::new(total));
                        b.set_style(style.clone());
                        b.set_prefix(*name);
                        b
                    })
                    .collect();
                loop {
                    let p = handle.load_progress();
                    for (b, v) in bars
                        .iter()
                        .zip([p.read_bytes, p.transcoded_bytes, p.uploaded_bytes])
                    {
                        b.set_position(v.min(total));
                    }
                    if p.initial_done || handle.is_shut_down() {
                        break;
                    }
                    // Redraw every 50 ms until the sender is dropped.
                    if !matches!(
                        stopped.recv_timeout(Duration::from_millis(50)),
                        Err(flume::RecvTimeoutError::Timeout)
                    ) {
                        break;
                    }
                }
                for b in &bars {
                    b.finish();
                }
            })
            .ok();
        Self {
            stop: Some(stop),
            thread,
        }
    }
}

impl Drop for LoadProgressBars {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
