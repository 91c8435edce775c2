//! The fill pipeline: items are packed into slot-sized fills; fill threads (the ring's pool)
//! read page-aligned tasks of up to `slots - 1` fills ahead, and the calling thread queues each
//! fill's copies and its slot event as soon as the fill's last task is done, then hands the
//! freed slot to the next fill. Nothing waits at a per-slot barrier: with a barrier (one slot
//! filled by all threads, then its copies queued) the H100 read 30-37 GB/s, while the same
//! threads reading continuously reach 63-65 GB/s (`docs/results/...-v4-call1.txt`, probe).

use super::super::bind;
use super::{since_epoch_ms, DevRange, PinnedRing, UploadItem, TASK_ALIGN};
use crate::backend::cuda::stream::Stream;
use crate::backend::error::{BackendError, BackendResult};
use crate::backend::{DeviceEvent, DeviceStream};
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

/// A piece of a slot: `len` source bytes at `src` into the slot at `slot_off`, then copied to
/// `dst` at `dst_off`.
struct Piece {
    src: usize,
    len: usize,
    slot_off: usize,
    dst: DevRange,
    dst_off: usize,
}

/// One slot's worth of pieces.
#[derive(Default)]
struct Fill {
    pieces: Vec<Piece>,
    bytes: usize,
}

/// Packs the groups' items into fills of `slot_bytes` (in order, pieces split at slot ends)
/// and returns, per group, the fill after whose queueing the group is complete (`None`: an
/// empty group before any bytes). Checks every item against the source and destination.
fn plan<G: AsRef<[UploadItem]>>(
    map_len: usize,
    groups: &[G],
    slot_bytes: usize,
) -> BackendResult<(Vec<Fill>, Vec<Option<usize>>)> {
    let mut fills = Vec::new();
    let mut cur = Fill::default();
    let mut done_after = Vec::with_capacity(groups.len());
    for g in groups {
        for it in g.as_ref() {
            let len = it.src.end.saturating_sub(it.src.start);
            if it.src.start > it.src.end || it.src.end > map_len {
                return Err(BackendError::InvalidArgument {
                    op: "PinnedRing::upload",
                    what: format!("source {:?} outside the file ({map_len} bytes)", it.src),
                });
            }
            if it.dst_off.checked_add(len).is_none_or(|e| e > it.dst.len) {
                return Err(BackendError::InvalidArgument {
                    op: "PinnedRing::upload",
                    what: format!(
                        "{len} bytes to offset {} of a {}-byte destination",
                        it.dst_off, it.dst.len
                    ),
                });
            }
            let mut at = it.src.start;
            while at < it.src.end {
                if cur.bytes == slot_bytes {
                    fills.push(std::mem::take(&mut cur));
                }
                let n = (it.src.end - at).min(slot_bytes - cur.bytes);
                cur.pieces.push(Piece {
                    src: at,
                    len: n,
                    slot_off: cur.bytes,
                    dst: it.dst,
                    dst_off: it.dst_off + (at - it.src.start),
                });
                cur.bytes += n;
                at += n;
            }
        }
        // The fill holding the group's last byte: the open one if it has bytes (it gets the
        // next index), else the last pushed.
        done_after.push(if cur.bytes > 0 {
            Some(fills.len())
        } else {
            fills.len().checked_sub(1)
        });
    }
    if cur.bytes > 0 {
        fills.push(cur);
    }
    Ok((fills, done_after))
}

