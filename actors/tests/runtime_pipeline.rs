//! The pipelined runtime on a synthetic model with the checksum compute (every weight byte
//! influences the tokens, so equal tokens mean the bytes arrived right).

mod runtime_common;

use futures::StreamExt;
use rocmforge_actors::compute::ChecksumCompute;
use rocmforge_actors::{Hint, MemoryBudget, ReadMode, RuntimeError, StageDelays};
use runtime_common::*;
use std::time::{Duration, Instant};

fn reference_tokens(model: &std::path::Path, n: usize) -> Vec<u32> {
    let rt = builder(model, ReadMode::Mmap, MemoryBudget::Unlimited)
        .build()
        .unwrap();
    let t = rt.generate(request(n)).collect_tokens().unwrap();
    rt.shutdown().unwrap();
    t
}

#[test]
fn streaming_at_40_percent_gives_identical_tokens_within_budget() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_model(dir.path(), 12, 64);
    let want = reference_tokens(&model, 6);
    assert_eq!(want.len(), 6);
    for mode in [ReadMode::Mmap, ReadMode::Read, ReadMode::Direct] {
        let rt = builder(&model, mode, MemoryBudget::FractionOfWeights(0.4))
            .build()
            .unwrap();
        let got = rt.generate(request(6)).collect_tokens().unwrap();
        assert_eq!(got, want, "{mode:?}");
        let s = rt.stats();
        assert!(s.peak_resident_bytes <= s.budget_bytes, "{mode:?}: {s:?}");
        assert!(s.peak_allocated_bytes <= s.budget_bytes, "{mode:?}: {s:?}");
        // It really streamed: layers were evicted and loaded again.
        assert!(s.evictions > 0, "{mode:?}: {s:?}");
        assert!(s.loads_per_layer.iter().any(|&n| n > 1), "{mode:?}: {s:?}");
        if mode != ReadMode::Mmap {
            assert!(s.peak_allocated_bytes > 0);
        }
        rt.shutdown().unwrap();
    }
}

#[test]
fn budget_below_the_output_head_streams_it_in_row_chunks() {
    // 12 layers of 68 KiB and a tied 512 KiB head (38 % of the weights): at 25 % the head cannot
    // stay resident, so it streams through the window in chunks like the layers.
    let dir = tempfile::tempdir().unwrap();
    let vocab = 4096;
    let model = synthetic_model_vocab(dir.path(), 12, 64, vocab);
    let rt = builder_vocab(&model, ReadMode::Mmap, MemoryBudget::Unlimited, vocab)
        .build()
        .unwrap();
    let want = rt.generate(request(5)).collect_tokens().unwrap();
    let g = rt.n_layers();
    assert_eq!(
        rt.stats().loads_per_layer.len(),
        g + 1,
        "no split without a budget"
    );
    rt.shutdown().unwrap();
    for mode in [ReadMode::Mmap, ReadMode::Read] {
        let rt = builder_vocab(&model, mode, MemoryBudget::FractionOfWeights(0.25), vocab)
            .build()
            .unwrap();
        let got = rt.generate(request(5)).collect_tokens().unwrap();
        assert_eq!(got, want, "{mode:?}");
        let s = rt.stats();
        assert!(s.peak_resident_bytes <= s.budget_bytes, "{mode:?}: {s:?}");
        assert!(s.peak_allocated_bytes <= s.budget_bytes, "{mode:?}: {s:?}");
        let chunks = &s.loads_per_layer[g + 1..];
        assert!(chunks.len() > 1, "{mode:?}: head not split: {s:?}");
        // Streamed: some chunk was loaded for every token.
        assert!(chunks.iter().any(|&n| n >= 5), "{mode:?}: {s:?}");
        rt.shutdown().unwrap();
    }
}

