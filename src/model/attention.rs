//! Causal attention of a step's sequences over their paged KV caches, on the CPU: every
//! (sequence, query head) pair of the step is one task of a single parallel loop, so a batch
//! of eight decoding sequences forks and joins once per layer, not once per sequence.
//!
//! Each task gathers its KV head's keys and values (f16 blocks -> f32 rows) into its thread's
//! buffers; the query heads of one GQA group are neighbours in the loop, so a thread that runs
//! them one after another gathers once for the group. The gathered rows and the arithmetic of a
//! head do not depend on which thread runs it or on the other sequences of the step: the result
//! equals each sequence's attention alone, bit for bit.

use super::error::ModelError;
use super::kv::{grow, Sequence};
use super::ops;
use super::paged::{lock, KvPool, SharedKvPool};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};

/// What a thread's gather buffers hold: (attention call, sequence of the step, KV head).
type Gathered = (u64, usize, usize);

thread_local! {
    /// f32 copies of one KV head's keys and values (attention over an f16 cache), per thread,
    /// reused across heads, layers and tokens; tagged with what they hold.
    static KV_F32: RefCell<(Vec<f32>, Vec<f32>, Option<Gathered>)> =
        const { RefCell::new((Vec::new(), Vec::new(), None)) };
}

/// Numbers each attention call, so a thread's gathered rows are never taken for another
/// call's (the cache changes between layers and steps).
static CALLS: AtomicU64 = AtomicU64::new(0);

/// One task: a query head of a sequence, its output rows (`[rows, hdv]`) and its scores.
struct Task<'a> {
    seq: usize,
    head: usize,
    out: &'a mut [f32],
    scores: &'a mut [f32],
}

/// Attention of layer `layer` for the step's sequences: `seqs[s]` has the `rows[s]` queries at
/// positions `seqs[s].pos() ..` (its keys and values stored already) in `q` (`[sum(rows),
/// n_head * head_dim]`, RoPE applied), in order; writes `attn` (`[sum(rows), n_head *
/// head_dim_v]`). `scores` and `heads` are scratch space.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_batch(
    hp: &super::HParams,
    layer: usize,
    seqs: &[&mut Sequence],
    rows: &[usize],
    q: &[f32],
    scores: &mut Vec<f32>,
    heads: &mut Vec<f32>,
    attn: &mut [f32],
) -> Result<(), ModelError> {
    let (hd, hdv, nh) = (hp.head_dim, hp.head_dim_v, hp.n_head);
    let (qd, gqa) = (hp.q_dim(), hp.gqa());
    let (scale, window, softcap) = (hp.attn_scale, hp.local_window(layer), hp.attn_softcap);
    // A step's sequences share one precision (`forward_batch` checks it).
    let fast = seqs
        .first()
        .is_some_and(|s| s.precision() == super::ops::Precision::Fast);
    let n: usize = rows.iter().sum();
    // Each distinct pool locked once (the sequences of a batch normally share one; locking
    // it twice from this thread would deadlock).
    let mut pools: Vec<&SharedKvPool> = Vec::new();
    let mut pool_of = Vec::with_capacity(seqs.len());
    for s in seqs {
        let p = s.kv.pool();
        let i = match pools.iter().position(|&o| Arc::ptr_eq(o, p)) {
            Some(i) => i,
            None => {
                pools.push(p);
                pools.len() - 1
            }
        };
        pool_of.push(i);
    }
    let guards: Vec<MutexGuard<'_, KvPool>> = pools.iter().map(|p| lock(p)).collect();
    // Keys each sequence's queries see: its cached positions and the step's.
    let lens: Vec<usize> = seqs.iter().zip(rows).map(|(s, &r)| s.pos() + r).collect();
    let scores = grow(scores, nh * lens.iter().sum::<usize>())?;
    let heads = grow(heads, nh * n * hdv)?;
    let mut tasks = Vec::with_capacity(seqs.len() * nh);
    {
        let (mut out_rest, mut sc_rest) = (&mut heads[..], &mut scores[..]);
        for (s, (&r, &len)) in rows.iter().zip(&lens).enumerate() {
            for head in 0..nh {
                let (out, o) = std::mem::take(&mut out_rest).split_at_mut(r * hdv);
                let (sc, c) = std::mem::take(&mut sc_rest).split_at_mut(len);
                (out_rest, sc_rest) = (o, c);
                tasks.push(Task {
                    seq: s,
                    head,
                    out,
                    scores: sc,
                });
            }
        }
    }
    let firsts: Vec<usize> = rows
        .iter()
        .scan(0, |f, &r| {
            let first = *f;
            *f += r;
            Some(first)
        })
        .collect();
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    tasks.into_par_iter().for_each(|t| {
        let (s, h) = (t.seq, t.head);
        let seq = &seqs[s];
        let pool: &KvPool = &guards[pool_of[s]];
        let pos0 = seq.pos();
        let q = &q[firsts[s] * qd..(firsts[s] + rows[s]) * qd];
        let run = |keys: &[f32], vals: &[f32], out: &mut [f32], scores: &mut [f32]| {
            let head = ops::AttnHead {
                q: &q[h * hd..],
                q_stride: qd,
                hd,
                hdv,
                pos0,
                scale,
                window,
                softcap,
                keys,
                vals,
                fast,
            };
            ops::attend(&head, scores, out);
        };
        let kvh = h / gqa;
        KV_F32.with(|cell| match cell.try_borrow_mut() {
            Ok(mut bufs) => {
                let (kb, vb, tag) = &mut *bufs;
                let want = Some((call, s, kvh));
                if *tag != want {
                    pool.gather(seq.kv.blocks(), layer, kvh, lens[s], kb, vb);
                    *tag = want;
                }
                run(&kb[..], &vb[..], t.out, t.scores);
            }
            // Re-entered (a nested parallel caller): private buffers.
            Err(_) => {
                let (mut kb, mut vb) = (Vec::new(), Vec::new());
                let (keys, vals) =
                    pool.gather(seq.kv.blocks(), layer, kvh, lens[s], &mut kb, &mut vb);
                run(keys, vals, t.out, t.scores);
            }
        });
    });
    // [n_head, rows, hdv] per sequence -> [rows, n_head * hdv].
    let width = nh * hdv;
    for (&r, &first) in rows.iter().zip(&firsts) {
        let hs = &heads[first * width..(first + r) * width];
        for h in 0..nh {
            for i in 0..r {
                let row = first + i;
                attn[row * width + h * hdv..row * width + (h + 1) * hdv]
                    .copy_from_slice(&hs[(h * r + i) * hdv..(h * r + i + 1) * hdv]);
            }
        }
    }
    Ok(())
}
