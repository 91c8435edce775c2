//! GGUF writer: header, metadata, tensor infos, then tensor data streamed in order with the
//! alignment padding. Streaming matters: `synth` writes multi-GB models at disk speed without
//! holding them in memory.

use super::error::{GgufError, Result};
use super::metadata::Metadata;
use super::reader::{
    DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_ARRAY_LEN, MAX_KV,
    MAX_STRING_LEN, MAX_TENSORS,
};
use super::tensor::TensorInfo;
use super::value::{Array, ArrayItems, Value};
use crate::quant::qtype::GgmlType;
use std::io::Write;

/// A tensor to be written: name, shape (`shape[0]` contiguous) and type.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<u64>,
    pub ggml_type: GgmlType,
}

/// Streams a GGUF file: the constructor writes everything up to the data section; then
/// `write_tensor` is called once per tensor in the order given.
pub struct GgufWriter<W: Write> {
    w: W,
    infos: Vec<TensorInfo>,
    next: usize,
    /// Bytes written into the data section so far.
    data_pos: u64,
    /// Bytes of tensor `next` written so far by `write_tensor_part`.
    in_tensor: u64,
    alignment: u64,
}

fn wr(w: &mut impl Write, b: &[u8]) -> Result<()> {
    w.write_all(b).map_err(GgufError::WriteIo)
}

fn write_str(w: &mut impl Write, s: &str) -> Result<()> {
    wr(w, &(s.len() as u64).to_le_bytes())?;
    wr(w, s.as_bytes())
}

fn write_array(w: &mut impl Write, a: &Array) -> Result<()> {
    wr(w, &(a.elem as u32).to_le_bytes())?;
    wr(w, &(a.items.len() as u64).to_le_bytes())?;
    match &a.items {
        ArrayItems::U8(v) => wr(w, v),
        ArrayItems::I8(v) => v.iter().try_for_each(|x| wr(w, &x.to_le_bytes())),
        ArrayItems::Bool(v) => v.iter().try_for_each(|x| wr(w, &[*x as u8])),
        ArrayItems::U16(v) => v.iter().try_for_each(|x| wr(w, &x.to_le_bytes())),
        ArrayItems::I16(v) => v.iter().try_for_each(|x| wr(w, &x.to_le_bytes())),
        ArrayItems::U32(v) => v.iter().try_for_each(|x| wr(w, &x.to_le_bytes())),
        ArrayItems::I32(v) => v.iter().try_for_each(|x| wr(w, &x.to_le_bytes())),
        ArrayItems::F32(v) => v.iter().try_for_each(|x| wr(w, &x.to_le_bytes())),
        ArrayItems::U64(v) => v.iter().try_for_each(|x| wr(w, &x.to_le_bytes())),
        ArrayItems::I64(v) => v.iter().try_for_each(|x| wr(w, &x.to_le_bytes())),
        ArrayItems::F64(v) => v.iter().try_for_each(|x| wr(w, &x.to_le_bytes())),
        ArrayItems::String(v) => v.iter().try_for_each(|s| write_str(w, s)),
        ArrayItems::Array(v) => v.iter().try_for_each(|x| write_array(w, x)),
    }
}

/// Refuses strings our reader would refuse, so every file the writer produces reads back.
fn check_str(s: &str, what: &dyn Fn() -> String) -> Result<()> {
    if s.len() as u64 > MAX_STRING_LEN {
        return Err(GgufError::Write(format!(
            "{}: string of {} bytes is over the cap {MAX_STRING_LEN}",
            what(),
            s.len()
        )));
    }
    Ok(())
}