#[test]
fn streamed_head_chunks_tile_the_head_in_aligned_row_blocks() {
    use rocmforge_actors::pipeline::backend::CpuBackend;
    use rocmforge_actors::pipeline::plan::{LoadPlan, HEAD_ROW_ALIGN};
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_model_vocab(dir.path(), 3, 64, 4096);
    let file = rocmforge::gguf::GgufFile::open(&model).unwrap();
    let plan = LoadPlan::new(&file, &CpuBackend::new()).unwrap();
    let g = plan.global();
    // 64 KiB chunks: 512 rows of 32 f32.
    let split = plan
        .stream_head(&file, &CpuBackend::new(), 64 << 10)
        .unwrap()
        .expect("a head to split");
    let head = split.head.clone().expect("head split");
    assert_eq!(head.tensor, "token_embd.weight");
    assert_eq!(head.rows, 4096);
    assert_eq!(head.units, g + 1..g + 9);
    assert!(split.units[g].tensors.iter().all(|t| t.name != head.tensor));
    let whole = plan.units[g]
        .tensors
        .iter()
        .find(|t| t.name == head.tensor)
        .unwrap();
    let mut next_row = 0;
    let mut next_byte = whole.file.start;
    for u in head.units.clone() {
        let rows = split.head_rows(u).unwrap();
        assert_eq!(rows.start, next_row);
        assert_eq!(rows.start % HEAD_ROW_ALIGN, 0);
        assert_eq!(split.units[u].file_span.start, next_byte);
        assert!(split.units[u].dev_bytes <= 64 << 10);
        next_row = rows.end;
        next_byte = split.units[u].file_span.end;
    }
    assert_eq!((next_row, next_byte), (4096, whole.file.end));
    // Every weight byte is still planned exactly once.
    let file_bytes = |p: &LoadPlan| p.units.iter().map(|u| u.file_bytes).sum::<u64>();
    assert_eq!(file_bytes(&split), file_bytes(&plan));
    let dims = split.unit_dims(&file);
    assert_eq!(dims[g + 1][0], (32, 512));
    // Splitting twice is refused.
    assert!(split
        .stream_head(&file, &CpuBackend::new(), 64 << 10)
        .unwrap()
        .is_none());
}

#[test]
fn a_compute_that_cannot_stream_the_head_makes_such_a_budget_a_build_error() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = 4096;
    let model = synthetic_model_vocab(dir.path(), 12, 64, vocab);
    // The bare checksum compute has no file to embed from: it needs the head resident.
    let bare: rocmforge_actors::compute::ComputeFactory =
        std::sync::Arc::new(move |_file, _| Ok(Box::new(ChecksumCompute::new(12, vocab)) as _));
    let r = builder(
        &model,
        ReadMode::Read,
        MemoryBudget::FractionOfWeights(0.25),
    )
    .compute(bare.clone())
    .build();
    match r {
        Err(RuntimeError::Config(m)) => assert!(m.contains("output head"), "{m}"),
        other => panic!("expected a config error, got {other:?}"),
    }
    // With a budget that holds the head, the same compute runs.
    let rt = builder(&model, ReadMode::Read, MemoryBudget::FractionOfWeights(0.6))
        .compute(bare)
        .build()
        .unwrap();
    assert_eq!(rt.generate(request(2)).collect_tokens().unwrap().len(), 2);
    rt.shutdown().unwrap();
}

#[test]
fn async_stream_and_blocking_iterator_agree() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_model(dir.path(), 4, 32);
    let rt = builder(&model, ReadMode::Read, MemoryBudget::Unlimited)
        .build()
        .unwrap();
    let blocking = rt.generate(request(5)).collect_tokens().unwrap();
    let tokio_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let streamed: Vec<u32> = tokio_rt.block_on(async {
        rt.generate(request(5))
            .map(|r| r.unwrap().token)
            .collect()
            .await
    });
    assert_eq!(blocking, streamed);
}

