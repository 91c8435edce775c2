//! The hardened GGUF parser.
//!
//! It never trusts a count from the file: every length is checked against a cap and against the
//! bytes actually left, before anything is allocated, and all offset arithmetic is checked.
//! Works on any `&[u8]` (the mmap in production, a `Vec` in the fuzzer and tests).

use super::error::{GgufError, Result};
use super::metadata::Metadata;
use super::tensor::{TensorInfo, MAX_DIMS};
use super::value::{Array, ArrayItems, Value, ValueType};
use crate::quant::qtype::{GgmlType, TypeId};
use std::collections::HashSet;

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Largest accepted `general.alignment`.
pub const MAX_ALIGNMENT: u64 = 1 << 20;
/// Longest accepted string (chat templates are a few KiB; 64 MiB is generous).
pub const MAX_STRING_LEN: u64 = 64 << 20;
/// Longest accepted array (vocabularies are ~256k entries; merges a few hundred thousand).
pub const MAX_ARRAY_LEN: u64 = 1 << 26;
/// Deepest accepted nesting of arrays; real files use at most 2.
pub const MAX_ARRAY_DEPTH: usize = 8;
pub const MAX_TENSORS: u64 = 1 << 20;
pub const MAX_KV: u64 = 1 << 20;
/// Largest element count of one tensor (2^50, far past any real model).
pub const MAX_TENSOR_ELEMS: u64 = 1 << 50;

/// Everything the header, metadata and tensor-info sections say, with tensors validated against
/// the file length.
#[derive(Debug, Clone)]
pub struct GgufLayout {
    pub version: u32,
    pub metadata: Metadata,
    /// Tensors in the order the file lists them.
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
    pub file_len: u64,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                need: n,
                have: self.remaining(),
            });
        }
        let n = n as usize; // fits: n <= remaining <= usize::MAX
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let at = self.pos as u64;
        let len = self.u64(what)?;
        if len > MAX_STRING_LEN {
            return Err(GgufError::StringTooLong {
                what: what(),
                len,
                cap: MAX_STRING_LEN,
                offset: at,
            });
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::InvalidUtf8 {
            what: what(),
            offset: at,
        })
    }

    /// Checks an element count against the cap and against what the rest of the file can hold,
    /// so the allocation that follows is bounded by the file, never by the claimed count.
    fn bounded_count(
        &self,
        what: &dyn Fn() -> String,
        count: u64,
        cap: u64,
        min_size: u64,
        at: u64,
    ) -> Result<usize> {
        if count > cap {
            return Err(GgufError::TooMany {
                what: what(),
                count,
                cap,
                offset: at,
            });
        }
        let need = count
            .checked_mul(min_size)
            .ok_or_else(|| GgufError::Overflow { what: what() })?;
        if need > self.remaining() {
            return Err(GgufError::Truncated {
                what: what(),
                offset: self.pos as u64,
                need,
                have: self.remaining(),
            });
        }
        Ok(count as usize)
    }
}

fn read_scalar_vec<T, const N: usize>(
    c: &mut Cursor<'_>,
    n: usize,
    what: &dyn Fn() -> String,
    conv: fn([u8; N]) -> T,
) -> Result<Vec<T>> {
    let bytes = c.take((n as u64) * N as u64, what)?;
    Ok(bytes
        .chunks_exact(N)
        .map(|ch| {
            let mut a = [0u8; N];
            a.copy_from_slice(ch);
            conv(a)
        })
        .collect())
}

