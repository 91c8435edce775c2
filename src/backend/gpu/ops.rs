//! Typed, checked launchers for the kernels in `kernels/`, for any [`KernelDevice`]. Each checks
//! shapes against buffer sizes before the (unsafe) launch, so a wrong call is an error, never an
//! out-of-bounds access. Layouts are stated in `kernels/*.cu` next to each entry point.
//!
//! Launch shapes are multiples of the device's warp size (`ComputeDevice::warp_size`: 32 on
//! NVIDIA and RDNA, 64 on CDNA) where a kernel reduces across a warp; the kernels take the same
//! width from `RF_WARP`. Fixed block sizes (256, 1024) are multiples of both widths. Shared
//! memory is static in every kernel (sized by `RF_MAX_WARPS` / `RF_ATTN_MAX_*`), so no launch
//! passes dynamic shared bytes.

use super::{Arg, BufferIo, DeviceKernel, KernelDevice, LaunchShape};
use crate::backend::error::{BackendError, BackendResult};
use crate::backend::kernels::{mmvq_col_multiple, q8a_bytes, q8a_capable, qtype_suffix};
use crate::backend::DeviceBuffer;
use crate::quant::GgmlType;

/// Rows a matrix-vector block handles (one warp each).
const MMVQ_ROWS_PER_BLOCK: u32 = 4;
/// Most vectors one batched matrix-vector launch takes (RF_MMVQN_MAX in mmvq.cu).
pub const MMVQN_MAX: usize = 8;
/// Warps per q8 matrix-vector block (RF_MMVQ8_WARPS in mmvq_q8.cu).
const MMVQ8_WARPS: u32 = 8;

/// Warps per row of the one-vector q8 product over `nrows` rows: the fewest (1, 2, 4) that
/// keep at least `MMVQ8_MIN_WARPS` warps streaming weights, so a small matrix still has
/// loads in flight while a large one runs a warp per row. Measured on an H100 (gpu_kernels'
/// "q8a shapes", 8B matrices, Q4_0/Q4_K/Q6_K/Q8_0): one warp per row was fastest from 4,096
/// rows up (Q4_K's 4,096 x 4,096 and 4,096 x 14,336 excepted, 9-20% better with two), four at
/// 1,024 rows; eight was never the best.
pub fn mmvq8_wpr(nrows: usize) -> u32 {
    [1u32, 2, 4]
        .into_iter()
        .find(|&w| nrows * w as usize >= MMVQ8_MIN_WARPS)
        .unwrap_or(4)
}

/// Warps a one-vector q8 product keeps busy at least (see [`mmvq8_wpr`]).
const MMVQ8_MIN_WARPS: usize = 4096;

/// Launch shape of the q8 matrix-vector kernels with `wpr` warps per row.
fn mmvq8_shape(warp: u32, nrows: usize, wpr: u32) -> BackendResult<LaunchShape> {
    let rows_per_block = (MMVQ8_WARPS / wpr) as usize;
    Ok(LaunchShape {
        grid: (to_u32("mmvq_q8", nrows.div_ceil(rows_per_block))?, 1, 1),
        block: (MMVQ8_WARPS * warp, 1, 1),
        shared_bytes: 0,
    })
}
/// Warps per row the staged one-vector product wants for rows of `ncols`: about two chunks of
/// 2,048 weights each, at most 4 (measured on the H100: 4,096 x 14,336 ran fastest with 4 for
/// most types, 4,096-column rows with 1).
fn mmvq8s_wpr(ncols: usize) -> u32 {
    // The staged kernels exist for 1, 2 and 4 warps per row.
    match ncols.div_ceil(2048).div_ceil(2) {
        0 | 1 => 1,
        2 => 2,
        _ => 4,
    }
}

/// Whether the staged q8 products (`_s*` in mmvq_q8.cu: 16-byte loads of each row through
/// shared memory) can read `w`: every row must start 16-byte aligned.
fn mmvq8_stageable(w: &dyn DeviceBuffer, m: QMatrix) -> bool {
    let row = m.qtype.row_bytes(m.ncols as u64).unwrap_or(1);
    w.device_ptr() % 16 == 0 && row % 16 == 0
}

/// Rows of one tensor-core tile of the batched q8 products (RF_MMA_ROWS in mmvq_q8.cu).
const MMA_ROWS: usize = 16;
/// Steps of at most this many rows split each row of `rmsnorm_q8a` over several blocks (a
/// decode step's one row was one SM's work: 5.6 us a launch on the H100).
const NORM_SPLIT_MAX_ROWS: usize = 16;

/// Most vectors one tensor-core q8 launch takes on the q8a in place (RF_MMA_MAXN: the `_mm*`
/// kernels).
pub const MMA_MAXN: usize = 16;
/// Most vectors one tensor-core q8 launch takes on packed activations (RF_MMA_PACKED_MAXN: the
/// `_mq*p` kernels).
pub const MMA_PACKED_MAXN: usize = 32;

/// Warps per 16-row tile of the tensor-core q8 products (`_m2/_m4/_m8`): the fewest that keep
/// `MMVQ8_MIN_WARPS` warps streaming weights (each warp takes a contiguous share of the row's
/// blocks), at most 8.
pub fn mmvq8_mma_ks(nrows: usize) -> u32 {
    let tiles = nrows.div_ceil(MMA_ROWS);
    [2u32, 4]
        .into_iter()
        .find(|&k| tiles * k as usize >= MMVQ8_MIN_WARPS)
        .unwrap_or(8)
}

/// Which tensor-core q8 product: the tiles read from global memory with `ks` (2, 4, 8) warps
/// per tile (`_m{ks}`), or staged through shared memory, 8 warps per tile (`_ms`; rows 16-byte
/// aligned), or staged two tiles a block (`_ms2p`: packed activations only, every type but
/// Q6_K: [`mma_pair_capable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmaTiles {
    Direct(u32),
    Staged,
    StagedPair,
}

/// Whether `qtype` has the two-tile staged forms (`RF_MMVQ8_PAIR` in mmvq_q8.cu: Q6_K's two
/// tiles' chunks do not fit the static shared memory).
pub fn mma_pair_capable(qtype: GgmlType) -> bool {
    q8a_capable(qtype) && qtype != GgmlType::Q6_K
}

/// Whether the launcher takes the two-tile form for `qtype`'s packed launches of more than 16
/// vectors. Measured on the H100 (products alone, 32 vectors, 14,336 x 4,096 / 4,096 x 14,336;
/// docs/PERFORMANCE.md, sixteenth session): Q4_0 411 -> 642 / 437 -> 536 GB/s, Q4_1 470 -> 654 /
/// 439 -> 437, Q8_0 867 -> 1,089 / 800 -> 815; slower for Q5_0, Q5_1 (their halved chunks),
/// Q4_K (487 -> 439 / 598 -> 485) and Q5_K, which keep one tile. At 8 and 16 vectors one tile
/// is as fast or faster for every type (8B Q4_0 end to end: the same; Q4_K: 6-7% faster).
pub fn mma_pair_preferred(qtype: GgmlType) -> bool {
    matches!(qtype, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
}

/// `ROCMFORGE_GPU_MMA_PAIR=0` keeps the staged packed tensor-core products at one 16-row tile a
/// block (for A/B runs of the two-tile forms).
fn mma_pair_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED
        .get_or_init(|| std::env::var("ROCMFORGE_GPU_MMA_PAIR").map_or(true, |v| v.trim() != "0"))
}

/// `ROCMFORGE_GPU_MMA=direct` keeps the batched tensor-core products off the staged form (for
/// A/B runs; `0` turns the tensor cores off altogether, `KernelDevice::int8_mma`).
fn mma_staged_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED.get_or_init(|| {
        !std::env::var("ROCMFORGE_GPU_MMA").is_ok_and(|v| v.trim().eq_ignore_ascii_case("direct"))
    })
}

/// Launch shape of the tensor-core q8 products: `Direct(ks)` with `ks` warps per 16-row tile,
/// `Staged` one tile per block, `StagedPair` two.
fn mmvq8_mma_shape_of(warp: u32, nrows: usize, tiles: MmaTiles) -> BackendResult<LaunchShape> {
    match tiles {
        MmaTiles::Direct(ks) => mmvq8_mma_shape(warp, nrows, ks),
        MmaTiles::Staged => mmvq8_mma_shape(warp, nrows, MMVQ8_WARPS),
        MmaTiles::StagedPair => mmvq8_mma_shape(warp, nrows.div_ceil(2), MMVQ8_WARPS),
    }
}

/// The entry point of `base` (`mmvq_q4_0_q8a`) for `n` vectors in `tiles`: `_m{ks}` / `_ms`
/// up to [`MMVQN_MAX`], `_mm{ks}` / `_mms` up to [`MMA_MAXN`]; `packed`: the forms reading
/// `q8a_pack_mma`'s layout (suffix `p`), `_mq{ks}p` / `_mqsp` up to [`MMA_PACKED_MAXN`], and
/// the two-tile `_m{,m,q}s2p` (packed only).
fn mma_kernel_name(base: &str, tiles: MmaTiles, n: usize, packed: bool) -> String {
    let groups = match n.div_ceil(8) {
        1 => "",
        2 => "m",
        _ => "q",
    };
    let p = if packed { "p" } else { "" };
    match tiles {
        MmaTiles::Direct(ks) => format!("{base}_m{groups}{ks}{p}"),
        MmaTiles::Staged => format!("{base}_m{groups}s{p}"),
        MmaTiles::StagedPair => format!("{base}_m{groups}s2{p}"),
    }
}

/// Bytes of the packed tensor-core activations (`q8a_pack_mma` in mmvq_q8.cu) of up to
/// [`MMA_PACKED_MAXN`] vectors of `ncols`: as many as their q8a.
pub fn mma_pack_bytes(ncols: usize) -> usize {
    q8a_bytes(MMA_PACKED_MAXN, ncols)
}

/// Where a tensor-core batch of `n` vectors of `ncols` packs its activations: the last
/// [`mma_pack_bytes`] of `xq` (16-byte aligned) when they lie past the vectors' q8a (the layer
/// scratch reserves them); `None`: the tiles read the q8a where it is.
fn mma_pack_at(xq: &dyn DeviceBuffer, n: usize, ncols: usize) -> Option<u64> {
    let base = xq.device_ptr();
    let end = base + xq.len_bytes() as u64;
    let at = end.checked_sub(mma_pack_bytes(ncols) as u64)? & !15;
    (at >= base + q8a_bytes(n, ncols) as u64).then_some(at)
}

/// `ROCMFORGE_GPU_MMA_PACK=0` keeps the batched tensor-core products on the q8a layout (for A/B
/// runs of the packed activations).
fn mma_pack_allowed() -> bool {
    static ALLOWED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ALLOWED
        .get_or_init(|| std::env::var("ROCMFORGE_GPU_MMA_PACK").map_or(true, |v| v.trim() != "0"))
}

/// Launch shape of the tensor-core q8 products with `ks` warps per 16-row tile.
fn mmvq8_mma_shape(warp: u32, nrows: usize, ks: u32) -> BackendResult<LaunchShape> {
    let tiles_per_block = (MMVQ8_WARPS / ks) as usize;
    Ok(LaunchShape {
        grid: (
            to_u32(
                "mmvq_q8",
                nrows.div_ceil(MMA_ROWS).div_ceil(tiles_per_block),
            )?,
            1,
            1,
        ),
        block: (MMVQ8_WARPS * warp, 1, 1),
        shared_bytes: 0,
    })
}