#[test]
fn budget_smaller_than_one_layer_is_a_build_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_model(dir.path(), 4, 32);
    let start = Instant::now();
    let r = builder(&model, ReadMode::Read, MemoryBudget::Bytes(4096)).build();
    assert!(
        matches!(r, Err(RuntimeError::BudgetTooSmall { .. })),
        "{r:?}"
    );
    // Not a hang: the check runs before any actor starts (generous bound, not a benchmark).
    assert!(start.elapsed() < Duration::from_secs(30));
}

/// Polls `stats()` until `pred` holds (the scheduler publishes after the messages it handles),
/// bounded so a bug fails instead of hanging.
fn wait_for(
    rt: &rocmforge_actors::RuntimeHandle,
    what: &str,
    pred: impl Fn(&rocmforge_actors::Stats) -> bool,
) -> rocmforge_actors::Stats {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let s = rt.stats();
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < until, "{what}: {s:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn hints_prefetch_pin_release() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_model(dir.path(), 12, 64);
    let want1 = reference_tokens(&model, 1);
    let rt = builder(&model, ReadMode::Read, MemoryBudget::FractionOfWeights(0.4))
        .prefetch_depth(1)
        .build()
        .unwrap();
    rt.wait_loaded(Duration::from_secs(30)).unwrap();
    let last = rt.n_layers() - 1;
    let s0 = rt.stats();
    assert!(!s0.fixed_layers.contains(&last), "{s0:?}");
    let resident = s0.fixed_layers[0];

    // Prefetch of a resident layer: a no-op, nothing loaded.
    rt.hint(Hint::Prefetch {
        layers: vec![resident],
    })
    .unwrap();
    let s1 = rt.stats();
    assert_eq!(s1.hint_noops, s0.hint_noops + 1);
    assert_eq!(s1.loads_per_layer, s0.loads_per_layer);

    // Prefetch of a streamed layer that is not resident: loaded now, without a request, by
    // demoting the fixed layer used last; the budget holds.
    assert!(!s0.resident_layers[last], "{s0:?}");
    rt.hint(Hint::Prefetch { layers: vec![last] }).unwrap();
    let sp = wait_for(&rt, "prefetched layer resident", |s| {
        s.resident_layers[last]
    });
    assert_eq!(sp.loads_per_layer[last], s0.loads_per_layer[last] + 1);
    assert_eq!(sp.fixed_layers.len() + 1, s0.fixed_layers.len(), "{sp:?}");
    assert!(sp.resident_bytes <= sp.budget_bytes, "{sp:?}");
    assert_eq!(sp.hint_noops, s1.hint_noops);
    // Prefetching it again is a no-op.
    rt.hint(Hint::Prefetch { layers: vec![last] }).unwrap();
    assert_eq!(rt.stats().hint_noops, sp.hint_noops + 1);
    // Its next use finds it resident (not loaded again); after that use the plan is back.
    assert_eq!(rt.generate(request(1)).collect_tokens().unwrap(), want1);
    let su = wait_for(&rt, "fixed set restored", |s| {
        s.fixed_layers == s0.fixed_layers
    });
    assert_eq!(su.loads_per_layer[last], sp.loads_per_layer[last], "{su:?}");
    assert!(su.peak_resident_bytes <= su.budget_bytes, "{su:?}");
    let s0 = su;

    // Pin the last (streamed) layer: loaded once, stays across tokens under pressure.
    rt.hint(Hint::Pin { layers: vec![last] }).unwrap();
    rt.generate(request(4)).collect_tokens().unwrap();
    let s2 = rt.stats();
    assert_eq!(s2.pinned_layers, vec![last]);
    assert!(s2.resident_layers[last], "{s2:?}");
    assert!(
        s2.loads_per_layer[last] <= s0.loads_per_layer[last] + 1,
        "{s2:?}"
    );
    let streamed = (0..last)
        .rev()
        .find(|l| !s2.fixed_layers.contains(l))
        .expect("a streamed layer");
    assert!(
        s2.loads_per_layer[streamed] >= s0.loads_per_layer[streamed] + 4,
        "{s2:?}"
    );
    assert!(s2.peak_resident_bytes <= s2.budget_bytes);

    // Release: the layer streams again (loaded once per token).
    rt.hint(Hint::Release { layers: vec![last] }).unwrap();
    rt.generate(request(3)).collect_tokens().unwrap();
    let s3 = rt.stats();
    assert!(s3.pinned_layers.is_empty());
    assert!(
        s3.loads_per_layer[last] >= s2.loads_per_layer[last] + 2,
        "{s3:?}"
    );

    // Pinning everything cannot fit: rejected, the plan unchanged.
    let all: Vec<usize> = (0..=last).collect();
    assert!(matches!(
        rt.hint(Hint::Pin { layers: all }),
        Err(RuntimeError::HintRejected(_))
    ));
    assert!(rt.stats().pinned_layers.is_empty());
    assert!(rt.hint(Hint::WarmUp).is_ok());
    rt.shutdown().unwrap();
}

