//! Continuous batching in the runtime with the real SmolLM2 model on the CPU (exact mode):
//! concurrent requests give the tokens they give alone, prompts are read in chunks beside
//! decoding sequences, a client that goes away frees its KV blocks, a full KV pool makes
//! requests wait (and the bounded queue refuses past its capacity), sessions keep working.

use rocmforge::model::{Precision, SequenceConfig};
use rocmforge_actors::compute::llama::LlamaCompute;
use rocmforge_actors::{GenerateRequest, Runtime, RuntimeBuilder, RuntimeError};
use std::path::PathBuf;

fn smollm2() -> PathBuf {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "test model {} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

/// Prompts of different lengths (SmolLM2 token ids).
const PROMPTS: [&[u32]; 5] = [
    &[504, 3575, 282, 4649, 314],
    &[1, 2683, 2],
    &[
        504, 3575, 282, 4649, 314, 1, 9690, 28, 359, 3575, 282, 4649, 314, 906, 30, 216, 504,
    ],
    &[19842],
    &[28, 359, 3575, 282, 4649, 314, 906, 30],
];
const NEW: usize = 8;

fn builder() -> RuntimeBuilder {
    Runtime::builder()
        .model(smollm2())
        .compute(LlamaCompute::factory(SequenceConfig {
            ctx: Some(256),
            precision: Precision::Exact,
            kv_type: None,
        }))
}

fn request(prompt: &[u32]) -> GenerateRequest {
    let mut r = GenerateRequest::tokens(prompt.to_vec(), NEW);
    r.stop_at_eos = false;
    r
}

/// Each prompt alone, one request after the other.
fn alone() -> Vec<Vec<u32>> {
    let rt = builder().max_num_seqs(1).build().unwrap();
    let out = PROMPTS
        .iter()
        .map(|p| rt.generate(request(p)).collect_tokens().unwrap())
        .collect();
    rt.shutdown().unwrap();
    out
}

/// Every prompt submitted at once; the streams read on threads of their own.
fn together(rt: &rocmforge_actors::RuntimeHandle) -> Vec<Vec<u32>> {
    let streams: Vec<_> = PROMPTS.iter().map(|p| rt.generate(request(p))).collect();
    let handles: Vec<_> = streams
        .into_iter()
        .map(|s| std::thread::spawn(move || s.collect_tokens().unwrap()))
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn concurrent_requests_give_the_tokens_they_give_alone() {
    let want = alone();
    // Small steps: the long prompt is read in chunks of a few tokens while others decode.
    for max_batch_tokens in [6, 512] {
        let rt = builder()
            .max_num_seqs(8)
            .max_batch_tokens(max_batch_tokens)
            .build()
            .unwrap();
        let got = together(&rt);
        assert_eq!(got, want, "max_batch_tokens {max_batch_tokens}");
        let s = rt.stats();
        // Steps carried several sequences at once (buckets: 1, 2, 4, ...).
        assert!(
            s.batch_steps.iter().skip(1).sum::<u64>() > 0,
            "no batched step: {:?}",
            s.batch_steps
        );
        // At most `max_batch_tokens` tokens per step: with 6 the 17-token prompt took
        // several steps.
        let steps: u64 = s.batch_steps.iter().sum();
        assert!(s.batch_step_tokens <= steps * max_batch_tokens as u64);
        assert_eq!(
            s.kv_blocks_used, 0,
            "KV blocks left after every request ended"
        );
        assert!(s.kv_blocks_total > 0);
        assert_eq!((s.running_seqs, s.waiting_seqs), (0, 0));
        rt.shutdown().unwrap();
    }
}

/// Seeded sampling (the API's defaults at temperature 1): the draws of sequences sampled in one
/// step (on the actor's pool at once) are those each makes alone.
#[test]
fn concurrent_sampled_requests_draw_what_they_draw_alone() {
    let sampled = |i: usize, p: &[u32]| {
        let mut r = request(p);
        r.sampling = rocmforge::sample::SamplingParams {
            temperature: 1.0,
            seed: Some(1_000 + i as u64),
            ..Default::default()
        };
        r
    };
    let rt = builder().max_num_seqs(1).build().unwrap();
    let want: Vec<Vec<u32>> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| rt.generate(sampled(i, p)).collect_tokens().unwrap())
        .collect();
    rt.shutdown().unwrap();
    let rt = builder().max_num_seqs(8).build().unwrap();
    let streams: Vec<_> = PROMPTS
        .iter()
        .enumerate()
        .map(|(i, p)| rt.generate(sampled(i, p)))
        .collect();
    let got: Vec<Vec<u32>> = streams
        .into_iter()
        .map(|s| std::thread::spawn(move || s.collect_tokens().unwrap()))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let s = rt.stats();
    assert!(
        s.batch_steps.iter().skip(1).sum::<u64>() > 0,
        "no batched step: {:?}",
        s.batch_steps
    );
    rt.shutdown().unwrap();
    assert_eq!(got, want);
}

#[test]
fn a_client_that_goes_away_frees_its_blocks_and_the_others_finish() {
    let want = alone();
    let rt = builder().max_num_seqs(8).build().unwrap();
    let mut gone = rt
        .generate(GenerateRequest::tokens(PROMPTS[2].to_vec(), 200))
        .into_blocking();
    let streams: Vec<_> = [0, 1]
        .iter()
        .map(|&i| rt.generate(request(PROMPTS[i])))
        .collect();
    // Its first token arrives, then the client drops the stream mid-generation.
    gone.next().unwrap().unwrap();
    drop(gone);
    let got: Vec<Vec<u32>> = streams
        .into_iter()
        .map(|s| s.collect_tokens().unwrap())
        .collect();
    assert_eq!(got, want[..2]);
    // Every request has ended (the dropped one leaves at the next step).
    let s = rt.stats();
    assert_eq!(s.kv_blocks_used, 0, "{s:?}");
    assert_eq!(s.kv_slots_in_use, 0);
    rt.shutdown().unwrap();
}

#[test]
fn a_full_kv_pool_makes_requests_wait_and_the_queue_refuses_past_its_capacity() {
    let want = alone();
    // Room for one request's prompt and output at a time (24 positions of 16-token blocks:
    // 2 blocks), so the others wait in the queue.
    let per_block = {
        let file = rocmforge::gguf::GgufFile::open(smollm2()).unwrap();
        let hp = rocmforge::model::HParams::try_from(file.metadata()).unwrap();
        rocmforge::model::paged::block_bytes(&hp, rocmforge::model::KvType::F32, 16) as u64
    };
    let rt = builder()
        .max_num_seqs(8)
        .kv_budget(2 * per_block)
        .queue_capacity(8)
        .build()
        .unwrap();
    let got = together(&rt);
    assert_eq!(got, want, "requests that waited for KV room");
    let s = rt.stats();
    assert_eq!(s.kv_blocks_total, 2);
    assert_eq!(s.kv_blocks_used, 0);

    // A request larger than the whole pool is refused, not left waiting forever.
    let r = rt
        .generate(GenerateRequest::tokens(PROMPTS[0].to_vec(), 100))
        .collect_tokens();
    assert!(matches!(r, Err(RuntimeError::BadRequest(_))), "{r:?}");

    // A client that reads one token and no more holds its sequence (and all 6 blocks of this
    // pool: 5 + 90 positions) once its stream's buffer is full; later requests wait:
    // `queue_capacity` in the queue (and perhaps one taken from it), the rest are refused with
    // `QueueFull`.
    let small = builder()
        .max_num_seqs(8)
        .kv_budget(6 * per_block)
        .queue_capacity(2)
        .build()
        .unwrap();
    let mut hog = small
        .generate(GenerateRequest::tokens(PROMPTS[0].to_vec(), 90))
        .into_blocking();
    hog.next().unwrap().unwrap();
    let waiting: Vec<_> = (0..6)
        .map(|_| small.generate(request(PROMPTS[1])))
        .collect();
    // The client goes away: its blocks free, the waiting requests run.
    drop(hog);
    let results: Vec<_> = waiting.into_iter().map(|s| s.collect_tokens()).collect();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(RuntimeError::QueueFull { .. })))
        .count();
    // 2 in the queue, and 1 more when the actor took one from the queue (to wait for KV room
    // at its head) before the sixth arrived.
    assert!((3..=4).contains(&refused), "{results:?}");
    for r in results.iter().filter(|r| r.is_ok()) {
        assert_eq!(r.as_ref().unwrap(), &want[1]);
    }
    assert_eq!(small.stats().kv_blocks_used, 0);
    small.shutdown().unwrap();
    rt.shutdown().unwrap();
}