/// Threads per block of quantize_q8a_f32 (RF_Q8A_THREADS).
const Q8A_THREADS: usize = 256;
/// Warps per attention block (at most RF_ATTN_MAX_WARPS in attention.cu).
const ATTN_WARPS: u32 = 8;
/// Largest head_dim attention.cu supports (RF_ATTN_MAX_HEAD_DIM).
pub const ATTN_MAX_HEAD_DIM: usize = 256;
/// Tokens per block of the tiled prefill kernel (RF_ATTN_TQ), its threads
/// (RF_ATTN_TILE_THREADS) and the widest head it takes (RF_ATTN_TILE_MAX_D); wider heads (Gemma
/// 3's 256) take the one-token-per-block kernel.
const ATTN_TILE_TOKENS: usize = 16;
const ATTN_TILE_THREADS: u32 = 256;
const ATTN_TILE_MAX_HEAD_DIM: usize = 128;
/// Decode attention over more positions than this splits them across blocks of at least this
/// many (attn_decode_part_f16kv_f32, then attn_merge_f32), at most [`ATTN_MAX_SPLITS`] of them.
pub const ATTN_SPLIT_CHUNK: usize = 256;
/// Most splits of one decode attention; the partials buffer of [`GpuOps::attention_q8a`] holds
/// `n_heads * ATTN_MAX_SPLITS * (head_dim + 2)` f32 ([`attn_part_bytes`]).
pub const ATTN_MAX_SPLITS: usize = 32;

/// Bytes of the split decode attention's partials for `n_heads` heads of `head_dim`.
pub fn attn_part_bytes(n_heads: usize, head_dim: usize) -> usize {
    n_heads
        .saturating_mul(ATTN_MAX_SPLITS)
        .saturating_mul(head_dim.saturating_add(2))
        .saturating_mul(4)
}
/// Largest candidate set of the device sampler (RF_MAX_TOPK in sample.cu).
pub const SAMPLE_MAX_TOPK: usize = 256;

fn need(op: &'static str, what: &str, buf: &dyn DeviceBuffer, bytes: usize) -> BackendResult<()> {
    if buf.len_bytes() < bytes {
        return Err(BackendError::InvalidArgument {
            op,
            what: format!("{what} needs {bytes} bytes, buffer has {}", buf.len_bytes()),
        });
    }
    Ok(())
}

fn to_i32(op: &'static str, what: &str, v: usize) -> BackendResult<i32> {
    i32::try_from(v).map_err(|_| BackendError::InvalidArgument {
        op,
        what: format!("{what} = {v} exceeds i32"),
    })
}

fn to_u32(op: &'static str, v: usize) -> BackendResult<u32> {
    u32::try_from(v).map_err(|_| BackendError::InvalidArgument {
        op,
        what: format!("grid dimension {v} too large"),
    })
}

fn p(b: &dyn DeviceBuffer) -> Arg {
    Arg::Ptr(b.device_ptr())
}

/// The argument list of every `RF_MMVQ8` entry in mmvq_q8.cu: three weight matrices (device
/// addresses) whose rows end at `ends` (a missing matrix repeats the last with no rows), the
/// quantized vectors `xq` and their (d, sum) pairs at `meta`, the three outputs, the columns,
/// `n` (the `_n` / `_sn` forms only) and whether to add to `y`.
struct Mmvq8Args {
    w: [u64; 3],
    y: [u64; 3],
    xq: u64,
    meta: u64,
    ncols: i32,
    ends: [i32; 3],
    n: Option<i32>,
    acc: bool,
}

impl Mmvq8Args {
    /// One matrix `m` (all three slots the same, so every row is the first matrix's) over `n`
    /// vectors quantized in `xq` (quants, then their (d, sum) pairs), into `y`; `n` is passed
    /// when `with_n` (the `_n` / `_sn` / `_m*` forms).
    fn single(
        op: &'static str,
        w: &dyn DeviceBuffer,
        m: QMatrix,
        xq: &dyn DeviceBuffer,
        y: &dyn DeviceBuffer,
        n: usize,
        with_n: bool,
    ) -> BackendResult<Self> {
        let nrows = to_i32(op, "nrows", m.nrows)?;
        Ok(Self {
            w: [w.device_ptr(); 3],
            y: [y.device_ptr(); 3],
            xq: xq.device_ptr(),
            meta: xq.device_ptr() + (n * m.ncols) as u64,
            ncols: to_i32(op, "ncols", m.ncols)?,
            ends: [nrows; 3],
            n: with_n.then_some(n as i32),
            acc: false,
        })
    }

    fn to_args(&self) -> Vec<Arg> {
        let mut a: Vec<Arg> = self.w.iter().map(|&w| Arg::Ptr(w)).collect();
        a.extend([Arg::Ptr(self.xq), Arg::Ptr(self.meta)]);
        a.extend(self.y.iter().map(|&y| Arg::Ptr(y)));
        a.push(Arg::I32(self.ncols));
        a.extend(self.ends.iter().map(|&e| Arg::I32(e)));
        a.extend(self.n.map(Arg::I32));
        a.push(Arg::I32(self.acc.into()));
        a
    }
}

fn weight_bytes(
    op: &'static str,
    qtype: GgmlType,
    nrows: usize,
    ncols: usize,
) -> BackendResult<usize> {
    if qtype_suffix(qtype).is_none() {
        return Err(BackendError::InvalidArgument {
            op,
            what: format!("no device kernel for {qtype}"),
        });
    }
    let row = qtype
        .row_bytes(ncols as u64)
        .ok_or_else(|| BackendError::InvalidArgument {
            op,
            what: format!("{ncols} columns are not whole {qtype} blocks"),
        })?;
    usize::try_from(row)
        .ok()
        .and_then(|r| r.checked_mul(nrows))
        .ok_or_else(|| BackendError::InvalidArgument {
            op,
            what: "weight size overflows".into(),
        })
}

/// A quantized weight matrix `[nrows, ncols]`, rows contiguous in GGUF block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QMatrix {
    pub qtype: GgmlType,
    pub nrows: usize,
    pub ncols: usize,
}

/// Rotary embedding parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeParams {
    pub n_tokens: usize,
    pub n_heads: usize,
    pub head_dim: usize,
    /// Rotated dims per head (<= head_dim, even).
    pub n_rot: usize,
    pub freq_base: f32,
    pub freq_scale: f32,
    /// NeoX pairing (i, i + n_rot/2) instead of (2i, 2i+1).
    pub neox: bool,
}

/// Shape of an f16 KV cache: `n_kv_heads` heads of `head_dim`, up to `seq_cap` positions.
/// Contiguous (the ops without [`KvPages`]): `[n_kv_heads, seq_cap, head_dim]` for K and for V.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub seq_cap: usize,
}

impl KvLayout {
    /// Bytes of one contiguous K (or V) cache.
    pub fn bytes(&self) -> usize {
        self.n_kv_heads * self.seq_cap * self.head_dim * 2
    }

    /// Bytes of one K (or V) plane of a block of `block_tokens` positions.
    pub fn plane_bytes(&self, block_tokens: usize) -> usize {
        self.n_kv_heads * block_tokens * self.head_dim * 2
    }
}

/// A pool of KV blocks on the device (`model::paged`'s layout; kernels/common.cuh's RfKvMap):
/// block `b` starts `b * block_bytes` into the pool and holds `block_tokens` positions of one
/// sequence, every layer's K and V planes (`[n_kv_heads, block_tokens, head_dim]` f16 each)
/// one after the other. The cache buffers a paged op takes start at the layer's plane in block
/// 0 and reach the pool's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvBlocks {
    pub block_tokens: usize,
    pub block_bytes: usize,
    /// Blocks in the pool: the kernels clamp a table's ids below it, so a wrong table reads
    /// or writes the wrong rows of the pool, never memory past it.
    pub blocks: usize,
}

/// A sequence's cache in a [`KvBlocks`] pool: `table` holds its block ids (u32) in position
/// order.
#[derive(Clone, Copy)]
pub struct KvPages<'a> {
    pub table: &'a dyn DeviceBuffer,
    pub pool: KvBlocks,
}

impl KvBlocks {
    /// Checks the pool's geometry for `kv` and that every buffer of `caches` (a layer's plane
    /// in block 0) reaches the last block's plane; returns RfKvMap's `n_blocks, block_halfs,
    /// bs`.
    fn map_args(
        &self,
        op: &'static str,
        kv: KvLayout,
        caches: &[&dyn DeviceBuffer],
    ) -> BackendResult<[Arg; 3]> {
        let plane = kv.plane_bytes(self.block_tokens);
        if self.block_tokens == 0
            || self.blocks == 0
            || self.block_bytes % 16 != 0
            || self.block_bytes < 2 * plane
        {
            return Err(BackendError::InvalidArgument {
                op,
                what: format!(
                    "KV pool of {} blocks of {} positions, {} bytes apart (16-byte multiples, \
                     at least the {plane}-byte K and V planes)",
                    self.blocks, self.block_tokens, self.block_bytes
                ),
            });
        }
        let reach = (self.blocks - 1)
            .checked_mul(self.block_bytes)
            .and_then(|b| b.checked_add(plane))
            .ok_or(BackendError::InvalidArgument {
                op,
                what: format!("KV pool of {} blocks overflows", self.blocks),
            })?;
        for c in caches {
            need(op, "KV pool plane", *c, reach)?;
        }
        Ok([
            Arg::I32(to_i32(op, "blocks", self.blocks)?),
            Arg::I32(to_i32(op, "block halfs", self.block_bytes / 2)?),
            Arg::I32(to_i32(op, "block tokens", self.block_tokens)?),
        ])
    }
}

/// RfKvMap's four arguments (table, n_blocks, block_halfs, bs) for a cache of `kv` read or
/// written below position `reach`: paged through `pages`, or one contiguous block of
/// `kv.seq_cap` positions; checks that `caches` hold what the map reaches and the table covers
/// `reach`.
fn kv_map_args(
    op: &'static str,
    kv: KvLayout,
    pages: Option<KvPages<'_>>,
    caches: &[&dyn DeviceBuffer],
    reach: usize,
) -> BackendResult<[Arg; 4]> {
    match pages {
        None => {
            for c in caches {
                need(op, "cache", *c, kv.bytes())?;
            }
            Ok([
                Arg::Ptr(0),
                Arg::I32(1),
                Arg::I32(0),
                Arg::I32(to_i32(op, "seq_cap", kv.seq_cap.max(1))?),
            ])
        }
        Some(pg) => {
            let [n, bh, bs] = pg.pool.map_args(op, kv, caches)?;
            need(
                op,
                "block table",
                pg.table,
                reach.div_ceil(pg.pool.block_tokens) * 4,
            )?;
            Ok([p(pg.table), n, bh, bs])
        }
    }
}

/// Attention over the cache for `n_tokens` queries at positions `pos0..pos0 + n_tokens`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    pub n_tokens: usize,
    pub n_heads: usize,
    pub kv: KvLayout,
    pub pos0: usize,
    /// Usually 1 / sqrt(head_dim).
    pub scale: f32,
    /// Sliding window: a query sees only the last `window` positions up to its own (Mistral);
    /// 0: all of them.
    pub window: usize,
}

/// Bytes of one entry of a batched decode step's sequence table (RfSeqKv in common.cuh).
pub const SEQ_KV_ENTRY_BYTES: usize = 16;