#[test]
fn dropping_a_stream_frees_its_kv_slot_and_the_next_request_runs() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_model(dir.path(), 6, 32);
    let want = reference_tokens(&model, 3);
    let rt = builder(&model, ReadMode::Read, MemoryBudget::FractionOfWeights(0.5))
        .compute(ChecksumCompute::factory(VOCAB, Duration::from_millis(5)))
        .build()
        .unwrap();
    let mut it = rt.generate(request(10_000)).into_blocking();
    it.next().unwrap().unwrap();
    it.next().unwrap().unwrap();
    assert_eq!(rt.stats().kv_slots_in_use, 1);
    drop(it);
    // Liveness bound, not a timing claim: cancellation lands within one layer.
    let deadline = Instant::now() + Duration::from_secs(20);
    while rt.stats().kv_slots_in_use != 0 {
        assert!(Instant::now() < deadline, "KV slot not freed");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(rt.generate(request(3)).collect_tokens().unwrap(), want);
    rt.shutdown().unwrap();
}

#[test]
fn capacity_one_channels_and_a_slow_stage_do_not_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_model(dir.path(), 8, 64);
    let want = reference_tokens(&model, 4);
    for delays in [
        StageDelays {
            transcode_per_chunk: Duration::from_millis(1),
            ..Default::default()
        },
        StageDelays {
            upload_per_chunk: Duration::from_millis(1),
            ..Default::default()
        },
    ] {
        let (tx, rx) = std::sync::mpsc::channel();
        let model2 = model.clone();
        std::thread::spawn(move || {
            let rt = builder(
                &model2,
                ReadMode::Read,
                MemoryBudget::FractionOfWeights(0.4),
            )
            .channel_capacity(1)
            .staging(1, 16 << 10)
            .readers(3)
            .transcode_threads(2)
            .prefetch_depth(3)
            .stage_delays(delays)
            .build()
            .unwrap();
            let t = rt.generate(request(4)).collect_tokens();
            let s = rt.stats();
            rt.shutdown().unwrap();
            let _ = tx.send((t, s));
        });
        // A deadlock shows as no answer at all; two minutes is far beyond the work involved.
        let (got, stats) = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("pipeline deadlocked with capacity-1 channels");
        assert_eq!(got.unwrap(), want);
        assert!(stats.peak_resident_bytes <= stats.budget_bytes);
    }
}

#[test]
fn shutdown_during_the_load_cancels_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_model(dir.path(), 12, 64);
    // A very slow disk: the load would take seconds.
    let rt = builder(&model, ReadMode::Read, MemoryBudget::Unlimited)
        .stage_delays(StageDelays {
            read_per_chunk: Duration::from_millis(50),
            ..Default::default()
        })
        .build()
        .unwrap();
    rt.shutdown().unwrap();
    let p = rt.load_progress();
    assert!(!p.initial_done, "{p:?}");
    assert!(p.read_bytes < p.initial_bytes, "{p:?}");
    assert_eq!(rt.stats().allocated_bytes, 0);
    assert_eq!(rt.staging_slots_in_use(), 0);
}