fn read_value(c: &mut Cursor<'_>, ty: ValueType, key: &str, depth: usize) -> Result<Value> {
    let what = || format!("value of key {key:?}");
    Ok(match ty {
        ValueType::U8 => Value::U8(c.array::<1>(&what)?[0]),
        ValueType::I8 => Value::I8(c.array::<1>(&what)?[0] as i8),
        ValueType::U16 => Value::U16(u16::from_le_bytes(c.array(&what)?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(c.array(&what)?)),
        ValueType::U32 => Value::U32(c.u32(&what)?),
        ValueType::I32 => Value::I32(i32::from_le_bytes(c.array(&what)?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(c.array(&what)?)),
        ValueType::U64 => Value::U64(c.u64(&what)?),
        ValueType::I64 => Value::I64(i64::from_le_bytes(c.array(&what)?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(c.array(&what)?)),
        ValueType::Bool => Value::Bool(c.array::<1>(&what)?[0] != 0),
        ValueType::String => Value::String(c.string(&what)?),
        ValueType::Array => Value::Array(read_array(c, key, depth + 1)?),
    })
}

fn read_array(c: &mut Cursor<'_>, key: &str, depth: usize) -> Result<Array> {
    let at = c.pos as u64;
    if depth > MAX_ARRAY_DEPTH {
        return Err(GgufError::NestingTooDeep {
            key: key.to_string(),
            depth,
            cap: MAX_ARRAY_DEPTH,
            offset: at,
        });
    }
    let what = || format!("array of key {key:?}");
    let ty_id = c.u32(&what)?;
    let elem = ValueType::from_id(ty_id).ok_or_else(|| GgufError::UnknownValueType {
        key: key.to_string(),
        ty: ty_id,
        offset: at,
    })?;
    let len_at = c.pos as u64;
    let len = c.u64(&what)?;
    let n = c.bounded_count(&what, len, MAX_ARRAY_LEN, elem.min_encoded_size(), len_at)?;
    let items = match elem {
        ValueType::U8 => ArrayItems::U8(read_scalar_vec(c, n, &what, |a: [u8; 1]| a[0])?),
        ValueType::I8 => ArrayItems::I8(read_scalar_vec(c, n, &what, |a: [u8; 1]| a[0] as i8)?),
        ValueType::Bool => ArrayItems::Bool(read_scalar_vec(c, n, &what, |a: [u8; 1]| a[0] != 0)?),
        ValueType::U16 => ArrayItems::U16(read_scalar_vec(c, n, &what, u16::from_le_bytes)?),
        ValueType::I16 => ArrayItems::I16(read_scalar_vec(c, n, &what, i16::from_le_bytes)?),
        ValueType::U32 => ArrayItems::U32(read_scalar_vec(c, n, &what, u32::from_le_bytes)?),
        ValueType::I32 => ArrayItems::I32(read_scalar_vec(c, n, &what, i32::from_le_bytes)?),
        ValueType::F32 => ArrayItems::F32(read_scalar_vec(c, n, &what, f32::from_le_bytes)?),
        ValueType::U64 => ArrayItems::U64(read_scalar_vec(c, n, &what, u64::from_le_bytes)?),
        ValueType::I64 => ArrayItems::I64(read_scalar_vec(c, n, &what, i64::from_le_bytes)?),
        ValueType::F64 => ArrayItems::F64(read_scalar_vec(c, n, &what, f64::from_le_bytes)?),
        ValueType::String => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(c.string(&what)?);
            }
            ArrayItems::String(v)
        }
        ValueType::Array => {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(read_array(c, key, depth + 1)?);
            }
            ArrayItems::Array(v)
        }
    };
    Ok(Array { elem, items })
}