/// One entry of a batched decode step's sequence table ([`GpuOps::attention_decode_batch`],
/// [`GpuOps::kv_store2_batch`]): the device address of the sequence's block table, its new
/// token's position and its row in the step, laid out as RfSeqKv (`u64`, `i32`, `i32`,
/// little-endian).
pub fn seq_kv_entry(table: u64, pos: usize, row: usize) -> [u64; 2] {
    [table, (pos as u32 as u64) | ((row as u32 as u64) << 32)]
}

/// Device sampling parameters; `u` is a uniform draw in [0, 1) from the host's seeded RNG.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    pub top_k: usize,
    pub top_p: f32,
    pub temperature: f32,
    pub u: f32,
}

/// `kv_store2_f32_f16` over one or two (source, cache) pairs of the same layout and positions
/// (`gridDim.y` = pairs: the kernel stores k with y 0, v with y 1).
fn kv_store_pairs<D: KernelDevice>(
    dev: &D,
    s: &D::Stream,
    pairs: &[(&dyn DeviceBuffer, &dyn DeviceBuffer)],
    kv: KvLayout,
    pages: Option<KvPages<'_>>,
    n_tokens: usize,
    pos0: usize,
) -> BackendResult<()> {
    const OP: &str = "kv_store";
    let n = n_tokens * kv.n_kv_heads * kv.head_dim;
    if pos0 + n_tokens > kv.seq_cap {
        return Err(BackendError::InvalidArgument {
            op: OP,
            what: format!(
                "positions {pos0}+{n_tokens} beyond cache capacity {}",
                kv.seq_cap
            ),
        });
    }
    let (Some(&first), true) = (pairs.first(), pairs.len() <= 2) else {
        return Err(BackendError::InvalidArgument {
            op: OP,
            what: format!("{} caches in one launch (1 or 2)", pairs.len()),
        });
    };
    let mut caches = Vec::with_capacity(2);
    for &(src, cache) in pairs {
        need(OP, "src", src, n * 4)?;
        caches.push(cache);
    }
    let map = kv_map_args(OP, kv, pages, &caches, pos0 + n_tokens)?;
    if n == 0 {
        return Ok(());
    }
    let (k, kc) = first;
    let (v, vc) = pairs.get(1).copied().unwrap_or(first);
    let kern = dev.kernel("elementwise.cu", "kv_store2_f32_f16")?;
    let shape = LaunchShape {
        grid: (
            to_u32(OP, n.div_ceil(256).min(65_535))?,
            pairs.len() as u32,
            1,
        ),
        block: (256, 1, 1),
        shared_bytes: 0,
    };
    let mut args = vec![
        p(k),
        p(kc),
        p(v),
        p(vc),
        Arg::I32(to_i32(OP, "n_tokens", n_tokens)?),
        Arg::I32(to_i32(OP, "n_kv_heads", kv.n_kv_heads)?),
        Arg::I32(to_i32(OP, "head_dim", kv.head_dim)?),
    ];
    args.extend(map);
    args.push(Arg::I32(to_i32(OP, "pos0", pos0)?));
    // SAFETY: every written position is < seq_cap, each cache holds the layout or the pool's
    // reach and the table covers the positions (checked; the kernel clamps block ids below
    // the pool's count); with one pair the kernel's y range is 0 only, so the repeated
    // pointers are not written.
    unsafe { kern.launch(s, shape, &args) }
}

/// The launchers as methods of every [`KernelDevice`] (`dev.mmvq(..)` reads the same on CUDA
/// and HIP); implemented once, for all devices, by the blanket impl below.
pub trait GpuOps: KernelDevice {
    /// `y[nrows] = W x[ncols]` (f32 vectors), reading W's blocks directly.
    #[allow(clippy::too_many_arguments)]
    fn mmvq(
        &self,
        s: &Self::Stream,
        w: &dyn DeviceBuffer,
        m: QMatrix,
        x: &dyn DeviceBuffer,
        y: &dyn DeviceBuffer,
    ) -> BackendResult<()> {
        self.mmvq_n(s, w, m, x, y, 1)
    }

