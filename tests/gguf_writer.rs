//! Writer round trips: every value type, nested and empty arrays, odd alignments, versions 2
//! and 3, several tensor types and ranks; and the writer's own refusals.

mod gguf_support;

use gguf_support::{all_types_metadata, canon, Raw};
use rocmforge::gguf::{
    parse, write_to_vec, Array, ArrayItems, GgufError, GgufFile, GgufWriter, Metadata, TensorSpec,
    Value, ValueType,
};
use rocmforge::quant::GgmlType;

/// Tensors of several types and ranks with recognisable bytes.
fn sample_tensors() -> Vec<(TensorSpec, Vec<u8>)> {
    let specs = [
        ("token_embd.weight", vec![64u64, 3], GgmlType::Q8_0),
        ("blk.0.attn_norm.weight", vec![64], GgmlType::F32),
        ("blk.0.attn_q.weight", vec![256, 2], GgmlType::Q4_K),
        ("blk.0.odd.weight", vec![3, 5, 7], GgmlType::F16),
        ("blk.1.four_d.weight", vec![2, 3, 1, 2], GgmlType::BF16),
        ("blk.1.q4.weight", vec![32, 1], GgmlType::Q4_0),
        ("blk.1.empty.weight", vec![0, 4], GgmlType::F32),
        ("scalar", vec![], GgmlType::I32),
        ("output.weight", vec![256, 1], GgmlType::Q6_K),
    ];
    specs
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape, ty))| {
            let spec = TensorSpec {
                name: name.into(),
                shape,
                ggml_type: ty,
            };
            let n =
                rocmforge::gguf::TensorInfo::new(spec.name.clone(), spec.shape.clone(), ty, 0, 0)
                    .expect("valid sample shape")
                    .n_bytes;
            let data = (0..n)
                .map(|j| (j as u8).wrapping_mul(31) ^ i as u8)
                .collect();
            (spec, data)
        })
        .collect()
}

fn with_alignment(mut m: Metadata, align: Option<u32>) -> Metadata {
    if let Some(a) = align {
        m.insert("general.alignment", Value::U32(a));
    }
    m
}

fn write(version: u32, m: &Metadata, tensors: &[(TensorSpec, Vec<u8>)]) -> Vec<u8> {
    let specs: Vec<TensorSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
    let mut w = GgufWriter::with_version(Vec::new(), version, m, &specs).expect("header");
    for (_, d) in tensors {
        w.write_tensor(d).expect("tensor");
    }
    w.finish().expect("finish")
}

fn assert_same_metadata(a: &Metadata, b: &Metadata) {
    let ka: Vec<&str> = a.iter().map(|(k, _)| k).collect();
    let kb: Vec<&str> = b.iter().map(|(k, _)| k).collect();
    assert_eq!(ka, kb, "keys or their order differ");
    for ((k, va), (_, vb)) in a.iter().zip(b.iter()) {
        assert_eq!(va.value_type(), vb.value_type(), "type of {k}");
        assert_eq!(va.type_name(), vb.type_name(), "element type of {k}");
        // Bit-exact (floats compared by bits, so -0.0 and NaN payloads count).
        assert_eq!(canon(va), canon(vb), "value of {k}");
    }
}

#[test]
fn round_trip_all_types_alignments_versions() {
    let tensors = sample_tensors();
    for version in [2u32, 3] {
        for align in [None, Some(1u32), Some(8), Some(64), Some(4096)] {
            let m = with_alignment(all_types_metadata(), align);
            let bytes = write(version, &m, &tensors);
            let ctx = format!("version {version}, alignment {align:?}");
            let l = parse(&bytes).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            let a = align.unwrap_or(32) as u64;
            assert_eq!(l.version, version, "{ctx}");
            assert_eq!(l.alignment, a, "{ctx}");
            assert_eq!(l.data_offset % a, 0, "{ctx}");
            assert_eq!(bytes.len() as u64 % a, 0, "{ctx}: file end padded");
            assert_same_metadata(&m, &l.metadata);
            assert_eq!(l.tensors.len(), tensors.len());
            for (t, (spec, data)) in l.tensors.iter().zip(&tensors) {
                assert_eq!(t.name, spec.name, "{ctx}");
                assert_eq!(t.shape, spec.shape, "{ctx}");
                assert_eq!(t.ggml_type, spec.ggml_type, "{ctx}");
                assert_eq!(t.offset % a, 0, "{ctx}: {} misaligned", t.name);
                let s = (l.data_offset + t.offset) as usize;
                assert_eq!(
                    &bytes[s..s + t.n_bytes as usize],
                    &data[..],
                    "{ctx}: {}",
                    t.name
                );
            }
        }
    }
}