/// See [`PinnedRing::upload_groups`].
pub(super) fn run<G: AsRef<[UploadItem]>>(
    ring: &mut PinnedRing,
    map: &[u8],
    groups: &[G],
    cancel: Option<&AtomicBool>,
    mut on_group: impl FnMut(usize, &[Stream]) -> BackendResult<()>,
) -> BackendResult<bool> {
    let (fills, done_after) = plan(map.len(), groups, ring.slot_bytes)?;
    bind(&ring.ctx)?;
    let PinnedRing {
        slots,
        streams,
        base,
        slot_bytes,
        task_bytes,
        next,
        pool,
        file,
        stats,
        ..
    } = ring;
    let (slot_bytes, task_bytes) = (*slot_bytes, *task_bytes);
    let mut g_next = 0usize;
    // Groups complete once fill `upto` is queued (`None`: before any fill).
    let mut signal = |upto: Option<usize>| -> BackendResult<()> {
        while g_next < done_after.len() && done_after[g_next] <= upto {
            on_group(g_next, streams)?;
            g_next += 1;
        }
        Ok(())
    };
    signal(None)?;
    let n = fills.len();
    if n == 0 {
        return Ok(true);
    }
    let s = slots.len();
    let slot0 = *next;
    // The slots' addresses cross threads as integers: every task writes a disjoint range of a
    // slot that is not in flight.
    let base = *base;
    let file = file.as_ref();
    let remaining: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
    let done = Mutex::new(vec![false; n]);
    let done_cv = Condvar::new();
    let failed: Mutex<Option<BackendError>> = Mutex::new(None);
    let t_base = Instant::now();
    let first_ns = AtomicU64::new(u64::MAX);
    let last_ns = AtomicU64::new(0);
    let busy_ns = AtomicU64::new(0);
    let ns = |t: Instant| u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut queued = 0usize;
    let r = pool.in_place_scope(|sc| -> BackendResult<bool> {
        let spawn_fill = |k: usize| {
            let slot_base = base + ((slot0 + k) % s) * slot_bytes;
            let tasks = split_tasks(&fills[k].pieces, fills[k].bytes.div_ceil(task_bytes));
            remaining[k].store(tasks.len(), Ordering::Relaxed);
            for task in tasks {
                let (remaining, done, done_cv, failed) = (&remaining, &done, &done_cv, &failed);
                let (first_ns, last_ns, busy_ns) = (&first_ns, &last_ns, &busy_ns);
                sc.spawn(move |_| {
                    let t0 = ns(t_base);
                    first_ns.fetch_min(t0, Ordering::Relaxed);
                    let mut r = Ok(());
                    for &(src, len, off) in &task {
                        // SAFETY: `off + len <= slot_bytes` (pieces are packed within the
                        // slot), tasks of one fill are disjoint, and the slot is not in flight
                        // (its previous copy was waited for before this fill was spawned) and
                        // written by no one else until this fill is queued.
                        r = unsafe {
                            read_into(file, map, src, (slot_base as *mut u8).add(off), len)
                        };
                        if r.is_err() {
                            break;
                        }
                    }
                    let t1 = ns(t_base);
                    last_ns.fetch_max(t1, Ordering::Relaxed);
                    busy_ns.fetch_add(t1.saturating_sub(t0), Ordering::Relaxed);
                    if let Err(e) = r {
                        lock(failed).get_or_insert(e);
                    }
                    // AcqRel: the last task to finish sees every other task's writes and
                    // publishes them through the mutex to the queueing thread.
                    if remaining[k].fetch_sub(1, Ordering::AcqRel) == 1 {
                        lock(done)[k] = true;
                        done_cv.notify_all();
                    }
                });
            }
        };
        let ahead = (s - 1).max(1).min(n);
        for k in 0..ahead {
            free_slot(&mut slots[(slot0 + k) % s], stats)?;
            spawn_fill(k);
        }
        let mut spawned = ahead;
        for k in 0..n {
            if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                return Ok(false);
            }
            let t = Instant::now();
            {
                let mut d = lock(&done);
                while !d[k] {
                    d = done_cv.wait(d).unwrap_or_else(|p| p.into_inner());
                }
            }
            stats.stall_s += t.elapsed().as_secs_f64();
            if let Some(e) = lock(&failed).take() {
                return Err(e);
            }
            let si = (slot0 + k) % s;
            let stream = &streams[(slot0 + k) % streams.len()];
            let (t, at) = (Instant::now(), since_epoch_ms());
            let slot_ptr = base + si * slot_bytes;
            for p in &fills[k].pieces {
                // SAFETY: the source lies inside slot `si` (`slot_off + len <= slot_bytes`) of
                // the ring's pinned memory, which outlives the copy (the ring drains before it
                // drops it) and is not written again before `done` (recorded right after on
                // the same stream) completed; the destination range was checked in `plan` and
                // outlives the copy per `upload_groups`' contract.
                unsafe {
                    cudarc::driver::sys::cuMemcpyHtoDAsync_v2(
                        p.dst.ptr + p.dst_off as u64,
                        ((slot_ptr + p.slot_off) as *const u8).cast(),
                        p.len,
                        stream.raw(),
                    )
                }
                .result()
                .map_err(|e| super::super::drv_err("cuMemcpyHtoDAsync", e))?;
                stats.bytes += p.len as u64;
            }
            stream.record(&slots[si].done)?;
            slots[si].in_flight = true;
            queued = k + 1;
            let q = t.elapsed().as_secs_f64();
            stats.queue_s += q;
            if q * 1e3 > stats.queue_max_ms {
                stats.queue_max_ms = q * 1e3;
                stats.queue_max_at_ms = at;
            }
            signal(Some(k))?;
            if spawned < n {
                free_slot(&mut slots[(slot0 + spawned) % s], stats)?;
                spawn_fill(spawned);
                spawned += 1;
            }
        }
        Ok(true)
    });
    // Every spawned task has ended here (the scope joined them).
    *next = (slot0 + queued) % s;
    let (first, last) = (first_ns.into_inner(), last_ns.into_inner());
    if first != u64::MAX {
        stats.fill_s += last.saturating_sub(first) as f64 * 1e-9;
    }
    stats.read_busy_s += busy_ns.into_inner() as f64 * 1e-9;
    r
}