    /// `y[j] = W x[j]` for `n` vectors (`x` `[n, ncols]`, `y` `[n, nrows]` f32), reading W's
    /// blocks once for all of them (in launches of up to [`MMVQN_MAX`] vectors); `n == 1` is
    /// the plain matrix-vector kernel.
    fn mmvq_n(
        &self,
        s: &Self::Stream,
        w: &dyn DeviceBuffer,
        m: QMatrix,
        x: &dyn DeviceBuffer,
        y: &dyn DeviceBuffer,
        n: usize,
    ) -> BackendResult<()> {
        const OP: &str = "mmvq";
        let wb = weight_bytes(OP, m.qtype, m.nrows, m.ncols)?;
        if m.ncols % mmvq_col_multiple(m.qtype) != 0 {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!(
                    "ncols {} not a multiple of {}",
                    m.ncols,
                    mmvq_col_multiple(m.qtype)
                ),
            });
        }
        need(OP, "W", w, wb)?;
        need(OP, "x", x, n * m.ncols * 4)?;
        need(OP, "y", y, n * m.nrows * 4)?;
        let base = format!("mmvq_{}_f32", qtype_suffix(m.qtype).unwrap_or_default());
        let shape = LaunchShape {
            grid: (
                to_u32(OP, m.nrows.div_ceil(MMVQ_ROWS_PER_BLOCK as usize))?,
                1,
                1,
            ),
            block: (self.warp_size(), MMVQ_ROWS_PER_BLOCK, 1),
            shared_bytes: 0,
        };
        let (ncols, nrows) = (to_i32(OP, "ncols", m.ncols)?, to_i32(OP, "nrows", m.nrows)?);
        if n == 1 {
            let k = self.kernel("mmvq.cu", &base)?;
            let args = [p(w), p(x), p(y), Arg::I32(ncols), Arg::I32(nrows)];
            // SAFETY: W holds nrows rows of ncols elements, x ncols f32, y nrows f32 (checked
            // above); the argument list matches RF_MMVQ in mmvq.cu.
            return unsafe { k.launch(s, shape, &args) };
        }
        let k = self.kernel("mmvq.cu", &format!("{base}_n"))?;
        let mut j = 0;
        while j < n {
            let c = (n - j).min(MMVQN_MAX);
            let args = [
                p(w),
                Arg::Ptr(x.device_ptr() + (j * m.ncols * 4) as u64),
                Arg::Ptr(y.device_ptr() + (j * m.nrows * 4) as u64),
                Arg::I32(ncols),
                Arg::I32(nrows),
                Arg::I32(c as i32),
            ];
            // SAFETY: x holds n * ncols f32 and y n * nrows f32 (checked above), so vectors
            // j .. j + c (c <= RF_MMVQN_MAX) are inside both; the argument list matches the
            // `_n` entry of RF_MMVQ in mmvq.cu.
            unsafe { k.launch(s, shape, &args) }?;
            j += c;
        }
        Ok(())
    }

    /// Quantizes `n` f32 vectors of `ncols` (a multiple of 32) into the q8a layout of
    /// `kernels/mmvq_q8.cu` in `xq` ([`q8a_bytes`]): the input of [`GpuOps::mmvq_q8`].
    fn quantize_q8a(
        &self,
        s: &Self::Stream,
        x: &dyn DeviceBuffer,
        xq: &dyn DeviceBuffer,
        n: usize,
        ncols: usize,
    ) -> BackendResult<()> {
        const OP: &str = "quantize_q8a";
        if ncols % 32 != 0 {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!("ncols {ncols} not a multiple of 32"),
            });
        }
        need(OP, "x", x, n * ncols * 4)?;
        need(OP, "xq", xq, q8a_bytes(n, ncols))?;
        let nblk = n * ncols / 32;
        if nblk == 0 {
            return Ok(());
        }
        let k = self.kernel("mmvq_q8.cu", "quantize_q8a_f32")?;
        let shape = LaunchShape {
            grid: (to_u32(OP, nblk.div_ceil(Q8A_THREADS / 32))?, 1, 1),
            block: (Q8A_THREADS as u32, 1, 1),
            shared_bytes: 0,
        };
        let args = [
            p(x),
            p(xq),
            Arg::Ptr(xq.device_ptr() + (n * ncols) as u64),
            Arg::I32(to_i32(OP, "blocks", nblk)?),
        ];
        // SAFETY: x holds nblk * 32 f32, xq nblk * 32 quants followed by nblk float2 (checked
        // above; n * ncols is a multiple of 32, so the float2 array is 8-byte aligned); the
        // argument list matches quantize_q8a_f32.
        unsafe { k.launch(s, shape, &args) }
    }

    /// `y[j] = W x[j]` for `n` vectors already quantized by [`GpuOps::quantize_q8a`] into
    /// `xq` (integer dot products; the weight type must be [`q8a_capable`]).
    fn mmvq_q8(
        &self,
        s: &Self::Stream,
        w: &dyn DeviceBuffer,
        m: QMatrix,
        xq: &dyn DeviceBuffer,
        y: &dyn DeviceBuffer,
        n: usize,
    ) -> BackendResult<()> {
        self.mmvq_q8_into(s, w, m, xq, y, n, false)
    }

    /// [`GpuOps::mmvq_q8`]; `acc`: `y[j] += W x[j]` (a residual add in the epilogue).
    #[allow(clippy::too_many_arguments)]
    fn mmvq_q8_into(
        &self,
        s: &Self::Stream,
        w: &dyn DeviceBuffer,
        m: QMatrix,
        xq: &dyn DeviceBuffer,
        y: &dyn DeviceBuffer,
        n: usize,
        acc: bool,
    ) -> BackendResult<()> {
        self.mmvq_q8_multi(s, &[(w, m, y)], xq, n, acc)
    }

    /// [`GpuOps::mmvq_q8_into`] for one to three matrices `(W, shape, y)` of the same type and
    /// width over the same quantized input (Q/K/V, gate/up) in one launch.
    fn mmvq_q8_multi(
        &self,
        s: &Self::Stream,
        mats: &[(&dyn DeviceBuffer, QMatrix, &dyn DeviceBuffer)],
        xq: &dyn DeviceBuffer,
        n: usize,
        acc: bool,
    ) -> BackendResult<()> {
        const OP: &str = "mmvq_q8";
        let Some(&(_, m0, _)) = mats.first().filter(|_| mats.len() <= 3) else {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!("{} matrices in one launch (1 to 3)", mats.len()),
            });
        };
        if !q8a_capable(m0.qtype) {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!("no q8 matrix-vector kernel for {}", m0.qtype),
            });
        }
        let mult = mmvq_col_multiple(m0.qtype).max(32);
        if m0.ncols % mult != 0 {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!("ncols {} not a multiple of {mult}", m0.ncols),
            });
        }
        for &(w, m, y) in mats {
            if (m.qtype, m.ncols) != (m0.qtype, m0.ncols) {
                return Err(BackendError::InvalidArgument {
                    op: OP,
                    what: format!(
                        "{} x {} beside {} x {} in one launch",
                        m.qtype, m.ncols, m0.qtype, m0.ncols
                    ),
                });
            }
            need(OP, "W", w, weight_bytes(OP, m.qtype, m.nrows, m.ncols)?)?;
            need(OP, "y", y, n * m.nrows * 4)?;
        }
        need(OP, "xq", xq, q8a_bytes(n, m0.ncols))?;
        // Missing matrices repeat the last one with no rows of their own.
        let at = |i: usize| mats[i.min(mats.len() - 1)];
        let ends: Vec<usize> = (0..3)
            .scan(0usize, |acc, i| {
                *acc += if i < mats.len() { mats[i].1.nrows } else { 0 };
                Some(*acc)
            })
            .collect();
        let total = ends[2];
        let base = format!("mmvq_{}_q8a", qtype_suffix(m0.qtype).unwrap_or_default());
        let ncols = to_i32(OP, "ncols", m0.ncols)?;
        let ends = [
            to_i32(OP, "rows", ends[0])?,
            to_i32(OP, "rows", ends[1])?,
            to_i32(OP, "rows", total)?,
        ];
        let ws = [0, 1, 2].map(|i| at(i).0.device_ptr());
        let meta = xq.device_ptr() + (n * m0.ncols) as u64;
        // Staged (16-byte loads through shared memory) when every matrix's rows are aligned for
        // it: faster on the H100 for one vector of every type and for 8-vector batches of the
        // 32-element types (docs/PERFORMANCE.md, "Staged q8 products"); the GGUF-layout kernels
        // otherwise (e.g. SmolLM2's 576-column rows are 324 bytes).
        let staged_rows = mats.iter().all(|&(w, m, _)| mmvq8_stageable(w, m));
        let staged = staged_rows
            // Staged 8-vector batches of the 16-lane K types measured slower (their scales
            // read from shared memory once per vector): those keep `_n`.
            && (n == 1 || !matches!(m0.qtype, GgmlType::Q4_K | GgmlType::Q5_K));
        if n == 1 {
            // Staged, long rows want their chunks spread over more warps (about two each).
            let wpr = if staged {
                mmvq8_wpr(total).max(mmvq8s_wpr(m0.ncols))
            } else {
                mmvq8_wpr(total)
            };
            let form = if staged { 's' } else { 'w' };
            let k = self.kernel("mmvq_q8.cu", &format!("{base}_{form}{wpr}"))?;
            let shape = mmvq8_shape(self.warp_size(), total, wpr)?;
            let args = Mmvq8Args {
                w: ws,
                y: [0, 1, 2].map(|i| at(i).2.device_ptr()),
                xq: xq.device_ptr(),
                meta,
                ncols,
                ends,
                n: None,
                acc,
            }
            .to_args();
            // Early: the q8 products wait (rf_grid_wait) before reading x or touching y.
            // SAFETY: each W holds its rows of ncols elements and each y its rows of f32, xq
            // one quantized vector (checked above); rows past a matrix's count belong to the
            // next; the argument list matches RF_MMVQ8 in mmvq_q8.cu.
            return unsafe { k.launch_early(s, shape, &args) };
        }
        // Batches: on int8 tensor cores where the device has them (16 rows x 8 vectors per
        // instruction, each weight block decoded once for up to 16 vectors: `_m*` up to 8,
        // `_mm*` up to 16, packed `_mq*p` up to 32); else `_n` / `_sn` (one warp per row, up to
        // 8 vectors a launch).
        let mma = self.int8_mma();
        // Tensor-core tiles staged through shared memory where every row is 16-byte aligned.
        // Packed: each launch's vectors (up to 32) first go to the tensor-core layout at the
        // end of xq.
        let pack = if mma && mma_pack_allowed() {
            mma_pack_at(xq, n, m0.ncols)
        } else {
            None
        };
        let tiles = if staged_rows && mma_staged_allowed() {
            MmaTiles::Staged
        } else {
            MmaTiles::Direct(mmvq8_mma_ks(total))
        };
        // Staged packed launches of more than 16 vectors take two tiles a block where that
        // measured faster ([`mma_pair_preferred`]): the tiles share each activation load.
        let pair = tiles == MmaTiles::Staged
            && pack.is_some()
            && mma_pair_preferred(m0.qtype)
            && mma_pair_allowed();
        let tiles_for = |c: usize| {
            if pair && c > MMA_MAXN {
                MmaTiles::StagedPair
            } else {
                tiles
            }
        };
        let chunk = match (mma, pack) {
            (true, Some(_)) => MMA_PACKED_MAXN,
            (true, None) => MMA_MAXN,
            (false, _) => MMVQN_MAX,
        };
        let mut j = 0;
        while j < n {
            let c = (n - j).min(chunk);
            let shape = if mma {
                mmvq8_mma_shape_of(self.warp_size(), total, tiles_for(c))?
            } else {
                mmvq8_shape(self.warp_size(), total, 1)?
            };
            let name = if mma {
                mma_kernel_name(&base, tiles_for(c), c, pack.is_some())
            } else {
                format!("{base}_{}", if staged { "sn" } else { "n" })
            };
            let k = self.kernel("mmvq_q8.cu", &name)?;
            let (mut xs, mut ms) = (
                xq.device_ptr() + (j * m0.ncols) as u64,
                meta + (j * (m0.ncols / 32) * 8) as u64,
            );
            if let Some(at) = pack {
                // SAFETY: vectors j .. j + c of xq's q8a (checked above); `at` is past them,
                // inside xq, 16-byte aligned with mma_pack_bytes left (mma_pack_at); the
                // stream runs this launch's product before the next pack rewrites it.
                (xs, ms) = unsafe { self.q8a_pack_mma_at(s, (xs, ms), at, c, m0.ncols) }?;
            }
            let args = Mmvq8Args {
                w: ws,
                y: [0, 1, 2].map(|i| {
                    let (_, m, y) = at(i);
                    y.device_ptr() + (j * m.nrows * 4) as u64
                }),
                xq: xs,
                meta: ms,
                ncols,
                ends,
                n: Some(c as i32),
                acc,
            }
            .to_args();
            // Early: the q8 products wait (rf_grid_wait) before reading x or touching y.
            // SAFETY: xq holds n quantized vectors and each y n * its rows f32 (checked
            // above), so vectors j .. j + c (c <= RF_MMVQ8_MAXN, RF_MMA_MAXN for `_mm*`,
            // RF_MMA_PACKED_MAXN for `_mq*p`) are inside them (or their packed copy, inside xq
            // past them: mma_pack_at); the argument list matches the `_n` and `_m*` entries of
            // RF_MMVQ8 in mmvq_q8.cu.
            unsafe { k.launch_early(s, shape, &args) }?;
            j += c;
        }
        Ok(())
    }

    /// [`GpuOps::mmvq_q8`] of `n` vectors (1 to [`MMVQN_MAX`], one launch) with `wpr` (1, 2,
    /// 4 or 8; 1 when `n` > 1) warps per row instead of [`mmvq8_wpr`]'s choice, and the
    /// GGUF-layout kernel (`staged` false) or the staged one (true; 1, 2 or 4 warps, rows
    /// 16-byte aligned) instead of the launcher's: the bandwidth benchmark compares the
    /// kernel's shapes with it, and the kernel tests the two forms.
    #[allow(clippy::too_many_arguments)]
    fn mmvq_q8_wpr(
        &self,
        s: &Self::Stream,
        w: &dyn DeviceBuffer,
        m: QMatrix,
        xq: &dyn DeviceBuffer,
        y: &dyn DeviceBuffer,
        n: usize,
        wpr: u32,
        staged: bool,
    ) -> BackendResult<()> {
        const OP: &str = "mmvq_q8_wpr";
        let shapes_ok = (1..=MMVQN_MAX).contains(&n)
            && (n == 1 || wpr == 1)
            && if staged {
                matches!(wpr, 1 | 2 | 4) && mmvq8_stageable(w, m)
            } else {
                matches!(wpr, 1 | 2 | 4 | 8)
            };
        if !shapes_ok || !q8a_capable(m.qtype) {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!(
                    "{n} vectors, {wpr} warps per row for {} x {} {} (staged: {staged})",
                    m.nrows, m.ncols, m.qtype
                ),
            });
        }
        let wb = weight_bytes(OP, m.qtype, m.nrows, m.ncols)?;
        let mult = mmvq_col_multiple(m.qtype).max(32);
        if m.ncols % mult != 0 {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!("ncols {} not a multiple of {mult}", m.ncols),
            });
        }
        need(OP, "W", w, wb)?;
        need(OP, "xq", xq, q8a_bytes(n, m.ncols))?;
        need(OP, "y", y, n * m.nrows * 4)?;
        let form = match (staged, n) {
            (false, 1) => format!("w{wpr}"),
            (true, 1) => format!("s{wpr}"),
            (false, _) => "n".into(),
            (true, _) => "sn".into(),
        };
        let name = format!(
            "mmvq_{}_q8a_{form}",
            qtype_suffix(m.qtype).unwrap_or_default()
        );
        let k = self.kernel("mmvq_q8.cu", &name)?;
        let shape = mmvq8_shape(self.warp_size(), m.nrows, wpr)?;
        let args = Mmvq8Args::single(OP, w, m, xq, y, n, n > 1)?.to_args();
        // Early: the q8 products wait (rf_grid_wait) before reading x or touching y.
        // SAFETY: as the launches of `mmvq_q8` (same checks, the same argument lists: `n`
        // before `acc` for the `_n` forms).
        unsafe { k.launch_early(s, shape, &args) }
    }

    /// Packs `n` (1 to [`MMA_PACKED_MAXN`]) q8a vectors of `ncols` (quants at device address `xq`,
    /// their (d, sum) pairs at `meta`) into the tensor-core layout at `at` (`q8a_pack_mma` in
    /// mmvq_q8.cu: [`mma_pack_bytes`] at most); returns the packed quants' and pairs' addresses,
    /// the `xq` / `meta` arguments of the `p` forms.
    ///
    /// # Safety
    /// `xq` and `meta` hold the n vectors' q8a, `at` is 16-byte aligned with
    /// [`mma_pack_bytes`]`(ncols)` bytes of device memory that nothing else uses until the
    /// product that reads them has run, and ncols is a multiple of 32.
    unsafe fn q8a_pack_mma_at(
        &self,
        s: &Self::Stream,
        (xq, meta): (u64, u64),
        at: u64,
        n: usize,
        ncols: usize,
    ) -> BackendResult<(u64, u64)> {
        const OP: &str = "q8a_pack_mma";
        let groups = n.div_ceil(8);
        let slots = groups * (ncols / 32) * 32;
        let k = self.kernel("mmvq_q8.cu", "q8a_pack_mma")?;
        let shape = LaunchShape {
            grid: (to_u32(OP, slots.div_ceil(256))?, 1, 1),
            block: (256, 1, 1),
            shared_bytes: 0,
        };
        let packed_meta = at + (groups * 8 * ncols) as u64;
        let args = [
            Arg::Ptr(xq),
            Arg::Ptr(meta),
            Arg::Ptr(at),
            Arg::Ptr(packed_meta),
            Arg::I32(to_i32(OP, "n", n)?),
            Arg::I32(to_i32(OP, "ncols", ncols)?),
        ];
        // Early: the kernel waits (rf_grid_wait) before reading the q8a or writing.
        // SAFETY: the caller's contract: the q8a of n vectors is readable and `at` holds the
        // ceil(n / 8) groups' 10 * ncols bytes each (RF_PACK_THREADS = 256 threads a block).
        unsafe { k.launch_early(s, shape, &args) }?;
        Ok((at, packed_meta))
    }

    /// [`GpuOps::mmvq_q8`] of `n` vectors (1 to [`MMA_MAXN`], one launch; to
    /// [`MMA_PACKED_MAXN`] packed) on the tensor-core kernel `tiles` (direct with 2, 4 or 8
    /// warps per 16-row tile, or staged: rows 16-byte aligned, one or two tiles a block, the
    /// latter packed only), whatever the launcher would pick
    /// (on a device without int8 MMA the kernel computes the same tile with dp4a): the kernel
    /// test and the bandwidth sweep. With [`mma_pack_bytes`] to spare in `xq` past the vectors'
    /// q8a, the activations are packed first and the `p` forms run.
    #[allow(clippy::too_many_arguments)]
    fn mmvq_q8_mma(
        &self,
        s: &Self::Stream,
        w: &dyn DeviceBuffer,
        m: QMatrix,
        xq: &dyn DeviceBuffer,
        y: &dyn DeviceBuffer,
        n: usize,
        tiles: MmaTiles,
    ) -> BackendResult<()> {
        const OP: &str = "mmvq_q8_mma";
        let mult = mmvq_col_multiple(m.qtype).max(32);
        let pack = mma_pack_at(xq, n, m.ncols);
        let tiles_ok = match tiles {
            MmaTiles::Direct(ks) => matches!(ks, 2 | 4 | 8),
            MmaTiles::Staged => mmvq8_stageable(w, m),
            MmaTiles::StagedPair => {
                mmvq8_stageable(w, m) && pack.is_some() && mma_pair_capable(m.qtype)
            }
        };
        let most = if pack.is_some() {
            MMA_PACKED_MAXN
        } else {
            MMA_MAXN
        };
        if !(1..=most).contains(&n) || !tiles_ok || !q8a_capable(m.qtype) || m.ncols % mult != 0 {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!(
                    "{n} vectors, {tiles:?} for {} x {} {}",
                    m.nrows, m.ncols, m.qtype
                ),
            });
        }
        need(OP, "W", w, weight_bytes(OP, m.qtype, m.nrows, m.ncols)?)?;
        need(OP, "xq", xq, q8a_bytes(n, m.ncols))?;
        need(OP, "y", y, n * m.nrows * 4)?;
        let base = format!("mmvq_{}_q8a", qtype_suffix(m.qtype).unwrap_or_default());
        let name = mma_kernel_name(&base, tiles, n, pack.is_some());
        let k = self.kernel("mmvq_q8.cu", &name)?;
        let shape = mmvq8_mma_shape_of(self.warp_size(), m.nrows, tiles)?;
        let mut a = Mmvq8Args::single(OP, w, m, xq, y, n, true)?;
        if let Some(at) = pack {
            // SAFETY: xq holds the n vectors' q8a (checked above) and, past them, the packed
            // layout's bytes at `at` (mma_pack_at).
            (a.xq, a.meta) = unsafe { self.q8a_pack_mma_at(s, (a.xq, a.meta), at, n, m.ncols) }?;
        }
        let args = a.to_args();
        // Early: the q8 products wait (rf_grid_wait) before reading x or touching y.
        // SAFETY: as the launches of `mmvq_q8` (same checks; the `_m*` entries take the `_n`
        // argument list).
        unsafe { k.launch_early(s, shape, &args) }
    }

    /// `out[i] = table[ids[i]]` as f32 rows. `status` (one i32, zeroed by the caller) becomes 1
    /// if an id was out of range (those rows are zero).
    #[allow(clippy::too_many_arguments)]
    fn get_rows(
        &self,
        s: &Self::Stream,
        table: &dyn DeviceBuffer,
        m: QMatrix,
        ids: &dyn DeviceBuffer,
        n_ids: usize,
        out: &dyn DeviceBuffer,
        status: &dyn DeviceBuffer,
    ) -> BackendResult<()> {
        const OP: &str = "get_rows";
        need(
            OP,
            "table",
            table,
            weight_bytes(OP, m.qtype, m.nrows, m.ncols)?,
        )?;
        need(OP, "ids", ids, n_ids * 4)?;
        need(OP, "out", out, n_ids * m.ncols * 4)?;
        need(OP, "status", status, 4)?;
        if n_ids == 0 {
            return Ok(());
        }
        let k = self.kernel(
            "get_rows.cu",
            &format!("get_rows_{}_f32", qtype_suffix(m.qtype).unwrap_or_default()),
        )?;
        let threads = 256u32;
        let shape = LaunchShape {
            grid: (
                to_u32(OP, n_ids)?,
                to_u32(OP, m.ncols.div_ceil(threads as usize))?,
                1,
            ),
            block: (threads, 1, 1),
            shared_bytes: 0,
        };
        let args = [
            p(table),
            p(ids),
            p(out),
            Arg::I32(to_i32(OP, "ncols", m.ncols)?),
            Arg::I32(to_i32(OP, "rows", m.nrows)?),
            p(status),
        ];
        // SAFETY: sizes checked above; ids are range-checked by the kernel against nrows.
        unsafe { k.launch(s, shape, &args) }
    }

    /// Rows `row0..row0 + tile_rows` of W dequantized to f16 into `out` (`[tile_rows, ncols]`).
    #[allow(clippy::too_many_arguments)]
    fn dequantize_f16(
        &self,
        s: &Self::Stream,
        w: &dyn DeviceBuffer,
        m: QMatrix,
        row0: usize,
        tile_rows: usize,
        out: &dyn DeviceBuffer,
    ) -> BackendResult<()> {
        const OP: &str = "dequantize_f16";
        need(OP, "W", w, weight_bytes(OP, m.qtype, m.nrows, m.ncols)?)?;
        if row0.checked_add(tile_rows).is_none_or(|e| e > m.nrows) {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!("rows {row0}+{tile_rows} outside {}", m.nrows),
            });
        }
        need(OP, "out", out, tile_rows * m.ncols * 2)?;
        if tile_rows == 0 {
            return Ok(());
        }
        // Eight elements per thread and one 16-byte store where the row and `out` allow it
        // (every quantized shape): the one-element form wrote 2 bytes per thread.
        let per_thread = if m.ncols % 8 == 0 && out.device_ptr() % 16 == 0 {
            8
        } else {
            1
        };
        let k = self.kernel(
            "dequant.cu",
            &format!(
                "dequantize{}_{}_f16",
                if per_thread == 8 { "8" } else { "" },
                qtype_suffix(m.qtype).unwrap_or_default()
            ),
        )?;
        let threads = 256u32;
        let shape = LaunchShape {
            grid: (
                to_u32(OP, tile_rows)?,
                to_u32(OP, m.ncols.div_ceil(per_thread * threads as usize))?,
                1,
            ),
            block: (threads, 1, 1),
            shared_bytes: 0,
        };
        let args = [
            p(w),
            p(out),
            Arg::I32(to_i32(OP, "ncols", m.ncols)?),
            Arg::I32(to_i32(OP, "row0", row0)?),
            Arg::I32(to_i32(OP, "tile_rows", tile_rows)?),
        ];
        // SAFETY: the tile lies inside W and `out` holds it (checked above).
        unsafe { k.launch(s, shape, &args) }
    }

    /// RMSNorm of `nrows` rows of `ncols` f32 (`out` may be `x`).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm(
        &self,
        s: &Self::Stream,
        x: &dyn DeviceBuffer,
        w: &dyn DeviceBuffer,
        out: &dyn DeviceBuffer,
        nrows: usize,
        ncols: usize,
        eps: f32,
    ) -> BackendResult<()> {
        const OP: &str = "rmsnorm";
        need(OP, "x", x, nrows * ncols * 4)?;
        need(OP, "w", w, ncols * 4)?;
        need(OP, "out", out, nrows * ncols * 4)?;
        if nrows == 0 {
            return Ok(());
        }
        let k = self.kernel("norm.cu", "rmsnorm_f32")?;
        let threads = (ncols.div_ceil(self.warp_size() as usize) * self.warp_size() as usize)
            .clamp(self.warp_size() as usize, 1024);
        let shape = LaunchShape {
            grid: (to_u32(OP, nrows)?, 1, 1),
            block: (to_u32(OP, threads)?, 1, 1),
            shared_bytes: 0,
        };
        let args = [
            p(x),
            p(w),
            p(out),
            Arg::I32(to_i32(OP, "ncols", ncols)?),
            Arg::F32(eps),
        ];
        // SAFETY: sizes checked above.
        unsafe { k.launch(s, shape, &args) }
    }

    /// [`GpuOps::rmsnorm`] whose output is also quantized into `xq` (the q8a layout,
    /// [`q8a_bytes`]`(nrows, ncols)`): the same bits as `rmsnorm` then `quantize_q8a`, in one
    /// launch. `ncols` must be a multiple of 32.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_q8a(
        &self,
        s: &Self::Stream,
        x: &dyn DeviceBuffer,
        w: &dyn DeviceBuffer,
        out: &dyn DeviceBuffer,
        xq: &dyn DeviceBuffer,
        nrows: usize,
        ncols: usize,
        eps: f32,
    ) -> BackendResult<()> {
        const OP: &str = "rmsnorm_q8a";
        if ncols % 32 != 0 {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!("ncols {ncols} not a multiple of 32"),
            });
        }
        need(OP, "x", x, nrows * ncols * 4)?;
        need(OP, "w", w, ncols * 4)?;
        need(OP, "out", out, nrows * ncols * 4)?;
        need(OP, "xq", xq, q8a_bytes(nrows, ncols))?;
        if nrows == 0 {
            return Ok(());
        }
        let k = self.kernel("norm.cu", "rmsnorm_q8a_f32")?;
        let threads = (ncols.div_ceil(self.warp_size() as usize) * self.warp_size() as usize)
            .clamp(self.warp_size() as usize, 1024);
        // A few rows (decode) split each row's output over blocks (each sums the whole row):
        // one 32-element register slice per block, at most 8; never in place (a block would
        // write columns another still reads).
        let (xs, os) = (x.device_ptr(), out.device_ptr());
        let disjoint =
            os >= xs + (nrows * ncols * 4) as u64 || xs >= os + (nrows * ncols * 4) as u64;
        let split = if nrows <= NORM_SPLIT_MAX_ROWS && disjoint {
            ncols.div_ceil(threads).clamp(1, 8)
        } else {
            1
        };
        let shape = LaunchShape {
            grid: (to_u32(OP, nrows)?, split as u32, 1),
            block: (to_u32(OP, threads)?, 1, 1),
            shared_bytes: 0,
        };
        let args = [
            p(x),
            p(w),
            p(out),
            p(xq),
            Arg::Ptr(xq.device_ptr() + (nrows * ncols) as u64),
            Arg::I32(to_i32(OP, "ncols", ncols)?),
            Arg::F32(eps),
        ];
        // SAFETY: sizes checked above; the block is a multiple of the warp (32 or 64 lanes),
        // so of the kernel's 32-lane groups.
        unsafe { k.launch(s, shape, &args) }
    }

    /// The gated activation (`gelu`: GeGLU, else SwiGLU) of n f32 into `out`, also quantized
    /// into `xq` ([`q8a_bytes`]`(1, n)` bytes): the same bits as `swiglu`/`geglu_tanh` then
    /// `quantize_q8a`. `n` must be a multiple of 32 (rows of a multiple of 32 quantize as rows).
    #[allow(clippy::too_many_arguments)]
    fn glu_q8a(
        &self,
        s: &Self::Stream,
        gelu: bool,
        gate: &dyn DeviceBuffer,
        up: &dyn DeviceBuffer,
        out: &dyn DeviceBuffer,
        xq: &dyn DeviceBuffer,
        n: usize,
    ) -> BackendResult<()> {
        const OP: &str = "glu_q8a";
        if n % 32 != 0 {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!("n {n} not a multiple of 32"),
            });
        }
        need(OP, "gate", gate, n * 4)?;
        need(OP, "up", up, n * 4)?;
        need(OP, "out", out, n * 4)?;
        need(OP, "xq", xq, q8a_bytes(1, n))?;
        if n == 0 {
            return Ok(());
        }
        let name = if gelu {
            "geglu_tanh_q8a_f32"
        } else {
            "swiglu_q8a_f32"
        };
        let k = self.kernel("elementwise.cu", name)?;
        let shape = LaunchShape {
            grid: (to_u32(OP, n.div_ceil(256))?, 1, 1),
            block: (256, 1, 1),
            shared_bytes: 0,
        };
        let args = [
            p(gate),
            p(up),
            p(out),
            p(xq),
            Arg::Ptr(xq.device_ptr() + n as u64),
            Arg::I32(to_i32(OP, "n", n)?),
        ];
        // SAFETY: sizes checked above; 256 threads per block (RF_Q8A_GLU_THREADS).
        unsafe { k.launch(s, shape, &args) }
    }

    /// Rotary embedding of `[n_tokens, n_heads, head_dim]` f32 (`out` may be `x`); `pos` holds
    /// `n_tokens` i32 positions; `freq_factors` the model's `[n_rot / 2]` f32 divisors of each
    /// pair's frequency (Llama 3.1's `rope_freqs`), if it has them.
    fn rope(
        &self,
        s: &Self::Stream,
        x: &dyn DeviceBuffer,
        out: &dyn DeviceBuffer,
        pos: &dyn DeviceBuffer,
        freq_factors: Option<&dyn DeviceBuffer>,
        r: RopeParams,
    ) -> BackendResult<()> {
        const OP: &str = "rope";
        let n = r.n_tokens * r.n_heads * r.head_dim;
        if r.n_rot > r.head_dim || r.n_rot % 2 != 0 || r.head_dim % 2 != 0 {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!("n_rot {} / head_dim {}", r.n_rot, r.head_dim),
            });
        }
        need(OP, "x", x, n * 4)?;
        need(OP, "out", out, n * 4)?;
        need(OP, "pos", pos, r.n_tokens * 4)?;
        if let Some(ff) = freq_factors {
            need(OP, "freq_factors", ff, r.n_rot / 2 * 4)?;
        }
        if n == 0 {
            return Ok(());
        }
        let k = self.kernel("rope.cu", if r.neox { "rope_neox_f32" } else { "rope_f32" })?;
        let threads = ((r.head_dim / 2).div_ceil(self.warp_size() as usize)
            * self.warp_size() as usize)
            .min(1024);
        let shape = LaunchShape {
            grid: (to_u32(OP, r.n_tokens * r.n_heads)?, 1, 1),
            block: (to_u32(OP, threads)?, 1, 1),
            shared_bytes: 0,
        };
        let args = [
            p(x),
            p(out),
            p(pos),
            Arg::I32(to_i32(OP, "n_heads", r.n_heads)?),
            Arg::I32(to_i32(OP, "head_dim", r.head_dim)?),
            Arg::I32(to_i32(OP, "n_rot", r.n_rot)?),
            Arg::F32(r.freq_base),
            Arg::F32(r.freq_scale),
            // A null pointer: no factors (the kernel checks).
            freq_factors.map_or(Arg::Ptr(0), p),
        ];
        // SAFETY: sizes checked above (the factors hold n_rot / 2 f32 when given).
        unsafe { k.launch(s, shape, &args) }
    }

    /// [`GpuOps::rope`] of `q` (`r.n_heads` heads) and `k` (`n_heads_k` heads) in place, in one
    /// launch: the same bits as two `rope` calls.
    #[allow(clippy::too_many_arguments)]
    fn rope_qk(
        &self,
        s: &Self::Stream,
        q: &dyn DeviceBuffer,
        k: &dyn DeviceBuffer,
        pos: &dyn DeviceBuffer,
        freq_factors: Option<&dyn DeviceBuffer>,
        r: RopeParams,
        n_heads_k: usize,
    ) -> BackendResult<()> {
        const OP: &str = "rope_qk";
        if r.n_rot > r.head_dim || r.n_rot % 2 != 0 || r.head_dim % 2 != 0 {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!("n_rot {} / head_dim {}", r.n_rot, r.head_dim),
            });
        }
        need(OP, "q", q, r.n_tokens * r.n_heads * r.head_dim * 4)?;
        need(OP, "k", k, r.n_tokens * n_heads_k * r.head_dim * 4)?;
        need(OP, "pos", pos, r.n_tokens * 4)?;
        if let Some(ff) = freq_factors {
            need(OP, "freq_factors", ff, r.n_rot / 2 * 4)?;
        }
        let rows = r.n_tokens * (r.n_heads + n_heads_k);
        if rows == 0 || r.head_dim == 0 {
            return Ok(());
        }
        let name = if r.neox {
            "rope_qk_neox_f32"
        } else {
            "rope_qk_f32"
        };
        let kern = self.kernel("rope.cu", name)?;
        let threads = ((r.head_dim / 2).div_ceil(self.warp_size() as usize)
            * self.warp_size() as usize)
            .min(1024);
        let shape = LaunchShape {
            grid: (to_u32(OP, rows)?, 1, 1),
            block: (to_u32(OP, threads)?, 1, 1),
            shared_bytes: 0,
        };
        let args = [
            p(q),
            p(k),
            p(pos),
            Arg::I32(to_i32(OP, "n_tokens", r.n_tokens)?),
            Arg::I32(to_i32(OP, "n_heads", r.n_heads)?),
            Arg::I32(to_i32(OP, "n_heads_k", n_heads_k)?),
            Arg::I32(to_i32(OP, "head_dim", r.head_dim)?),
            Arg::I32(to_i32(OP, "n_rot", r.n_rot)?),
            Arg::F32(r.freq_base),
            Arg::F32(r.freq_scale),
            freq_factors.map_or(Arg::Ptr(0), p),
        ];
        // SAFETY: sizes checked above (the factors hold n_rot / 2 f32 when given).
        unsafe { kern.launch(s, shape, &args) }
    }

    /// `out = silu(gate) * up`, n f32.
    fn swiglu(
        &self,
        s: &Self::Stream,
        gate: &dyn DeviceBuffer,
        up: &dyn DeviceBuffer,
        out: &dyn DeviceBuffer,
        n: usize,
    ) -> BackendResult<()> {
        elementwise(self, s, "swiglu_f32", gate, up, out, n)
    }

    /// `out = gelu_tanh(gate) * up`, n f32 (GeGLU).
    fn geglu_tanh(
        &self,
        s: &Self::Stream,
        gate: &dyn DeviceBuffer,
        up: &dyn DeviceBuffer,
        out: &dyn DeviceBuffer,
        n: usize,
    ) -> BackendResult<()> {
        elementwise(self, s, "geglu_tanh_f32", gate, up, out, n)
    }

    /// `out = x * scale`, n f32 (`out` may be `x`).
    fn scale(
        &self,
        s: &Self::Stream,
        x: &dyn DeviceBuffer,
        out: &dyn DeviceBuffer,
        scale: f32,
        n: usize,
    ) -> BackendResult<()> {
        scaled(self, s, "scale_f32", x, out, scale, n)
    }

    /// `y += a * x`, n f32.
    fn axpy(
        &self,
        s: &Self::Stream,
        x: &dyn DeviceBuffer,
        y: &dyn DeviceBuffer,
        a: f32,
        n: usize,
    ) -> BackendResult<()> {
        scaled(self, s, "axpy_f32", x, y, a, n)
    }

    /// `out = a + b`, n f32.
    fn add(
        &self,
        s: &Self::Stream,
        a: &dyn DeviceBuffer,
        b: &dyn DeviceBuffer,
        out: &dyn DeviceBuffer,
        n: usize,
    ) -> BackendResult<()> {
        elementwise(self, s, "add_f32", a, b, out, n)
    }

    /// Stores `src` (`[n_tokens, n_kv_heads, head_dim]` f32) into the f16 cache at `pos0..`.
    #[allow(clippy::too_many_arguments)]
    fn kv_store(
        &self,
        s: &Self::Stream,
        src: &dyn DeviceBuffer,
        cache: &dyn DeviceBuffer,
        kv: KvLayout,
        n_tokens: usize,
        pos0: usize,
    ) -> BackendResult<()> {
        kv_store_pairs(self, s, &[(src, cache)], kv, None, n_tokens, pos0)
    }

    /// [`GpuOps::kv_store`] of `k` into `k_cache` and `v` into `v_cache` (the same layout and
    /// positions) in one launch.
    #[allow(clippy::too_many_arguments)]
    fn kv_store2(
        &self,
        s: &Self::Stream,
        k: &dyn DeviceBuffer,
        k_cache: &dyn DeviceBuffer,
        v: &dyn DeviceBuffer,
        v_cache: &dyn DeviceBuffer,
        kv: KvLayout,
        n_tokens: usize,
        pos0: usize,
    ) -> BackendResult<()> {
        kv_store_pairs(
            self,
            s,
            &[(k, k_cache), (v, v_cache)],
            kv,
            None,
            n_tokens,
            pos0,
        )
    }

    /// [`Self::kv_store2`] into a paged cache: `k_cache` / `v_cache` are the layer's planes in
    /// block 0 of `pages.pool` (reaching the pool's end), positions found through `pages.table`.
    #[allow(clippy::too_many_arguments)]
    fn kv_store2_paged(
        &self,
        s: &Self::Stream,
        k: &dyn DeviceBuffer,
        k_cache: &dyn DeviceBuffer,
        v: &dyn DeviceBuffer,
        v_cache: &dyn DeviceBuffer,
        kv: KvLayout,
        pages: KvPages<'_>,
        n_tokens: usize,
        pos0: usize,
    ) -> BackendResult<()> {
        let pairs = [(k, k_cache), (v, v_cache)];
        kv_store_pairs(self, s, &pairs, kv, Some(pages), n_tokens, pos0)
    }

    /// Copies positions `0..len` of every segment of the f16 KV cache `src` into `dst`: both
    /// hold `segs` segments (a cache's `[layer][k|v][head]` planes) of `[cap, head_dim]`, with
    /// `src_cap` / `dst_cap` positions each. The prefix cache's snapshot of a sequence's first
    /// positions and their restore into a new sequence; `head_dim % 8 == 0`.
    #[allow(clippy::too_many_arguments)]
    fn kv_copy(
        &self,
        s: &Self::Stream,
        src: &dyn DeviceBuffer,
        src_cap: usize,
        dst: &dyn DeviceBuffer,
        dst_cap: usize,
        segs: usize,
        head_dim: usize,
        len: usize,
    ) -> BackendResult<()> {
        const OP: &str = "kv_copy";
        if head_dim % 8 != 0 || len > src_cap || len > dst_cap {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!(
                    "{len} positions of head_dim {head_dim} from capacity {src_cap} to {dst_cap} \
                     (head_dim a multiple of 8, positions within both)"
                ),
            });
        }
        need(OP, "src", src, segs * src_cap * head_dim * 2)?;
        need(OP, "dst", dst, segs * dst_cap * head_dim * 2)?;
        let pieces = segs * len * head_dim / 8;
        if pieces == 0 {
            return Ok(());
        }
        let kern = self.kernel("elementwise.cu", "kv_copy_f16")?;
        let shape = LaunchShape {
            grid: (to_u32(OP, pieces.div_ceil(256).min(65_535))?, 1, 1),
            block: (256, 1, 1),
            shared_bytes: 0,
        };
        let args = [
            p(src),
            p(dst),
            Arg::I32(to_i32(OP, "segs", segs)?),
            Arg::I32(to_i32(OP, "len", len)?),
            Arg::I32(to_i32(OP, "head_dim", head_dim)?),
            Arg::I32(to_i32(OP, "src_cap", src_cap)?),
            Arg::I32(to_i32(OP, "dst_cap", dst_cap)?),
        ];
        // SAFETY: both buffers hold `segs` segments of their capacity (checked above) and every
        // copied position is below both capacities; the argument list matches kv_copy_f16.
        unsafe { kern.launch(s, shape, &args) }
    }

    /// [`Self::kv_store2_paged`] of one new token for each of `nseq` sequences in one launch:
    /// entry i of the device table `seqs` ([`seq_kv_entry`]: the address of the sequence's
    /// block table, its position, its row of `k`/`v`) stores that row's K and V at the
    /// position in the pool `pool` whose layer planes (in block 0) are `caches`.
    ///
    /// # Safety
    /// `seqs` must hold `nseq` entries whose table addresses are live device buffers covering
    /// their positions, positions below `kv.seq_cap` and rows below `rows` (the checks here
    /// cover `k`, `v`, the planes' reach and `seqs`' sizes only).
    #[allow(clippy::too_many_arguments)]
    unsafe fn kv_store2_batch(
        &self,
        s: &Self::Stream,
        k: &dyn DeviceBuffer,
        v: &dyn DeviceBuffer,
        seqs: &dyn DeviceBuffer,
        nseq: usize,
        rows: usize,
        caches: (&dyn DeviceBuffer, &dyn DeviceBuffer),
        pool: KvBlocks,
        kv: KvLayout,
    ) -> BackendResult<()> {
        const OP: &str = "kv_store2_batch";
        let w = kv.n_kv_heads * kv.head_dim;
        need(OP, "k", k, rows * w * 4)?;
        need(OP, "v", v, rows * w * 4)?;
        need(OP, "seqs", seqs, nseq * SEQ_KV_ENTRY_BYTES)?;
        let map = pool.map_args(OP, kv, &[caches.0, caches.1])?;
        if nseq == 0 {
            return Ok(());
        }
        let kern = self.kernel("elementwise.cu", "kv_store2_batch_f32_f16")?;
        let shape = LaunchShape {
            grid: (to_u32(OP, nseq)?, 2, 1),
            block: (256, 1, 1),
            shared_bytes: 0,
        };
        let mut args = vec![
            p(k),
            p(v),
            p(seqs),
            p(caches.0),
            p(caches.1),
            Arg::I32(to_i32(OP, "n_kv_heads", kv.n_kv_heads)?),
            Arg::I32(to_i32(OP, "head_dim", kv.head_dim)?),
        ];
        args.extend(map);
        // SAFETY: k and v hold `rows` rows (checked), the table's entries are the caller's
        // contract (above); the argument list matches kv_store2_batch_f32_f16.
        unsafe { kern.launch(s, shape, &args) }
    }

    /// Decode attention of one new token for each of `nseq` sequences in one launch (grid
    /// sequences x heads): entry i of `seqs` ([`seq_kv_entry`]) names the row of `q` / `out`
    /// (and of the q8a output, as [`Self::attention_q8a`]'s `q8`) and the block table it
    /// attends through (in the pool `pool` whose layer planes are `caches`), up to its position.
    /// Each block is the one-block decode kernel's for its sequence: the same bits as
    /// [`Self::attention_q8a`] without `part`, one sequence at a time.
    ///
    /// # Safety
    /// As [`Self::kv_store2_batch`]: the table's addresses, positions and rows must be valid
    /// for `kv` and `rows` (`q`, `out` and the q8 buffers are checked for `rows` rows here).
    #[allow(clippy::too_many_arguments)]
    unsafe fn attention_decode_batch(
        &self,
        s: &Self::Stream,
        q: &dyn DeviceBuffer,
        seqs: &dyn DeviceBuffer,
        nseq: usize,
        rows: usize,
        caches: (&dyn DeviceBuffer, &dyn DeviceBuffer),
        pool: KvBlocks,
        out: &dyn DeviceBuffer,
        a: AttnParams,
        q8: Option<(&dyn DeviceBuffer, &dyn DeviceBuffer)>,
    ) -> BackendResult<()> {
        const OP: &str = "attention_decode_batch";
        let kv = a.kv;
        let w = self.warp_size() as usize;
        if kv.head_dim % w != 0
            || kv.head_dim > ATTN_MAX_HEAD_DIM
            || kv.n_kv_heads == 0
            || a.n_heads % kv.n_kv_heads != 0
            || (q8.is_some() && kv.head_dim % 32 != 0)
        {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!(
                    "head_dim {} (multiple of {w}, <= {ATTN_MAX_HEAD_DIM}), heads {}/{}",
                    kv.head_dim, a.n_heads, kv.n_kv_heads
                ),
            });
        }
        let n = rows * a.n_heads * kv.head_dim;
        need(OP, "q", q, n * 4)?;
        need(OP, "out", out, n * 4)?;
        need(OP, "seqs", seqs, nseq * SEQ_KV_ENTRY_BYTES)?;
        let [n_blocks, block_halfs, bs] = pool.map_args(OP, kv, &[caches.0, caches.1])?;
        if let Some((qs, meta)) = q8 {
            need(OP, "quants", qs, n)?;
            need(OP, "scales", meta, n / 32 * 8)?;
        }
        if nseq == 0 || a.n_heads == 0 {
            return Ok(());
        }
        let kern = self.kernel("attention.cu", "attn_decode_batch_f16kv_f32")?;
        let shape = LaunchShape {
            grid: (to_u32(OP, nseq)?, to_u32(OP, a.n_heads)?, 1),
            block: (self.warp_size() * ATTN_WARPS, 1, 1),
            shared_bytes: 0,
        };
        let (qs, meta) = q8.map_or((0, 0), |(a, b)| (a.device_ptr(), b.device_ptr()));
        let args = [
            p(q),
            p(seqs),
            p(caches.0),
            p(caches.1),
            p(out),
            Arg::I32(to_i32(OP, "n_heads", a.n_heads)?),
            Arg::I32(to_i32(OP, "n_kv_heads", kv.n_kv_heads)?),
            Arg::I32(to_i32(OP, "head_dim", kv.head_dim)?),
            n_blocks,
            block_halfs,
            bs,
            Arg::F32(a.scale),
            Arg::I32(to_i32(OP, "window", a.window)?),
            Arg::Ptr(qs),
            Arg::Ptr(meta),
        ];
        // SAFETY: q, out (and the q8 buffers) hold `rows` rows of n_heads * head_dim (checked),
        // head_dim is a multiple of the warp and at most ATTN_MAX_HEAD_DIM (checked), the
        // table is the caller's contract; the argument list matches attn_decode_batch_f16kv_f32.
        unsafe { kern.launch(s, shape, &args) }
    }

    /// Causal attention of `q` (`[n_tokens, n_heads, head_dim]` f32) over the f16 caches.
    /// One token is the decode kernel, several the prefill kernel.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        s: &Self::Stream,
        q: &dyn DeviceBuffer,
        k_cache: &dyn DeviceBuffer,
        v_cache: &dyn DeviceBuffer,
        out: &dyn DeviceBuffer,
        a: AttnParams,
    ) -> BackendResult<()> {
        self.attention_q8a(s, q, k_cache, v_cache, out, a, None, None)
    }

    /// [`Self::attention_q8a`] over a contiguous cache (`k_cache`, `v_cache` of `a.kv`).
    #[allow(clippy::too_many_arguments)]
    fn attention_q8a(
        &self,
        s: &Self::Stream,
        q: &dyn DeviceBuffer,
        k_cache: &dyn DeviceBuffer,
        v_cache: &dyn DeviceBuffer,
        out: &dyn DeviceBuffer,
        a: AttnParams,
        q8: Option<(&dyn DeviceBuffer, &dyn DeviceBuffer)>,
        part: Option<&dyn DeviceBuffer>,
    ) -> BackendResult<()> {
        self.attention_paged(s, q, (k_cache, v_cache), out, a, None, q8, part)
    }

    /// [`Self::attention`]; with `q8` = (quants, scales) and one token (decode), its output is
    /// also quantized as [`Self::quantize_q8a`] would write it (`quants`: `n_heads * head_dim`
    /// bytes, `scales`: a (d, sum) f32 pair per 32 of them), in the same launch. `head_dim`
    /// must be a multiple of 32 for it. With `part` (at least [`attn_part_bytes`]), a decode
    /// over more than [`ATTN_SPLIT_CHUNK`] positions is split across blocks (flash-decoding:
    /// the positions' partial softmax sums in `part`, then one merge launch that also
    /// quantizes), so a long context keeps every SM busy. `caches`: K and V, contiguous
    /// (`pages` none) or the layer's planes in block 0 of a paged pool (`pages`).
    #[allow(clippy::too_many_arguments)]
    fn attention_paged(
        &self,
        s: &Self::Stream,
        q: &dyn DeviceBuffer,
        caches: (&dyn DeviceBuffer, &dyn DeviceBuffer),
        out: &dyn DeviceBuffer,
        a: AttnParams,
        pages: Option<KvPages<'_>>,
        q8: Option<(&dyn DeviceBuffer, &dyn DeviceBuffer)>,
        part: Option<&dyn DeviceBuffer>,
    ) -> BackendResult<()> {
        const OP: &str = "attention";
        let (k_cache, v_cache) = caches;
        let kv = a.kv;
        let w = self.warp_size() as usize;
        if kv.head_dim % w != 0
            || kv.head_dim > ATTN_MAX_HEAD_DIM
            || kv.n_kv_heads == 0
            || a.n_heads % kv.n_kv_heads != 0
        {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!(
                    "head_dim {} (multiple of {w}, <= {ATTN_MAX_HEAD_DIM}), heads {}/{}",
                    kv.head_dim, a.n_heads, kv.n_kv_heads
                ),
            });
        }
        if a.pos0 + a.n_tokens > kv.seq_cap {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!(
                    "positions {}+{} beyond cache capacity {}",
                    a.pos0, a.n_tokens, kv.seq_cap
                ),
            });
        }
        let n = a.n_tokens * a.n_heads * kv.head_dim;
        need(OP, "q", q, n * 4)?;
        need(OP, "out", out, n * 4)?;
        let map = kv_map_args(OP, kv, pages, &[k_cache, v_cache], a.pos0 + a.n_tokens)?;
        if let Some((qs, meta)) = q8 {
            if a.n_tokens != 1 || kv.head_dim % 32 != 0 {
                return Err(BackendError::InvalidArgument {
                    op: OP,
                    what: format!(
                        "a quantized output needs one token and head_dim % 32 == 0 ({} tokens, head_dim {})",
                        a.n_tokens, kv.head_dim
                    ),
                });
            }
            need(OP, "quants", qs, n)?;
            need(OP, "scales", meta, n / 32 * 8)?;
        }
        if n == 0 {
            return Ok(());
        }
        if let Some(part) = part.filter(|_| a.n_tokens == 1) {
            let kv_len = a.pos0 + 1;
            let first = match a.window {
                w if w > 0 && kv_len > w => kv_len - w,
                _ => 0,
            };
            if kv_len - first > ATTN_SPLIT_CHUNK {
                return attention_split(
                    self,
                    s,
                    [q, k_cache, v_cache, out],
                    a,
                    map,
                    kv_len - first,
                    q8,
                    part,
                );
            }
        }
        let mut args = vec![p(q), p(k_cache), p(v_cache), p(out)];
        let (name, shape) =
            if a.n_tokens > 1 && kv.head_dim % 32 == 0 && kv.head_dim <= ATTN_TILE_MAX_HEAD_DIM {
                // Prefill: a tile of tokens per block shares each key's load.
                args.push(Arg::I32(to_i32(OP, "n_tokens", a.n_tokens)?));
                let shape = LaunchShape {
                    grid: (
                        to_u32(OP, a.n_tokens.div_ceil(ATTN_TILE_TOKENS))?,
                        to_u32(OP, a.n_heads)?,
                        1,
                    ),
                    block: (ATTN_TILE_THREADS, 1, 1),
                    shared_bytes: 0,
                };
                ("attn_prefill_tiled_f16kv_f32", shape)
            } else {
                let shape = LaunchShape {
                    grid: (to_u32(OP, a.n_tokens)?, to_u32(OP, a.n_heads)?, 1),
                    block: (self.warp_size() * ATTN_WARPS, 1, 1),
                    shared_bytes: 0,
                };
                let name = if q8.is_some() {
                    "attn_decode_q8a_f16kv_f32"
                } else if a.n_tokens == 1 {
                    "attn_decode_f16kv_f32"
                } else {
                    "attn_prefill_f16kv_f32"
                };
                (name, shape)
            };
        let k = self.kernel("attention.cu", name)?;
        args.extend([
            Arg::I32(to_i32(OP, "n_heads", a.n_heads)?),
            Arg::I32(to_i32(OP, "n_kv_heads", kv.n_kv_heads)?),
            Arg::I32(to_i32(OP, "head_dim", kv.head_dim)?),
        ]);
        args.extend(map);
        args.extend([
            Arg::I32(to_i32(OP, "pos0", a.pos0)?),
            Arg::F32(a.scale),
            Arg::I32(to_i32(OP, "window", a.window)?),
        ]);
        if let Some((qs, meta)) = q8 {
            args.extend([p(qs), p(meta)]);
        }
        // SAFETY: shapes and buffer sizes checked above (the caches' reach, the table's length);
        // reads stay below pos0 + n_tokens <= seq_cap.
        unsafe { k.launch(s, shape, &args) }
    }

    /// `out[r]` (i32) = argmax of row `r` of `rows` rows of `n` f32 logits (lowest id on ties,
    /// never a NaN; a row whose first logit is NaN gives 0: `sample::argmax`'s choice).
    fn argmax(
        &self,
        s: &Self::Stream,
        logits: &dyn DeviceBuffer,
        n: usize,
        rows: usize,
        out: &dyn DeviceBuffer,
    ) -> BackendResult<()> {
        const OP: &str = "argmax";
        if n == 0 || rows == 0 {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!("{rows} rows of {n} logits"),
            });
        }
        need(
            OP,
            "logits",
            logits,
            rows.saturating_mul(n).saturating_mul(4),
        )?;
        need(OP, "out", out, rows.saturating_mul(4))?;
        let k = self.kernel("sample.cu", "argmax_f32")?;
        let shape = LaunchShape {
            grid: (to_u32(OP, rows)?, 1, 1),
            block: (1024, 1, 1),
            shared_bytes: 0,
        };
        let args = [p(logits), Arg::I32(to_i32(OP, "n", n)?), p(out)];
        // SAFETY: sizes checked.
        unsafe { k.launch(s, shape, &args) }
    }

    /// `out[0]` (i32) = a token drawn by temperature + top-k + top-p (see sample.cu).
    #[allow(clippy::too_many_arguments)]
    fn sample(
        &self,
        s: &Self::Stream,
        logits: &dyn DeviceBuffer,
        n: usize,
        sp: SampleParams,
        out: &dyn DeviceBuffer,
    ) -> BackendResult<()> {
        const OP: &str = "sample";
        need(OP, "logits", logits, n * 4)?;
        need(OP, "out", out, 4)?;
        if n == 0 || !(0.0..1.0).contains(&sp.u) {
            return Err(BackendError::InvalidArgument {
                op: OP,
                what: format!("n = {n}, u = {} (must be in [0, 1))", sp.u),
            });
        }
        let k = self.kernel("sample.cu", "sample_topk_topp_f32")?;
        let shape = LaunchShape {
            grid: (1, 1, 1),
            block: (1024, 1, 1),
            shared_bytes: 0,
        };
        let args = [
            p(logits),
            Arg::I32(to_i32(OP, "n", n)?),
            Arg::I32(to_i32(OP, "top_k", sp.top_k.min(SAMPLE_MAX_TOPK))?),
            Arg::F32(sp.top_p),
            Arg::F32(sp.temperature),
            Arg::F32(sp.u),
            p(out),
        ];
        // SAFETY: sizes checked.
        unsafe { k.launch(s, shape, &args) }
    }

    /// The device compiler's `sizeof` of every block in `kernels::DEVICE_BLOCKS` order.
    fn device_block_sizes(&self, s: &Self::Stream) -> BackendResult<Vec<u32>> {
        let n = crate::backend::kernels::DEVICE_BLOCKS.len();
        let out = self.alloc(n * 4, "block sizes")?;
        out.zero()?;
        let k = self.kernel("quant_sizes.cu", "quant_block_sizes")?;
        let shape = LaunchShape {
            grid: (1, 1, 1),
            block: (1, 1, 1),
            shared_bytes: 0,
        };
        // SAFETY: the kernel writes exactly DEVICE_BLOCKS.len() u32 into `out`.
        unsafe { k.launch(s, shape, &[p(&out)])? };
        crate::backend::DeviceStream::synchronize(s)?;
        out.to_vec::<u32>(n)
    }
}