/// Checks an array's element type against its items, and its length, nesting and strings
/// against the reader's caps. `depth` is 1 for a top-level array, as in the reader.
fn check_array(key: &str, a: &Array, depth: usize) -> Result<()> {
    if depth > MAX_ARRAY_DEPTH {
        return Err(GgufError::Write(format!(
            "key {key:?}: arrays nested {depth} deep (cap {MAX_ARRAY_DEPTH})"
        )));
    }
    if a.items.len() as u64 > MAX_ARRAY_LEN {
        return Err(GgufError::Write(format!(
            "key {key:?}: array of {} entries is over the cap {MAX_ARRAY_LEN}",
            a.items.len()
        )));
    }
    let ok = matches!(
        (&a.items, a.elem),
        (ArrayItems::U8(_), super::ValueType::U8)
            | (ArrayItems::I8(_), super::ValueType::I8)
            | (ArrayItems::U16(_), super::ValueType::U16)
            | (ArrayItems::I16(_), super::ValueType::I16)
            | (ArrayItems::U32(_), super::ValueType::U32)
            | (ArrayItems::I32(_), super::ValueType::I32)
            | (ArrayItems::F32(_), super::ValueType::F32)
            | (ArrayItems::Bool(_), super::ValueType::Bool)
            | (ArrayItems::String(_), super::ValueType::String)
            | (ArrayItems::Array(_), super::ValueType::Array)
            | (ArrayItems::U64(_), super::ValueType::U64)
            | (ArrayItems::I64(_), super::ValueType::I64)
            | (ArrayItems::F64(_), super::ValueType::F64)
    );
    if !ok {
        return Err(GgufError::Write(format!(
            "key {key:?}: array element type {} does not match its items",
            a.elem.name()
        )));
    }
    match &a.items {
        ArrayItems::Array(v) => v.iter().try_for_each(|x| check_array(key, x, depth + 1)),
        ArrayItems::String(v) => v
            .iter()
            .try_for_each(|x| check_str(x, &|| format!("key {key:?}"))),
        _ => Ok(()),
    }
}

fn write_value(w: &mut impl Write, key: &str, v: &Value) -> Result<()> {
    wr(w, &(v.value_type() as u32).to_le_bytes())?;
    match v {
        Value::U8(x) => wr(w, &[*x]),
        Value::I8(x) => wr(w, &x.to_le_bytes()),
        Value::U16(x) => wr(w, &x.to_le_bytes()),
        Value::I16(x) => wr(w, &x.to_le_bytes()),
        Value::U32(x) => wr(w, &x.to_le_bytes()),
        Value::I32(x) => wr(w, &x.to_le_bytes()),
        Value::F32(x) => wr(w, &x.to_le_bytes()),
        Value::Bool(x) => wr(w, &[*x as u8]),
        Value::String(s) => {
            check_str(s, &|| format!("key {key:?}"))?;
            write_str(w, s)
        }
        Value::Array(a) => {
            check_array(key, a, 1)?;
            write_array(w, a)
        }
        Value::U64(x) => wr(w, &x.to_le_bytes()),
        Value::I64(x) => wr(w, &x.to_le_bytes()),
        Value::F64(x) => wr(w, &x.to_le_bytes()),
    }
}

const ZEROS: [u8; 4096] = [0; 4096];

fn pad(w: &mut impl Write, n: u64) -> Result<()> {
    let mut n = n;
    while n > 0 {
        let k = n.min(ZEROS.len() as u64);
        wr(w, &ZEROS[..k as usize])?;
        n -= k;
    }
    Ok(())
}

impl<W: Write> GgufWriter<W> {
    /// Writes a version-3 header. Alignment comes from `general.alignment` (u32) if present.
    pub fn new(w: W, metadata: &Metadata, tensors: &[TensorSpec]) -> Result<Self> {
        Self::with_version(w, 3, metadata, tensors)
    }

    pub fn with_version(
        mut w: W,
        version: u32,
        metadata: &Metadata,
        tensors: &[TensorSpec],
    ) -> Result<Self> {
        if version != 2 && version != 3 {
            return Err(GgufError::Write(format!(
                "cannot write GGUF version {version}"
            )));
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(Value::U32(a)) => *a as u64,
            Some(v) => {
                return Err(GgufError::Write(format!(
                    "general.alignment must be u32, is {}",
                    v.type_name()
                )))
            }
        };
        if alignment == 0 || !alignment.is_power_of_two() || alignment > MAX_ALIGNMENT {
            return Err(GgufError::BadAlignment {
                value: alignment,
                cap: MAX_ALIGNMENT,
            });
        }
        if tensors.len() as u64 > MAX_TENSORS || metadata.len() as u64 > MAX_KV {
            return Err(GgufError::Write(format!(
                "{} tensors and {} keys: over the caps {MAX_TENSORS} / {MAX_KV}",
                tensors.len(),
                metadata.len()
            )));
        }
        let mut infos = Vec::with_capacity(tensors.len());
        let mut offset = 0u64;
        let mut seen = std::collections::HashSet::new();
        for t in tensors {
            if !seen.insert(t.name.as_str()) {
                return Err(GgufError::DuplicateTensor {
                    name: t.name.clone(),
                });
            }
            let info = TensorInfo::new(t.name.clone(), t.shape.clone(), t.ggml_type, offset, 0)?;
            offset = offset
                .checked_add(info.n_bytes)
                .and_then(|o| o.checked_next_multiple_of(alignment))
                .ok_or_else(|| GgufError::Overflow {
                    what: "tensor data offsets".into(),
                })?;
            infos.push(info);
        }

        let mut header: Vec<u8> = Vec::new();
        wr(&mut header, &GGUF_MAGIC)?;
        wr(&mut header, &version.to_le_bytes())?;
        wr(&mut header, &(infos.len() as u64).to_le_bytes())?;
        wr(&mut header, &(metadata.len() as u64).to_le_bytes())?;
        for (k, v) in metadata.iter() {
            check_str(k, &|| "metadata key".to_string())?;
            write_str(&mut header, k)?;
            write_value(&mut header, k, v)?;
        }
        for t in &infos {
            check_str(&t.name, &|| "tensor name".to_string())?;
            write_str(&mut header, &t.name)?;
            wr(&mut header, &(t.shape.len() as u32).to_le_bytes())?;
            for d in &t.shape {
                wr(&mut header, &d.to_le_bytes())?;
            }
            wr(&mut header, &t.ggml_type.id().to_le_bytes())?;
            wr(&mut header, &t.offset.to_le_bytes())?;
        }
        let hl = header.len() as u64;
        let padded = hl.next_multiple_of(alignment);
        wr(&mut w, &header)?;
        pad(&mut w, padded - hl)?;
        Ok(Self {
            w,
            infos,
            next: 0,
            data_pos: 0,
            in_tensor: 0,
            alignment,
        })
    }

