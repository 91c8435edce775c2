//! Hostile GGUF inputs: each must come back as the right typed error, without a panic and
//! without an allocation sized by a count the file merely claims.
//!
//! A counting global allocator records the largest single allocation made on the current
//! thread, so each case can assert its allocations stayed proportional to the input.

mod common;
mod gguf_support;

use gguf_support::Raw;
use proptest::prelude::*;
use rocmforge::gguf::reader::{MAX_ARRAY_DEPTH, MAX_ARRAY_LEN, MAX_STRING_LEN, MAX_TENSORS};
use rocmforge::gguf::{parse, write_to_vec, GgufError, GgufLayout, Metadata, TensorSpec, Value};
use rocmforge::quant::GgmlType;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Read;

struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator unchanged; the thread-local is a const-initialised
// `Cell<usize>` whose access never allocates, so there is no re-entrancy.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|c| c.set(c.get().max(l.size())));
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|c| c.set(c.get().max(new)));
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

/// Parses and returns the result with the largest single allocation made meanwhile.
fn parse_tracked(buf: &[u8]) -> (Result<GgufLayout, GgufError>, usize) {
    LARGEST.with(|c| c.set(0));
    let r = parse(buf);
    (r, LARGEST.with(|c| c.get()))
}

/// Expects an error matching `pat`; allocations must stay within a small multiple of the input
/// (strings and vectors cost at most ~3x their encoded size) plus slack for messages.
macro_rules! expect_err {
    ($buf:expr, $pat:pat) => {{
        let buf: &[u8] = &$buf;
        let (r, largest) = parse_tracked(buf);
        match r {
            Err(e @ $pat) => {
                assert!(
                    largest <= 4 * buf.len() + (64 << 10),
                    "{e}: allocated {largest} bytes at once for a {}-byte input",
                    buf.len()
                );
                e
            }
            Err(e) => panic!("expected {}, got {e:?}", stringify!($pat)),
            Ok(_) => panic!("expected {}, parse succeeded", stringify!($pat)),
        }
    }};
}

/// The first `n` bytes of the real model (its header is ~1.8 MB, mostly tokenizer arrays).
fn smollm2_prefix(n: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(common::smollm2_path()).expect("open test model");
    let mut v = Vec::with_capacity(n);
    f.by_ref()
        .take(n as u64)
        .read_to_end(&mut v)
        .expect("read test model");
    v
}

/// A valid small file with one tensor, for single-field corruptions.
fn one_tensor_file() -> Raw {
    let mut r = Raw::header(3, 1, 1);
    r.kv_u32("general.alignment", 32)
        .tensor("w", &[8], GgmlType::F32 as u32, 0)
        .align(32)
        .zeros(32);
    r
}

#[test]
fn valid_baseline_parses() {
    // The corruptions below are single changes to files like these, which parse.
    assert!(parse(&one_tensor_file().build()).is_ok());
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[8], 0, 0)
        .tensor("b", &[8], 0, 32)
        .align(32)
        .zeros(64);
    assert!(parse(&r.build()).is_ok());
}

#[test]
fn smollm2_header_truncated_at_many_offsets() {
    const HEADER: usize = 1_785_664; // data_offset in tests/data/gguf/smollm2_metadata.json
    let buf = smollm2_prefix(HEADER + 64 * 1024);
    assert!(parse(&buf).is_err(), "the data section is cut off");
    // Every offset in the fixed header and first keys, then a spread through the vocabulary,
    // merges and tensor infos, then inside the data section.
    let mut cuts: Vec<usize> = (0..1024).collect();
    cuts.extend((1024..HEADER).step_by(7919));
    cuts.extend((HEADER - 40_000..HEADER).step_by(397));
    cuts.extend([HEADER - 1, HEADER, HEADER + 1, HEADER + 4096, buf.len()]);
    for cut in cuts {
        let e = if cut + 32 < HEADER {
            expect_err!(buf[..cut], GgufError::Truncated { .. })
        } else {
            expect_err!(
                buf[..cut],
                GgufError::Truncated { .. } | GgufError::TensorOutOfBounds { .. }
            )
        };
        if cut >= HEADER {
            assert!(
                matches!(e, GgufError::TensorOutOfBounds { .. }),
                "cut {cut}: {e}"
            );
        }
    }
}