#[test]
fn sessions_work_beside_other_sequences() {
    let rt = builder().max_num_seqs(4).build().unwrap();
    let session = rt.new_session();
    let mut r = request(PROMPTS[0]);
    r.session = Some(session);
    let first = rt.generate(r).collect_tokens().unwrap();
    // The next turn of the session runs beside two other requests.
    let mut prompt = PROMPTS[0].to_vec();
    prompt.extend_from_slice(&first);
    prompt.extend_from_slice(&PROMPTS[1][..2]);
    let mut r = request(&prompt);
    r.session = Some(session);
    let others: Vec<_> = [3, 4]
        .iter()
        .map(|&i| rt.generate(request(PROMPTS[i])))
        .collect();
    let resumed = rt.generate(r).collect_tokens().unwrap();
    for o in others {
        o.collect_tokens().unwrap();
    }
    let fresh = rt.generate(request(&prompt)).collect_tokens().unwrap();
    assert_eq!(resumed, fresh);
    assert!(rt.stats().prompt_tokens_cached > 0);
    // The kept session holds blocks for its cached tokens only.
    assert!(rt.stats().kv_blocks_used > 0);
    rt.shutdown().unwrap();
}

/// A long shared prefix (two whole 16-token blocks and more).
fn long_prompt(tail: &[u32]) -> Vec<u32> {
    let mut p: Vec<u32> = PROMPTS[2]
        .iter()
        .chain(PROMPTS[2])
        .chain(PROMPTS[4])
        .copied()
        .collect();
    p.extend_from_slice(&PROMPTS[0][..4]);
    p.extend_from_slice(tail);
    p
}