/// Parses and validates a whole GGUF image.
pub fn parse(buf: &[u8]) -> Result<GgufLayout> {
    let mut c = Cursor { buf, pos: 0 };
    let file_len = buf.len() as u64;
    let magic = c.array::<4>(&|| "magic".to_string())?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = c.u32(&|| "version".to_string())?;
    if version == 2u32.swap_bytes() || version == 3u32.swap_bytes() {
        return Err(GgufError::BigEndian { raw: version });
    }
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion { version });
    }
    let n_tensors_at = c.pos as u64;
    let n_tensors = c.u64(&|| "tensor count".to_string())?;
    if n_tensors > MAX_TENSORS {
        return Err(GgufError::TooMany {
            what: "tensor".into(),
            count: n_tensors,
            cap: MAX_TENSORS,
            offset: n_tensors_at,
        });
    }
    let at = c.pos as u64;
    let n_kv = c.u64(&|| "metadata key/value count".to_string())?;
    // A key/value pair is at least 8 (key length) + 4 (type) + 1 bytes.
    let n_kv = c.bounded_count(&|| "metadata key/value".to_string(), n_kv, MAX_KV, 13, at)?;

    let mut metadata = Metadata::new();
    for i in 0..n_kv {
        let at = c.pos as u64;
        let key = c.string(&|| format!("metadata key #{i}"))?;
        let ty_at = c.pos as u64;
        let ty_id = c.u32(&|| format!("type of key {key:?}"))?;
        let ty = ValueType::from_id(ty_id).ok_or_else(|| GgufError::UnknownValueType {
            key: key.clone(),
            ty: ty_id,
            offset: ty_at,
        })?;
        let value = read_value(&mut c, ty, &key, 0)?;
        if metadata.contains(&key) {
            return Err(GgufError::DuplicateKey { key, offset: at });
        }
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) => *a as u64,
        Some(v) => {
            return Err(GgufError::WrongKeyType {
                key: "general.alignment".into(),
                expected: "u32".into(),
                found: v.type_name(),
            })
        }
    };
    if alignment == 0 || !alignment.is_power_of_two() || alignment > MAX_ALIGNMENT {
        return Err(GgufError::BadAlignment {
            value: alignment,
            cap: MAX_ALIGNMENT,
        });
    }

    // A tensor info is at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
    let n_tensors = c.bounded_count(
        &|| "tensor info".to_string(),
        n_tensors,
        MAX_TENSORS,
        24,
        n_tensors_at,
    )?;
    let mut tensors = Vec::with_capacity(n_tensors);
    let mut names = HashSet::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let info_at = c.pos as u64;
        let name = c.string(&|| format!("name of tensor #{i}"))?;
        let what = || format!("info of tensor {name:?}");
        let dims_at = c.pos as u64;
        let n_dims = c.u32(&what)?;
        if n_dims as usize > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                tensor: name,
                n_dims,
                cap: MAX_DIMS as u32,
                offset: dims_at,
            });
        }
        let mut shape = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            shape.push(c.u64(&what)?);
        }
        let ty_at = c.pos as u64;
        let ty_id = c.u32(&what)?;
        let ggml_type = match GgmlType::from_id(ty_id) {
            TypeId::Known(t) => t,
            TypeId::Removed(n) => {
                return Err(GgufError::RemovedTensorType {
                    tensor: name,
                    name: n,
                })
            }
            TypeId::Unknown(id) => {
                return Err(GgufError::UnknownTensorType {
                    tensor: name,
                    id,
                    offset: ty_at,
                })
            }
        };
        let offset = c.u64(&what)?;
        let info = TensorInfo::new(name, shape, ggml_type, offset, info_at)?;
        if !names.insert(info.name.clone()) {
            return Err(GgufError::DuplicateTensor { name: info.name });
        }
        tensors.push(info);
    }

    let header_end = c.pos as u64;
    let data_offset = header_end
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| GgufError::Overflow {
            what: "data section offset".into(),
        })?;

    // Every tensor must be aligned and lie inside the file.
    for t in &tensors {
        if t.offset % alignment != 0 {
            return Err(GgufError::MisalignedTensor {
                tensor: t.name.clone(),
                offset: t.offset,
                alignment,
            });
        }
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes));
        match (start, end) {
            (Some(s), Some(e)) if e <= file_len => {
                let _ = s;
            }
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    tensor: t.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_len,
                })
            }
        }
    }
    // No two tensors may share bytes.
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
    by_offset.sort_by_key(|t| t.offset);
    for w in by_offset.windows(2) {
        // Cannot overflow: both ranges were checked to end inside the file.
        if w[0].offset + w[0].n_bytes > w[1].offset {
            return Err(GgufError::OverlappingTensors {
                a: w[0].name.clone(),
                b: w[1].name.clone(),
            });
        }
    }

    Ok(GgufLayout {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
        file_len,
    })
}