#[test]
fn wrong_magic_version_and_endianness() {
    let good = one_tensor_file().build();
    let mut b = good.clone();
    b[..4].copy_from_slice(b"GGML");
    expect_err!(b, GgufError::BadMagic { .. });
    expect_err!([0u8; 0], GgufError::Truncated { .. });
    for v in [0u32, 1, 4, 0xFFFF_FFFF] {
        let mut b = good.clone();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        let e = expect_err!(b, GgufError::UnsupportedVersion { .. });
        assert!(e.to_string().contains(&v.to_string()));
    }
    // A big-endian file: the version field reads 0x03000000 little-endian.
    let mut b = good.clone();
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    expect_err!(b, GgufError::BigEndian { .. });
    let mut b = good;
    b[4..8].copy_from_slice(&2u32.to_be_bytes());
    expect_err!(b, GgufError::BigEndian { .. });
}

#[test]
fn absurd_counts() {
    // 2^40 tensors.
    let b = Raw::header(3, 1 << 40, 0).build();
    let e = expect_err!(b, GgufError::TooMany { .. });
    assert!(e.to_string().contains("1099511627776"));
    expect_err!(
        Raw::header(3, MAX_TENSORS + 1, 0).build(),
        GgufError::TooMany { .. }
    );
    // Under the cap but more than the file could hold.
    expect_err!(
        Raw::header(3, 1 << 19, 0).build(),
        GgufError::Truncated { .. }
    );
    // 2^40 and u64::MAX key/value pairs.
    expect_err!(
        Raw::header(3, 0, 1 << 40).build(),
        GgufError::TooMany { .. }
    );
    expect_err!(
        Raw::header(3, 0, u64::MAX).build(),
        GgufError::TooMany { .. }
    );
    expect_err!(Raw::header(3, 0, 1000).build(), GgufError::Truncated { .. });
}

#[test]
fn absurd_string_lengths() {
    // A key of length 2^63.
    let mut r = Raw::header(3, 0, 1);
    r.u64(1 << 63).bytes(b"abc").zeros(16);
    let e = expect_err!(r.build(), GgufError::StringTooLong { .. });
    assert!(e.to_string().contains("9223372036854775808"));
    // A string value of length 2^63 and of u64::MAX.
    for len in [1u64 << 63, u64::MAX, MAX_STRING_LEN + 1] {
        let mut r = Raw::header(3, 0, 1);
        r.str("k").u32(8).u64(len).bytes(b"xyz");
        let e = expect_err!(r.build(), GgufError::StringTooLong { .. });
        assert!(e.to_string().contains("\"k\""), "error names the key: {e}");
    }
    // Under the cap but past the end of the file.
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(8).u64(MAX_STRING_LEN).bytes(b"xyz");
    expect_err!(r.build(), GgufError::Truncated { .. });
    // A tensor name of length 2^63.
    let mut r = Raw::header(3, 1, 0);
    r.u64(1 << 63).zeros(32);
    expect_err!(r.build(), GgufError::StringTooLong { .. });
    // Invalid UTF-8 in a key.
    let mut r = Raw::header(3, 0, 1);
    r.u64(2).bytes(&[0xff, 0xfe]).u32(0).bytes(&[1]).zeros(16);
    expect_err!(r.build(), GgufError::InvalidUtf8 { .. });
}

#[test]
fn absurd_array_lengths() {
    for (elem, len) in [
        (4u32, 1u64 << 62),
        (8, 1 << 62),
        (9, 1 << 62),
        (10, u64::MAX),
        (0, MAX_ARRAY_LEN + 1),
    ] {
        let mut r = Raw::header(3, 0, 1);
        r.str("tokenizer.ggml.tokens")
            .u32(9)
            .u32(elem)
            .u64(len)
            .zeros(64);
        let e = expect_err!(r.build(), GgufError::TooMany { .. });
        assert!(e.to_string().contains("tokenizer.ggml.tokens"), "{e}");
    }
    // Under the cap: bounded by the bytes left, before any allocation.
    for elem in [0u32, 4, 8, 9, 10, 12] {
        let mut r = Raw::header(3, 0, 1);
        r.str("k").u32(9).u32(elem).u64(MAX_ARRAY_LEN).zeros(64);
        expect_err!(r.build(), GgufError::Truncated { .. });
    }
    // Unknown element type.
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(9).u32(13).u64(1).zeros(8);
    expect_err!(r.build(), GgufError::UnknownValueType { ty: 13, .. });
}