#[test]
fn streaming_to_a_file_and_mapping_it() {
    let tensors = sample_tensors();
    let m = with_alignment(all_types_metadata(), Some(64));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.gguf");
    let file = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
    let specs: Vec<TensorSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
    let mut w = GgufWriter::new(file, &m, &specs).expect("header");
    assert_eq!(w.infos().len(), specs.len());
    for (spec, d) in &tensors {
        assert_eq!(
            w.next_tensor().map(|t| t.name.as_str()),
            Some(spec.name.as_str())
        );
        w.write_tensor(d).expect("tensor");
    }
    assert!(w.next_tensor().is_none());
    w.finish().expect("finish");
    let f = GgufFile::open(&path).expect("open");
    assert_eq!(f.version(), 3);
    assert_same_metadata(&m, f.metadata());
    for (spec, d) in &tensors {
        let t = f.require_tensor(&spec.name).expect("tensor present");
        assert_eq!(f.tensor_data(t), &d[..]);
    }
    // Global group first, then layers 0 and 1 in order, byte totals per layer.
    let groups = f.layer_groups();
    let layers: Vec<Option<usize>> = groups.iter().map(|g| g.layer).collect();
    assert_eq!(layers, vec![None, Some(0), Some(1)]);
    let l1: u64 = [
        "blk.1.four_d.weight",
        "blk.1.q4.weight",
        "blk.1.empty.weight",
    ]
    .iter()
    .map(|n| f.tensor(n).unwrap().n_bytes)
    .sum();
    assert_eq!(groups[2].bytes, l1);
}

#[test]
fn write_to_vec_matches_streaming_writer() {
    let tensors = sample_tensors();
    let m = all_types_metadata();
    assert_eq!(write_to_vec(&m, &tensors).unwrap(), write(3, &m, &tensors));
}

#[test]
fn empty_file_round_trips() {
    let bytes = write_to_vec(&Metadata::new(), &[]).unwrap();
    let l = parse(&bytes).unwrap();
    assert!(l.metadata.is_empty() && l.tensors.is_empty());
    assert_eq!(l.data_offset, 32);
}