#[test]
fn the_prefix_cache_shares_whole_blocks_and_changes_no_token() {
    let (a, b) = (long_prompt(&[19842]), long_prompt(&[1, 2683, 2]));
    // References: each prompt on a runtime of its own (an empty cache).
    let fresh = |p: &[u32]| {
        let rt = builder().build().unwrap();
        let t = rt.generate(request(p)).collect_tokens().unwrap();
        rt.shutdown().unwrap();
        t
    };
    let (want_a, want_b) = (fresh(&a), fresh(&b));
    let rt = builder().build().unwrap();
    assert_eq!(rt.generate(request(&a)).collect_tokens().unwrap(), want_a);
    let s = rt.stats();
    assert_eq!(s.prefix_cache_hit_tokens, 0);
    // The first prompt's two whole blocks stay cached, held by no sequence.
    assert_eq!((s.kv_blocks_used, s.kv_blocks_cached), (0, 2));
    // The second prompt shares them: 32 positions come from the cache.
    assert_eq!(rt.generate(request(&b)).collect_tokens().unwrap(), want_b);
    assert_eq!(rt.stats().prefix_cache_hit_tokens, 32);
    assert_eq!(rt.stats().kv_blocks_used, 0);
    rt.shutdown().unwrap();
}

#[test]
fn a_session_that_rewinds_into_a_cached_block_copies_it_first() {
    let a = long_prompt(&[19842]);
    let rt = builder().build().unwrap();
    let session = rt.new_session();
    let mut r = request(&a);
    r.session = Some(session);
    rt.generate(r).collect_tokens().unwrap();
    assert_eq!(
        rt.stats().kv_blocks_cached,
        0,
        "the session's sequence holds them too"
    );
    // The next turn keeps 10 tokens: mid-way through a block the prefix cache holds.
    let mut second = a[..10].to_vec();
    second.extend_from_slice(PROMPTS[1]);
    let mut r = request(&second);
    r.session = Some(session);
    let resumed = rt.generate(r).collect_tokens().unwrap();
    assert_eq!(rt.stats().prompt_tokens_cached, 10);
    // The cached prefix is intact: the first prompt again gives its tokens, and so does the
    // second one on a fresh sequence.
    let again = rt.generate(request(&a)).collect_tokens().unwrap();
    let fresh = {
        let rt = builder().build().unwrap();
        let t = (
            rt.generate(request(&a)).collect_tokens().unwrap(),
            rt.generate(request(&second)).collect_tokens().unwrap(),
        );
        rt.shutdown().unwrap();
        t
    };
    assert_eq!((again, resumed), fresh);
    rt.shutdown().unwrap();
}