/// A slot is handed to a fill only after its previous copy completed.
fn free_slot(slot: &mut super::Slot, stats: &mut super::UploadStats) -> BackendResult<()> {
    if slot.in_flight {
        let t = Instant::now();
        slot.done.synchronize()?;
        slot.in_flight = false;
        stats.wait_s += t.elapsed().as_secs_f64();
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock still holds consistent data here (flags and an error slot).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One fill task: (source offset, length, slot offset) runs.
type FillTask = Vec<(usize, usize, usize)>;

/// Splits a slot's pieces into about `n` tasks of equal bytes (page multiples).
fn split_tasks(pieces: &[Piece], n: usize) -> Vec<FillTask> {
    let total: usize = pieces.iter().map(|p| p.len).sum();
    let share = total.div_ceil(n.max(1)).div_ceil(TASK_ALIGN).max(1) * TASK_ALIGN;
    let mut tasks = Vec::new();
    let mut cur: FillTask = Vec::new();
    let mut room = share;
    for p in pieces {
        let mut o = 0;
        while o < p.len {
            let n = (p.len - o).min(room);
            cur.push((p.src + o, n, p.slot_off + o));
            o += n;
            room -= n;
            if room == 0 {
                tasks.push(std::mem::take(&mut cur));
                room = share;
            }
        }
    }
    if !cur.is_empty() {
        tasks.push(cur);
    }
    tasks
}

/// Writes `len` bytes of the source at `src` to `dst`: `pread` from `file`, else a copy from
/// `map` (bounds checked by the caller).
///
/// # Safety
/// `dst` must be valid for `len` writes that no other thread touches during the call.
unsafe fn read_into(
    file: Option<&File>,
    map: &[u8],
    src: usize,
    dst: *mut u8,
    len: usize,
) -> BackendResult<()> {
    let Some(f) = file else {
        // SAFETY: `map[src..src + len]` is in bounds (checked in `plan`); `dst` per the
        // contract; the two never overlap (pinned slot vs file mapping).
        unsafe { std::ptr::copy_nonoverlapping(map.as_ptr().add(src), dst, len) };
        return Ok(());
    };
    use std::os::fd::AsRawFd;
    let mut done = 0usize;
    while done < len {
        // SAFETY: `dst + done` is valid for `len - done` writes per the contract; the fd is open
        // for the life of `f`.
        let r = unsafe {
            libc::pread(
                f.as_raw_fd(),
                dst.add(done).cast(),
                len - done,
                (src + done) as libc::off_t,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(BackendError::WeightRead {
                offset: src + done,
                len: len - done,
                source: e,
            });
        }
        if r == 0 {
            return Err(BackendError::WeightRead {
                offset: src + done,
                len: len - done,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        done += r as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(src: usize, len: usize, slot_off: usize) -> Piece {
        Piece {
            src,
            len,
            slot_off,
            dst: DevRange { ptr: 0, len: 0 },
            dst_off: 0,
        }
    }

    /// Tasks cover every byte of every piece exactly once, source and slot offsets move
    /// together, and no task is much larger than an even share.
    #[test]
    fn split_tasks_covers_each_byte_once_in_even_shares() {
        let pieces = vec![
            piece(1000, 16 << 10, 0),
            piece(90_000, (20 << 20) + 123, 16 << 10),
            piece(50_000_000, 12 << 20, (16 << 10) + (20 << 20) + 123),
        ];
        let total: usize = pieces.iter().map(|p| p.len).sum();
        for threads in [1, 3, 8, 12, 16] {
            let tasks = split_tasks(&pieces, threads);
            assert!(tasks.len() <= threads, "{threads}: {} tasks", tasks.len());
            let mut covered = vec![0u8; total];
            for t in &tasks {
                let bytes: usize = t.iter().map(|r| r.1).sum();
                assert!(
                    bytes <= total.div_ceil(threads) + TASK_ALIGN,
                    "{threads}: {bytes}"
                );
                for &(src, len, off) in t {
                    let p = pieces
                        .iter()
                        .find(|p| off >= p.slot_off && off < p.slot_off + p.len)
                        .expect("run inside a piece");
                    assert_eq!(
                        src - p.src,
                        off - p.slot_off,
                        "source and slot offsets agree"
                    );
                    assert!(off + len <= p.slot_off + p.len, "run stays in its piece");
                    covered[off..off + len].iter_mut().for_each(|c| *c += 1);
                }
            }
            assert!(covered.iter().all(|&c| c == 1), "{threads}: each byte once");
        }
    }

    fn item(
        src: std::ops::Range<usize>,
        dst_ptr: u64,
        dst_len: usize,
        dst_off: usize,
    ) -> UploadItem {
        UploadItem {
            src,
            dst: DevRange {
                ptr: dst_ptr,
                len: dst_len,
            },
            dst_off,
        }
    }

    /// Fills are full slots except the last, every source byte lands once at the right
    /// destination offset, and each group completes with the fill holding its last byte
    /// (empty groups with their predecessor, a leading empty group before any fill).
    #[test]
    fn plan_packs_groups_into_slots_and_completes_each_group_in_order() {
        let slot = 1000;
        let groups = vec![
            vec![],
            vec![item(0..700, 1, 700, 0), item(800..1100, 1, 1000, 700)],
            vec![item(2000..4000, 2, 3000, 500)],
            vec![],
            vec![item(5000..5001, 3, 1, 0)],
        ];
        let (fills, done_after) = plan(6000, &groups, slot).expect("plan");
        let total: usize = groups.iter().flatten().map(|i| i.src.len()).sum();
        assert_eq!(fills.iter().map(|f| f.bytes).sum::<usize>(), total);
        assert_eq!(fills.len(), total.div_ceil(slot));
        for f in &fills[..fills.len() - 1] {
            assert_eq!(f.bytes, slot, "only the last fill is partial");
        }
        // Byte-exact placement: source offset s goes to (dst ptr, dst_off + s - src.start).
        let mut seen = std::collections::HashMap::new();
        for f in &fills {
            let mut off = 0;
            for p in &f.pieces {
                assert_eq!(p.slot_off, off, "pieces are packed");
                off += p.len;
                for b in 0..p.len {
                    assert!(seen.insert(p.src + b, (p.dst.ptr, p.dst_off + b)).is_none());
                }
            }
        }
        for it in groups.iter().flatten() {
            for s in it.src.clone() {
                assert_eq!(seen[&s], (it.dst.ptr, it.dst_off + s - it.src.start));
            }
        }
        // Group 1 ends in fill 0 (700 + 300 = 1000 bytes exactly), group 2 in fill 2
        // (bytes 1000..3000), group 3 (empty) with it, group 4's byte in fill 3.
        assert_eq!(done_after, vec![None, Some(0), Some(2), Some(2), Some(3)]);
    }

    #[test]
    fn plan_rejects_items_outside_the_file_or_the_destination() {
        assert!(plan(100, &[vec![item(50..101, 1, 100, 0)]], 64).is_err());
        assert!(plan(100, &[vec![item(0..50, 1, 60, 20)]], 64).is_err());
        assert!(plan(100, &[vec![item(0..50, 1, 70, 20)]], 64).is_ok());
    }

    #[test]
    fn split_tasks_of_nothing_is_empty() {
        assert!(split_tasks(&[], 8).is_empty());
    }
}