#[test]
fn writer_refuses_what_the_reader_would_refuse() {
    let tensors = sample_tensors();
    let specs: Vec<TensorSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
    let m = Metadata::new();

    // Wrong byte count for a tensor.
    let mut w = GgufWriter::new(Vec::new(), &m, &specs).unwrap();
    assert!(matches!(
        w.write_tensor(&[0u8; 3]),
        Err(GgufError::Write(_))
    ));
    // Finishing early.
    let w = GgufWriter::new(Vec::new(), &m, &specs).unwrap();
    assert!(matches!(w.finish(), Err(GgufError::Write(_))));
    // Too many tensors written.
    let mut w = GgufWriter::new(Vec::new(), &m, &specs[..1]).unwrap();
    w.write_tensor(&tensors[0].1).unwrap();
    assert!(matches!(
        w.write_tensor(&tensors[0].1),
        Err(GgufError::Write(_))
    ));
    // Duplicate names.
    let dup = vec![specs[0].clone(), specs[0].clone()];
    assert!(matches!(
        GgufWriter::new(Vec::new(), &m, &dup),
        Err(GgufError::DuplicateTensor { .. })
    ));
    // Shape not a whole number of blocks.
    let bad = vec![TensorSpec {
        name: "x".into(),
        shape: vec![33],
        ggml_type: GgmlType::Q4_0,
    }];
    assert!(matches!(
        GgufWriter::new(Vec::new(), &m, &bad),
        Err(GgufError::BadShape { .. })
    ));
    // Alignment: not a power of two, zero, wrong type.
    for a in [0u32, 3, 48] {
        let m = with_alignment(Metadata::new(), Some(a));
        assert!(matches!(
            GgufWriter::new(Vec::new(), &m, &[]),
            Err(GgufError::BadAlignment { .. })
        ));
    }
    let mut m64 = Metadata::new();
    m64.insert("general.alignment", Value::U64(32));
    assert!(matches!(
        GgufWriter::new(Vec::new(), &m64, &[]),
        Err(GgufError::Write(_))
    ));
    // Version 1 or 4.
    for v in [1, 4] {
        assert!(matches!(
            GgufWriter::with_version(Vec::new(), v, &Metadata::new(), &[]),
            Err(GgufError::Write(_))
        ));
    }
    // Array whose element type does not match its items.
    let mut mm = Metadata::new();
    mm.insert(
        "bad",
        Value::Array(Array {
            elem: ValueType::U32,
            items: ArrayItems::I32(vec![1]),
        }),
    );
    assert!(matches!(
        GgufWriter::new(Vec::new(), &mm, &[]),
        Err(GgufError::Write(_))
    ));
    // Arrays nested deeper than the reader accepts.
    let mut a = Array {
        elem: ValueType::U8,
        items: ArrayItems::U8(vec![]),
    };
    for _ in 0..rocmforge::gguf::reader::MAX_ARRAY_DEPTH {
        a = Array {
            elem: ValueType::Array,
            items: ArrayItems::Array(vec![a]),
        };
    }
    let mut deep = Metadata::new();
    deep.insert("deep", Value::Array(a.clone()));
    assert!(matches!(
        GgufWriter::new(Vec::new(), &deep, &[]),
        Err(GgufError::Write(_))
    ));
    // One level less is accepted and reads back.
    if let ArrayItems::Array(v) = &a.items {
        let mut ok = Metadata::new();
        ok.insert("deep", Value::Array(v[0].clone()));
        let bytes = write_to_vec(&ok, &[]).unwrap();
        assert_same_metadata(&ok, &parse(&bytes).unwrap().metadata);
    }
}

/// The raw builder used by the hostile suite produces what the writer produces, so hostile
/// inputs differ from valid ones only where intended.
#[test]
fn raw_builder_agrees_with_writer() {
    let mut m = Metadata::new();
    m.insert("general.alignment", Value::U32(32));
    let t = vec![(
        TensorSpec {
            name: "w".into(),
            shape: vec![4],
            ggml_type: GgmlType::F32,
        },
        vec![7u8; 16],
    )];
    let ours = write_to_vec(&m, &t).unwrap();
    let mut r = Raw::header(3, 1, 1);
    r.kv_u32("general.alignment", 32)
        .tensor("w", &[4], 0, 0)
        .align(32)
        .bytes(&[7u8; 16])
        .align(32);
    assert_eq!(r.build(), ours);
}

#[test]
fn tensors_written_in_parts_equal_whole_writes() {
    let tensors = sample_tensors();
    let m = with_alignment(all_types_metadata(), Some(64));
    let whole = write(3, &m, &tensors);
    let specs: Vec<TensorSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
    let mut w = GgufWriter::new(Vec::new(), &m, &specs).unwrap();
    for (_, d) in &tensors {
        if d.is_empty() {
            w.write_tensor_part(&[]).unwrap();
        }
        for part in d.chunks(7) {
            w.write_tensor_part(part).unwrap();
        }
    }
    assert_eq!(w.finish().unwrap(), whole);
    // A part running past the tensor's end is refused.
    let mut w = GgufWriter::new(Vec::new(), &m, &specs).unwrap();
    let first = &tensors[0].1;
    w.write_tensor_part(&first[..10]).unwrap();
    assert!(matches!(
        w.write_tensor_part(first),
        Err(GgufError::Write(_))
    ));
    // write_tensor after a partial write is refused too.
    assert!(matches!(w.write_tensor(first), Err(GgufError::Write(_))));
}
