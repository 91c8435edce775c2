//! Helpers shared by the tests/gguf_*.rs suites: the canonical JSON form of metadata (the same
//! rules as scripts/gguf_dump_metadata.py, so our reader and gguf-py can be compared), a small
//! SHA-256 (to avoid a dependency just for tests), a raw byte builder for hand-made hostile
//! headers, and a sample metadata set covering every value type.
#![allow(dead_code)]

pub mod sha256;

use rocmforge::gguf::{Array, ArrayItems, GgufFile, Metadata, Value, ValueType};
use serde_json::{json, Value as Json};

/// Arrays longer than this are summarised by length + sha256 (scripts/gguf_dump_metadata.py).
pub const SUMMARY_LEN: usize = 16;

/// A value in canonical JSON: floats as their bit patterns, arrays as lists.
pub fn canon(v: &Value) -> Json {
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::F32(x) => json!(x.to_bits()),
        Value::Bool(x) => json!(x),
        Value::String(x) => json!(x),
        Value::Array(a) => canon_array(a),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::F64(x) => json!(x.to_bits()),
    }
}

pub fn canon_array(a: &Array) -> Json {
    match &a.items {
        ArrayItems::U8(v) => json!(v),
        ArrayItems::I8(v) => json!(v),
        ArrayItems::U16(v) => json!(v),
        ArrayItems::I16(v) => json!(v),
        ArrayItems::U32(v) => json!(v),
        ArrayItems::I32(v) => json!(v),
        ArrayItems::F32(v) => json!(v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()),
        ArrayItems::Bool(v) => json!(v),
        ArrayItems::String(v) => json!(v),
        ArrayItems::Array(v) => Json::Array(v.iter().map(canon_array).collect()),
        ArrayItems::U64(v) => json!(v),
        ArrayItems::I64(v) => json!(v),
        ArrayItems::F64(v) => json!(v.iter().map(|x| x.to_bits()).collect::<Vec<_>>()),
    }
}

/// One metadata entry as the dump script writes it.
pub fn entry(key: &str, v: &Value, summary_len: usize) -> Json {
    let c = canon(v);
    match &c {
        Json::Array(items) if items.len() > summary_len => {
            let text = serde_json::to_string(&c).expect("serialising a JSON value cannot fail");
            json!({
                "key": key,
                "type": v.type_name(),
                "len": items.len(),
                "sha256": sha256::hex(text.as_bytes()),
            })
        }
        _ => json!({"key": key, "type": v.type_name(), "value": c}),
    }
}

pub fn metadata_entries(m: &Metadata, summary_len: usize) -> Vec<Json> {
    m.iter().map(|(k, v)| entry(k, v, summary_len)).collect()
}

/// The whole dump of an open file, in the script's format (without "file" and "reader").
pub fn dump(f: &GgufFile, summary_len: usize, tensor_data: bool) -> Json {
    let tensors: Vec<Json> = f
        .tensors()
        .iter()
        .map(|t| {
            let mut e = json!({
                "name": t.name,
                "type": t.ggml_type.name(),
                "shape": t.shape,
                "offset": t.offset,
                "n_bytes": t.n_bytes,
            });
            if tensor_data {
                e["sha256"] = json!(sha256::hex(f.tensor_data(t)));
            }
            e
        })
        .collect();
    json!({
        "summary_len": summary_len,
        "version": f.version(),
        "tensor_count": f.tensors().len(),
        "kv_count": f.metadata().len(),
        "alignment": f.alignment(),
        "data_offset": f.data_offset(),
        "metadata": metadata_entries(f.metadata(), summary_len),
        "tensors": tensors,
    })
}

fn arr(elem: ValueType, items: ArrayItems) -> Value {
    Value::Array(Array { elem, items })
}

