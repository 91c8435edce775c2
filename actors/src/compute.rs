//! The compute seam of the Inference actor: a model expressed as embed / per-layer / output
//! steps over resident weights, and the KV state of one sequence.
//!
//! `ChecksumCompute` is a stand-in model used to test the pipeline on synthetic files: every
//! layer folds a checksum of *all* its weight bytes into the hidden state and keeps a per-layer
//! running state (like a KV cache), so the generated tokens change if a single weight byte
//! arrives wrong, late or from the wrong layer — which is what the pipeline tests need.

use crate::error::{Result, RuntimeError};
use crate::residency::ResidentLayer;
use std::any::Any;

/// Activations `[n_tokens, width]`, row-major.
#[derive(Debug, Clone, Default)]
pub struct Hidden {
    pub data: Vec<f32>,
    pub n_tokens: usize,
}

/// Per-sequence state owned by the compute (KV cache and position), opaque to the runtime.
pub type SequenceState = Box<dyn Any + Send>;

pub trait ModelCompute: Send {
    fn n_layers(&self) -> usize;
    fn eos_token(&self) -> Option<u32>;
    /// A new sequence (allocates its KV cache).
    fn new_sequence(&mut self) -> Result<SequenceState>;
    fn embed(&mut self, global: &ResidentLayer, tokens: &[u32]) -> Result<Hidden>;
    fn layer(
        &mut self,
        layer: usize,
        weights: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &mut Hidden,
    ) -> Result<()>;
    /// Logits of the last position; advances the sequence position by `hidden.n_tokens`.
    fn output(
        &mut self,
        global: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &Hidden,
    ) -> Result<Vec<f32>>;
    /// Text to tokens (`None` when the compute has no tokenizer).
    fn tokenize(&self, text: &str) -> Option<Result<Vec<u32>>>;
    /// The bytes a token stands for (may be part of a UTF-8 character).
    fn token_bytes(&self, token: u32) -> Vec<u8>;
}

/// Builds a compute for an opened model (runs on the Inference thread at start).
pub type ComputeFactory = std::sync::Arc<
    dyn Fn(&rocmforge::gguf::GgufFile) -> Result<Box<dyn ModelCompute>> + Send + Sync,
>;

const WIDTH: usize = 8;

/// See the module docs. `vocab` tokens; embeddings from the global unit's first tensor rows.
pub struct ChecksumCompute {
    n_layers: usize,
    vocab: usize,
    /// Extra time per layer, to model a slow compute stage in tests.
    pub delay_per_layer: std::time::Duration,
}

struct ChecksumSeq {
    /// Per layer running state: what a KV cache is to a real model.
    kv: Vec<[f32; WIDTH]>,
    pos: usize,
}

impl ChecksumCompute {
    pub fn new(n_layers: usize, vocab: usize) -> Self {
        Self {
            n_layers,
            vocab: vocab.max(2),
            delay_per_layer: std::time::Duration::ZERO,
        }
    }

    /// A factory reading the layer count from the file (`blk.N` tensors) and using `vocab`.
    pub fn factory(vocab: usize, delay_per_layer: std::time::Duration) -> ComputeFactory {
        std::sync::Arc::new(move |file| {
            let n = file
                .tensors()
                .iter()
                .filter_map(|t| t.layer())
                .max()
                .map(|m| m + 1)
                .unwrap_or(0);
            let mut c = ChecksumCompute::new(n, vocab);
            c.delay_per_layer = delay_per_layer;
            Ok(Box::new(c) as Box<dyn ModelCompute>)
        })
    }
}

/// Order-sensitive checksum of bytes, 8 at a time (fast enough to read every weight byte).
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w))
            .wrapping_mul(0x0100_0000_01b3)
            .rotate_left(29);
    }
    for &b in chunks.remainder() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn unit_f32(h: u64) -> f32 {
    ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn seq_mut(seq: &mut SequenceState) -> Result<&mut ChecksumSeq> {
    seq.downcast_mut::<ChecksumSeq>()
        .ok_or(RuntimeError::Compute {
            layer: None,
            message: "sequence state of another compute".into(),
        })
}

impl ModelCompute for ChecksumCompute {
    fn n_layers(&self) -> usize {
        self.n_layers
    }

    fn eos_token(&self) -> Option<u32> {
        None
    }

    fn new_sequence(&mut self) -> Result<SequenceState> {
        Ok(Box::new(ChecksumSeq {
            kv: vec![[0.0; WIDTH]; self.n_layers],
            pos: 0,
        }))
    }

    fn embed(&mut self, global: &ResidentLayer, tokens: &[u32]) -> Result<Hidden> {
        let table = global.tensor_bytes(0).unwrap_or(&[]);
        let mut data = Vec::with_capacity(tokens.len() * WIDTH);
        for &t in tokens {
            let row = table.len() / self.vocab;
            let start = (t as usize % self.vocab) * row;
            let h = checksum(table.get(start..start + row).unwrap_or(&[])) ^ t as u64;
            for i in 0..WIDTH {
                data.push(unit_f32(h.rotate_left(8 * i as u32)));
            }
        }
        Ok(Hidden {
            data,
            n_tokens: tokens.len(),
        })
    }

    fn layer(
        &mut self,
        layer: usize,
        weights: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &mut Hidden,
    ) -> Result<()> {
        if !self.delay_per_layer.is_zero() {
            std::thread::sleep(self.delay_per_layer);
        }
        let mut h = layer as u64;
        for i in 0..weights.tensors.len() {
            let b = weights.tensor_bytes(i).ok_or(RuntimeError::Compute {
                layer: Some(layer),
                message: "weights not host-visible".into(),
            })?;
            h = h.rotate_left(7) ^ checksum(b);
        }
        let w = unit_f32(h);
        let s = seq_mut(seq)?;
        let kv = s.kv.get_mut(layer).ok_or(RuntimeError::Compute {
            layer: Some(layer),
            message: "layer out of range".into(),
        })?;
        for row in hidden.data.chunks_mut(WIDTH) {
            for (i, x) in row.iter_mut().enumerate() {
                kv[i] = 0.9 * kv[i] + 0.1 * *x;
                *x = (*x * 1.7 + w * (i as f32 + 1.0) + kv[i]).sin();
            }
        }
        Ok(())
    }

    fn output(
        &mut self,
        global: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &Hidden,
    ) -> Result<Vec<f32>> {
        let s = seq_mut(seq)?;
        s.pos += hidden.n_tokens;
        let last = hidden
            .data
            .chunks(WIDTH)
            .last()
            .ok_or(RuntimeError::Compute {
                layer: None,
                message: "no tokens".into(),
            })?;
        let g = (0..global.tensors.len())
            .filter_map(|i| global.tensor_bytes(i))
            .fold(0u64, |a, b| a.rotate_left(5) ^ checksum(b));
        Ok((0..self.vocab)
            .map(|j| {
                last.iter()
                    .enumerate()
                    .map(|(i, x)| {
                        x * unit_f32(
                            g ^ ((j * WIDTH + i) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                        )
                    })
                    .sum()
            })
            .collect())
    }

    fn tokenize(&self, _text: &str) -> Option<Result<Vec<u32>>> {
        None
    }

    fn token_bytes(&self, _token: u32) -> Vec<u8> {
        Vec::new()
    }
}