#[test]
fn unknown_value_type_and_duplicate_key() {
    let mut r = Raw::header(3, 0, 1);
    r.str("k").u32(0xdead).zeros(8);
    expect_err!(r.build(), GgufError::UnknownValueType { ty: 0xdead, .. });
    let mut r = Raw::header(3, 0, 2);
    r.kv_u32("k", 1).kv_u32("k", 2);
    expect_err!(r.build(), GgufError::DuplicateKey { .. });
}

#[test]
fn nested_arrays_1000_deep() {
    let mut r = Raw::header(3, 0, 1);
    r.str("deep").u32(9);
    for _ in 0..1000 {
        r.u32(9).u64(1);
    }
    r.u32(0).u64(0);
    let e = expect_err!(r.build(), GgufError::NestingTooDeep { .. });
    assert!(e.to_string().contains("\"deep\""));
    // Exactly at the cap parses.
    let mut r = Raw::header(3, 0, 1);
    r.str("ok").u32(9);
    for _ in 0..MAX_ARRAY_DEPTH - 1 {
        r.u32(9).u64(1);
    }
    r.u32(0).u64(0);
    assert!(parse(&r.build()).is_ok());
}

#[test]
fn bad_alignment() {
    for a in [0u32, 3, 24, 1 << 21, u32::MAX] {
        let mut r = Raw::header(3, 0, 1);
        r.kv_u32("general.alignment", a);
        expect_err!(r.build(), GgufError::BadAlignment { .. });
    }
    let mut r = Raw::header(3, 0, 1);
    r.str("general.alignment").u32(10).u64(32);
    expect_err!(r.build(), GgufError::WrongKeyType { .. });
}

#[test]
fn bad_tensor_infos() {
    let ty = GgmlType::F32 as u32;
    // Dimensions > 4, and absurd dimension counts.
    for n_dims in [5u32, 64, u32::MAX] {
        let mut r = Raw::header(3, 1, 0);
        r.str("t").u32(n_dims).zeros(64);
        expect_err!(r.build(), GgufError::TooManyDims { .. });
    }
    // Element counts: overflowing u64, over 2^50, overflowing bytes.
    for shape in [
        vec![1u64 << 32, 1 << 32, 1 << 32],
        vec![u64::MAX, 2],
        vec![1 << 40, 1 << 11],
        vec![1 << 25, 1 << 25, 2],
    ] {
        let mut r = Raw::header(3, 1, 0);
        r.tensor("t", &shape, ty, 0).align(32).zeros(32);
        let e = expect_err!(r.build(), GgufError::BadShape { .. });
        assert!(e.to_string().contains("\"t\""));
    }
    // Rows not a whole number of blocks.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("q", &[33, 2], GgmlType::Q4_0 as u32, 0)
        .align(32)
        .zeros(64);
    expect_err!(r.build(), GgufError::BadShape { .. });
    // Unknown and removed type ids.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("t", &[8], 1000, 0).align(32).zeros(32);
    expect_err!(r.build(), GgufError::UnknownTensorType { id: 1000, .. });
    let mut r = Raw::header(3, 1, 0);
    r.tensor("t", &[32], 4, 0).align(32).zeros(32);
    let e = expect_err!(r.build(), GgufError::RemovedTensorType { .. });
    assert!(e.to_string().contains("Q4_2"));
    // Duplicate names.
    let mut r = Raw::header(3, 2, 0);
    r.tensor("t", &[8], ty, 0)
        .tensor("t", &[8], ty, 32)
        .align(32)
        .zeros(64);
    expect_err!(r.build(), GgufError::DuplicateTensor { .. });
}

#[test]
fn tensors_out_of_range_overlapping_misaligned() {
    let ty = GgmlType::F32 as u32;
    // Past the end of the file by one block.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("t", &[16], ty, 0).align(32).zeros(32);
    expect_err!(r.build(), GgufError::TensorOutOfBounds { .. });
    // An offset so large that offset + size overflows u64.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("t", &[8], ty, u64::MAX - 31).align(32).zeros(32);
    expect_err!(r.build(), GgufError::TensorOutOfBounds { .. });
    // Huge but in-cap element count: the range check, not an allocation, stops it.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("t", &[1 << 24, 1 << 24], ty, 0)
        .align(32)
        .zeros(32);
    expect_err!(r.build(), GgufError::TensorOutOfBounds { .. });
    // Overlapping tensors.
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[16], ty, 0)
        .tensor("b", &[8], ty, 32)
        .align(32)
        .zeros(64);
    let e = expect_err!(r.build(), GgufError::OverlappingTensors { .. });
    assert!(e.to_string().contains("\"a\"") && e.to_string().contains("\"b\""));
    // Same offset.
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[8], ty, 0)
        .tensor("b", &[8], ty, 0)
        .align(32)
        .zeros(64);
    expect_err!(r.build(), GgufError::OverlappingTensors { .. });
    // Misaligned data offset.
    let mut r = Raw::header(3, 1, 0);
    r.tensor("t", &[4], ty, 4).align(32).zeros(64);
    expect_err!(r.build(), GgufError::MisalignedTensor { offset: 4, .. });
    // Misaligned for a custom alignment.
    let mut r = Raw::header(3, 1, 1);
    r.kv_u32("general.alignment", 64)
        .tensor("t", &[4], ty, 32)
        .align(64)
        .zeros(128);
    expect_err!(r.build(), GgufError::MisalignedTensor { alignment: 64, .. });
}