/// Metadata with every scalar type, arrays of every element type, nested and empty arrays,
/// extreme values and non-ASCII strings.
pub fn all_types_metadata() -> Metadata {
    let mut m = Metadata::new();
    m.insert("general.architecture", Value::String("llama".into()));
    m.insert("t.u8", Value::U8(255));
    m.insert("t.i8", Value::I8(-128));
    m.insert("t.u16", Value::U16(65535));
    m.insert("t.i16", Value::I16(-32768));
    m.insert("t.u32", Value::U32(u32::MAX));
    m.insert("t.i32", Value::I32(i32::MIN));
    m.insert("t.f32", Value::F32(-1.5e-7));
    m.insert("t.bool", Value::Bool(true));
    m.insert("t.bool_false", Value::Bool(false));
    m.insert(
        "t.string",
        Value::String("héllo \"wörld\"\n\t\u{1F600}\\ \u{7f}\u{1}".into()),
    );
    m.insert("t.empty_string", Value::String(String::new()));
    m.insert("t.u64", Value::U64(u64::MAX));
    m.insert("t.i64", Value::I64(i64::MIN));
    m.insert("t.f64", Value::F64(std::f64::consts::PI));
    m.insert("t.f32_inf", Value::F32(f32::NEG_INFINITY));
    use ArrayItems as A;
    use ValueType as T;
    m.insert("a.u8", arr(T::U8, A::U8(vec![0, 1, 255])));
    m.insert("a.i8", arr(T::I8, A::I8(vec![-128, 0, 127])));
    m.insert("a.u16", arr(T::U16, A::U16(vec![0, 65535])));
    m.insert("a.i16", arr(T::I16, A::I16(vec![-32768, 32767])));
    m.insert("a.u32", arr(T::U32, A::U32((0..40).collect())));
    m.insert("a.i32", arr(T::I32, A::I32(vec![-1, 2, -3])));
    m.insert("a.f32", arr(T::F32, A::F32(vec![0.0, -0.0, 1e-30, 3.5])));
    m.insert("a.bool", arr(T::Bool, A::Bool(vec![true, false, true])));
    m.insert(
        "a.string",
        arr(
            T::String,
            A::String(vec!["a".into(), String::new(), "ü€".into()]),
        ),
    );
    m.insert("a.u64", arr(T::U64, A::U64(vec![u64::MAX, 0])));
    m.insert("a.i64", arr(T::I64, A::I64(vec![i64::MIN, i64::MAX])));
    m.insert("a.f64", arr(T::F64, A::F64(vec![1.0 / 3.0, -2.5])));
    m.insert(
        "a.long_strings",
        arr(
            T::String,
            A::String((0..100).map(|i| format!("tok{i}")).collect()),
        ),
    );
    let inner = |v: Vec<i32>| Array {
        elem: T::I32,
        items: A::I32(v),
    };
    m.insert(
        "a.nested",
        arr(
            T::Array,
            A::Array(vec![inner(vec![1, 2]), inner(vec![]), inner(vec![3])]),
        ),
    );
    m.insert(
        "a.nested3",
        arr(
            T::Array,
            A::Array(vec![Array {
                elem: T::Array,
                items: A::Array(vec![Array {
                    elem: T::String,
                    items: A::String(vec!["deep".into()]),
                }]),
            }]),
        ),
    );
    m.insert("a.empty_u8", arr(T::U8, A::U8(vec![])));
    m.insert("a.empty_string", arr(T::String, A::String(vec![])));
    m.insert("a.empty_array", arr(T::Array, A::Array(vec![])));
    m.insert("a.empty_f64", arr(T::F64, A::F64(vec![])));
    m
}

/// Little-endian byte builder for hand-written (possibly hostile) GGUF images.
#[derive(Default, Clone)]
pub struct Raw(pub Vec<u8>);

impl Raw {
    /// Magic, version, tensor count, kv count.
    pub fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
        let mut r = Raw::default();
        r.bytes(b"GGUF").u32(version).u64(n_tensors).u64(n_kv);
        r
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn u32(&mut self, x: u32) -> &mut Self {
        self.bytes(&x.to_le_bytes())
    }
    pub fn u64(&mut self, x: u64) -> &mut Self {
        self.bytes(&x.to_le_bytes())
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
    /// A key with a u32 value.
    pub fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.str(key).u32(ValueType::U32 as u32).u32(v)
    }
    /// A tensor info record.
    pub fn tensor(&mut self, name: &str, shape: &[u64], ty: u32, offset: u64) -> &mut Self {
        self.str(name).u32(shape.len() as u32);
        for &d in shape {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Pads with zeros to a multiple of `align`.
    pub fn align(&mut self, align: usize) -> &mut Self {
        let n = self.0.len().next_multiple_of(align);
        self.0.resize(n, 0);
        self
    }
    pub fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    pub fn build(&self) -> Vec<u8> {
        self.0.clone()
    }
}