    /// Tensor infos with their data offsets, in write order.
    pub fn infos(&self) -> &[TensorInfo] {
        &self.infos
    }

    /// The next tensor to write, if any.
    pub fn next_tensor(&self) -> Option<&TensorInfo> {
        self.infos.get(self.next)
    }

    /// Writes the next tensor's bytes (exactly `n_bytes` of them).
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<()> {
        let info = self
            .infos
            .get(self.next)
            .ok_or_else(|| GgufError::Write("all tensors already written".into()))?;
        if data.len() as u64 != info.n_bytes || self.in_tensor != 0 {
            return Err(GgufError::Write(format!(
                "tensor {:?}: got {} bytes ({} already written in parts), its shape {:?} of {} \
                 needs {}",
                info.name,
                data.len(),
                self.in_tensor,
                info.shape,
                info.ggml_type,
                info.n_bytes
            )));
        }
        self.write_tensor_part(data)
    }

    /// Appends the next piece of the current tensor, so a multi-GB tensor can be streamed without
    /// holding it whole. Moves on to the next tensor once its `n_bytes` are complete.
    pub fn write_tensor_part(&mut self, data: &[u8]) -> Result<()> {
        let info = self
            .infos
            .get(self.next)
            .ok_or_else(|| GgufError::Write("all tensors already written".into()))?;
        let after = self.in_tensor.checked_add(data.len() as u64);
        if after.is_none_or(|a| a > info.n_bytes) {
            return Err(GgufError::Write(format!(
                "tensor {:?}: {} more bytes after {} would exceed its {} bytes",
                info.name,
                data.len(),
                self.in_tensor,
                info.n_bytes
            )));
        }
        if self.in_tensor == 0 {
            pad(&mut self.w, info.offset - self.data_pos)?;
            self.data_pos = info.offset;
        }
        wr(&mut self.w, data)?;
        self.in_tensor += data.len() as u64;
        self.data_pos += data.len() as u64;
        if self.in_tensor == info.n_bytes {
            self.next += 1;
            self.in_tensor = 0;
        }
        Ok(())
    }

    /// Checks every tensor was written, pads the end to the alignment, flushes.
    pub fn finish(mut self) -> Result<W> {
        if self.next != self.infos.len() {
            return Err(GgufError::Write(format!(
                "only {} of {} tensors written ({} bytes of the next)",
                self.next,
                self.infos.len(),
                self.in_tensor
            )));
        }
        let end = self.data_pos.next_multiple_of(self.alignment);
        pad(&mut self.w, end - self.data_pos)?;
        self.w.flush().map_err(GgufError::WriteIo)?;
        Ok(self.w)
    }
}

/// Writes a whole file into memory (tests, small models).
pub fn write_to_vec(metadata: &Metadata, tensors: &[(TensorSpec, Vec<u8>)]) -> Result<Vec<u8>> {
    let specs: Vec<TensorSpec> = tensors.iter().map(|(s, _)| s.clone()).collect();
    let mut w = GgufWriter::new(Vec::new(), metadata, &specs)?;
    for (_, data) in tensors {
        w.write_tensor(data)?;
    }
    w.finish()
}