impl<D: KernelDevice> GpuOps for D {}

/// The split decode attention of [`GpuOps::attention_q8a`] over `range` positions (more than
/// [`ATTN_SPLIT_CHUNK`]); `bufs` are q, the two caches and out, checked by the caller.
#[allow(clippy::too_many_arguments)] // attention_q8a's operands, checked, and the split's range
fn attention_split<D: KernelDevice>(
    d: &D,
    s: &D::Stream,
    bufs: [&dyn DeviceBuffer; 4],
    a: AttnParams,
    map: [Arg; 4],
    range: usize,
    q8: Option<(&dyn DeviceBuffer, &dyn DeviceBuffer)>,
    part: &dyn DeviceBuffer,
) -> BackendResult<()> {
    const OP: &str = "attention (split)";
    let [q, k_cache, v_cache, out] = bufs;
    let kv = a.kv;
    let chunk = ATTN_SPLIT_CHUNK.max(range.div_ceil(ATTN_MAX_SPLITS));
    let nsplit = range.div_ceil(chunk);
    need(
        OP,
        "partials",
        part,
        a.n_heads * nsplit * (kv.head_dim + 2) * 4,
    )?;
    // 16-byte loads of K and V rows where both caches (and the distance between blocks) allow.
    let wide = k_cache.device_ptr() % 16 == 0
        && v_cache.device_ptr() % 16 == 0
        && matches!(map[2], Arg::I32(h) if h % 8 == 0);
    let mut args = vec![p(q), p(k_cache), p(v_cache), p(part)];
    args.extend([
        Arg::I32(to_i32(OP, "n_heads", a.n_heads)?),
        Arg::I32(to_i32(OP, "n_kv_heads", kv.n_kv_heads)?),
        Arg::I32(to_i32(OP, "head_dim", kv.head_dim)?),
    ]);
    args.extend(map);
    args.extend([
        Arg::I32(to_i32(OP, "pos", a.pos0)?),
        Arg::F32(a.scale),
        Arg::I32(to_i32(OP, "window", a.window)?),
        Arg::I32(to_i32(OP, "chunk", chunk)?),
        Arg::I32(i32::from(wide)),
    ]);
    let k = d.kernel("attention.cu", "attn_decode_part_f16kv_f32")?;
    let shape = LaunchShape {
        grid: (to_u32(OP, nsplit)?, to_u32(OP, a.n_heads)?, 1),
        block: (d.warp_size() * ATTN_WARPS, 1, 1),
        shared_bytes: 0,
    };
    // SAFETY: q, the caches and out were checked by attention_q8a, `part` holds n_heads *
    // nsplit rows of head_dim + 2 f32 (above); every split reads positions below pos0 + 1 <=
    // seq_cap.
    unsafe { k.launch(s, shape, &args) }?;
    let (qs, meta) = match q8 {
        Some((qs, meta)) => (p(qs), p(meta)),
        None => (Arg::Ptr(0), Arg::Ptr(0)),
    };
    let args = [
        p(part),
        p(out),
        Arg::I32(to_i32(OP, "n_heads", a.n_heads)?),
        Arg::I32(to_i32(OP, "head_dim", kv.head_dim)?),
        Arg::I32(to_i32(OP, "nsplit", nsplit)?),
        qs,
        meta,
    ];
    let k = d.kernel("attention.cu", "attn_merge_f32")?;
    // head_dim is a multiple of the warp (checked by attention_q8a) and at most 256.
    let shape = LaunchShape {
        grid: (to_u32(OP, a.n_heads)?, 1, 1),
        block: (to_u32(OP, kv.head_dim)?, 1, 1),
        shared_bytes: 0,
    };
    // SAFETY: `part` as written above; out (and the q8a buffers, when given) checked by
    // attention_q8a for one token of n_heads * head_dim.
    unsafe { k.launch(s, shape, &args) }
}