/// A small valid file with several value types and tensors, for bit flips.
fn flip_target() -> Vec<u8> {
    let mut m = Metadata::new();
    m.insert("general.architecture", Value::String("llama".into()));
    m.insert("general.alignment", Value::U32(32));
    m.insert(
        "tokenizer.ggml.tokens",
        Value::Array(rocmforge::gguf::Array {
            elem: rocmforge::gguf::ValueType::String,
            items: rocmforge::gguf::ArrayItems::String(vec!["a".into(), "bc".into()]),
        }),
    );
    m.insert("llama.rope.freq_base", Value::F32(10000.0));
    let t = |n: &str, shape: Vec<u64>, ty, bytes: usize| {
        (
            TensorSpec {
                name: n.into(),
                shape,
                ggml_type: ty,
            },
            vec![0x5a; bytes],
        )
    };
    write_to_vec(
        &m,
        &[
            t("blk.0.attn_q.weight", vec![32, 2], GgmlType::Q4_0, 36),
            t("blk.0.attn_norm.weight", vec![8], GgmlType::F32, 32),
            t("output_norm.weight", vec![4, 2], GgmlType::F16, 16),
        ],
    )
    .expect("valid sample")
}

/// Whatever parse returns for a mutated file: an error, or a layout whose every tensor lies
/// inside the buffer and whose tensors do not overlap.
fn check_consistent(buf: &[u8]) {
    let (r, largest) = parse_tracked(buf);
    assert!(
        largest <= 4 * buf.len() + (64 << 10),
        "allocated {largest} bytes"
    );
    if let Ok(l) = r {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for t in &l.tensors {
            let s = l.data_offset + t.offset;
            assert!(s + t.n_bytes <= buf.len() as u64);
            assert_eq!(t.offset % l.alignment, 0);
            if t.n_bytes > 0 {
                ranges.push((t.offset, t.offset + t.n_bytes));
            }
        }
        ranges.sort();
        assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bit_flips_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..6)) {
        let mut buf = flip_target();
        for (i, bit) in &flips {
            let i = i.index(buf.len());
            buf[i] ^= 1 << bit;
        }
        check_consistent(&buf);
    }

    #[test]
    fn random_bytes_in_header_never_panic(pos in 0usize..200, bytes in prop::collection::vec(any::<u8>(), 1..16)) {
        let mut buf = flip_target();
        for (k, b) in bytes.iter().enumerate() {
            if let Some(x) = buf.get_mut(pos + k) {
                *x = *b;
            }
        }
        check_consistent(&buf);
    }
}

proptest! {
    // Each case parses ~1.8 MB of vocabulary, so fewer cases.
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn smollm2_header_bit_flips_never_panic(flips in prop::collection::vec((0usize..1_785_664, 0u8..8), 1..4)) {
        let mut buf = SMOLLM2_HEADER.with(|b| b.clone());
        for (i, bit) in &flips {
            buf[*i] ^= 1 << bit;
        }
        check_consistent(&buf);
    }
}

thread_local! {
    /// The header plus 64 KiB of data (enough for tensor ranges to fall both in and out).
    static SMOLLM2_HEADER: Vec<u8> = smollm2_prefix(1_785_664 + 65536);
}

/// The allocation bound above can fail: the tracker sees a large allocation.
#[test]
fn allocation_tracker_sees_large_allocations() {
    LARGEST.with(|c| c.set(0));
    let v: Vec<u8> = Vec::with_capacity(3 << 20);
    assert!(LARGEST.with(|c| c.get()) >= 3 << 20);
    drop(v);
}