/// The launch of `name(x, out, a, n)`: two buffers of n f32 and a scalar.
fn scaled<D: KernelDevice>(
    dev: &D,
    s: &D::Stream,
    name: &str,
    x: &dyn DeviceBuffer,
    out: &dyn DeviceBuffer,
    a: f32,
    n: usize,
) -> BackendResult<()> {
    const OP: &str = "elementwise";
    need(OP, "x", x, n * 4)?;
    need(OP, "out", out, n * 4)?;
    if n == 0 {
        return Ok(());
    }
    let k = dev.kernel("elementwise.cu", name)?;
    let threads = 256usize;
    let shape = LaunchShape {
        grid: (to_u32(OP, n.div_ceil(threads).min(65_535))?, 1, 1),
        block: (threads as u32, 1, 1),
        shared_bytes: 0,
    };
    let args = [p(x), p(out), Arg::F32(a), Arg::I32(to_i32(OP, "n", n)?)];
    // SAFETY: two buffers of n f32 (checked); grid-stride loop covers any n.
    unsafe { k.launch(s, shape, &args) }
}

fn elementwise<D: KernelDevice>(
    dev: &D,
    s: &D::Stream,
    name: &str,
    a: &dyn DeviceBuffer,
    b: &dyn DeviceBuffer,
    out: &dyn DeviceBuffer,
    n: usize,
) -> BackendResult<()> {
    const OP: &str = "elementwise";
    need(OP, "a", a, n * 4)?;
    need(OP, "b", b, n * 4)?;
    need(OP, "out", out, n * 4)?;
    if n == 0 {
        return Ok(());
    }
    let k = dev.kernel("elementwise.cu", name)?;
    let threads = 256usize;
    let shape = LaunchShape {
        grid: (to_u32(OP, n.div_ceil(threads).min(65_535))?, 1, 1),
        block: (threads as u32, 1, 1),
        shared_bytes: 0,
    };
    let args = [p(a), p(b), p(out), Arg::I32(to_i32(OP, "n", n)?)];
    // SAFETY: three buffers of n f32 (checked); grid-stride loop covers any n.
    unsafe { k.launch(s, shape, &args) }
}
