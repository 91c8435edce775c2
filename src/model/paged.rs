//! The paged KV cache: one pool of fixed-size blocks that every sequence of a runtime draws
//! from, and the bookkeeping of who owns which block.
//!
//! A block holds `block_tokens` consecutive positions of one sequence in every layer and KV
//! head, laid out `[layer, kv_head, block_tokens, head_dim]`, so the rows of one head inside a
//! block are contiguous. A sequence's [`KvCache`](super::kv::KvCache) is a block table (the
//! pool's block ids in position order); attention gathers a head's rows through it. Memory for
//! KV is thus one budget shared by all sequences, taken block by block as they grow, instead
//! of a whole context reserved per sequence.
//!
//! [`BlockAllocator`] is the pure bookkeeping (free list and reference counts; a block shared
//! by several tables, as a prefix cache shares a prompt's blocks, returns to the free list
//! when its last user releases it); [`KvPool`] adds the storage: host memory for the CPU
//! computes, or none for a pool whose blocks live on a GPU ([`KvPool::external`]: the GPU
//! compute keeps the device buffer, this pool its bookkeeping, and hands over the block
//! copies a copy-on-write asks for, [`KvPool::take_copies`]).

use super::error::ModelError;
use super::hparams::HParams;
use super::kv::{KvBuf, KvType};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Positions per block when none is configured: small enough that a short sequence wastes
/// little, large enough that the gather copies rows in useful runs (vLLM's default too).
pub const DEFAULT_BLOCK_TOKENS: usize = 16;

/// Id of a block in its pool.
pub type BlockId = u32;

/// Free list and reference counts of a pool's blocks.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    /// Users of each block; 0 = free.
    refs: Vec<u32>,
    /// Free blocks, the next one to hand out last.
    free: Vec<BlockId>,
}

impl BlockAllocator {
    /// `n` free blocks (ids `0..n`, capped at `u32::MAX`).
    pub fn new(n: usize) -> Self {
        let n = n.min(BlockId::MAX as usize);
        Self {
            refs: vec![0; n],
            // Reversed so blocks go out in id order (neighbouring memory for a new sequence).
            free: (0..n as BlockId).rev().collect(),
        }
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    pub fn free(&self) -> usize {
        self.free.len()
    }

    pub fn used(&self) -> usize {
        self.total() - self.free()
    }

    /// A free block with one user, or `None` when the pool is exhausted.
    pub fn alloc(&mut self) -> Option<BlockId> {
        let b = self.free.pop()?;
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// `n` blocks, all or none.
    pub fn alloc_n(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free() {
            return None;
        }
        (0..n).map(|_| self.alloc()).collect()
    }

    /// One more user of an allocated block (a table that shares it). `false`: `b` is not
    /// allocated (nothing changes).
    pub fn share(&mut self, b: BlockId) -> bool {
        match self.refs.get_mut(b as usize) {
            Some(r) if *r > 0 => {
                *r += 1;
                true
            }
            _ => false,
        }
    }

    /// One user fewer; the block is free again when it was the last. Returns whether it was
    /// freed. Releasing a free or unknown block changes nothing (and returns `false`).
    pub fn release(&mut self, b: BlockId) -> bool {
        match self.refs.get_mut(b as usize) {
            Some(r) if *r > 0 => {
                *r -= 1;
                if *r == 0 {
                    self.free.push(b);
                    return true;
                }
                false
            }
            _ => false,
        }
    }

    /// Users of block `b` (0: free or unknown).
    pub fn refcount(&self, b: BlockId) -> u32 {
        self.refs.get(b as usize).copied().unwrap_or(0)
    }
}

/// Occupancy of a pool, for stats and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KvPoolStats {
    pub block_tokens: usize,
    pub blocks_total: usize,
    /// Blocks held by sequences (a cached block a sequence also uses counts here).
    pub blocks_used: usize,
    /// Blocks only the prefix cache holds (freed on demand when the pool runs short).
    #[serde(default)]
    pub blocks_cached: usize,
    /// Bytes of one block (keys and values of every layer).
    pub block_bytes: u64,
}

/// The blocks' storage and their allocator.
#[derive(Debug)]
pub struct KvPool {
    block_tokens: usize,
    n_layer: usize,
    n_head_kv: usize,
    dk: usize,
    dv: usize,
    ty: KvType,
    storage: Storage,
    alloc: BlockAllocator,
    /// The prefix cache: the chained hash of a full block's tokens (and every token before
    /// it) -> the block holding their keys and values; the cache holds one reference to each.
    prefix: HashMap<u64, BlockId>,
    /// Cached blocks by last use (a counter), for eviction of the least recently used.
    prefix_used: HashMap<BlockId, (u64, u64)>,
    clock: u64,
}

/// Where a pool's blocks are.
#[derive(Debug)]
enum Storage {
    /// In host memory (the CPU computes).
    Host { k: KvBuf, v: KvBuf },
    /// Elsewhere (a GPU's pool): blocks of `block_bytes`, and the block copies (source,
    /// destination) asked for and not yet taken by the owner of the storage.
    External {
        block_bytes: u64,
        copies: Vec<(BlockId, BlockId)>,
    },
}

/// Where a row lives in a pool's blocks: `[block, layer, kv_head, block_tokens]` rows.
#[derive(Clone, Copy)]
struct RowLayout {
    n_layer: usize,
    n_head_kv: usize,
    block_tokens: usize,
}

impl RowLayout {
    /// Row index (in head-dim units) of position `slot` of `(layer, head)` inside block `b`.
    fn row(self, b: BlockId, layer: usize, head: usize, slot: usize) -> usize {
        ((b as usize * self.n_layer + layer) * self.n_head_kv + head) * self.block_tokens + slot
    }
}

/// Chained hashes of the full blocks of `tokens`: entry `i` identifies tokens
/// `0 .. (i + 1) * block_tokens`, so equal hashes mean equal prefixes (up to hash collisions of
/// 64 bits).
pub fn prefix_hashes(tokens: &[u32], block_tokens: usize) -> Vec<u64> {
    use std::hash::{Hash, Hasher};
    let mut prev = 0u64;
    tokens
        .chunks_exact(block_tokens.max(1))
        .map(|block| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            prev.hash(&mut h);
            block.hash(&mut h);
            prev = h.finish();
            prev
        })
        .collect()
}

/// A pool shared by the sequences drawing from it.
pub type SharedKvPool = Arc<Mutex<KvPool>>;

/// Bytes of one block of `block_tokens` positions (keys and values, every layer and head).
pub fn block_bytes(hp: &HParams, ty: KvType, block_tokens: usize) -> u128 {
    let el: u128 = match ty {
        KvType::F32 => 4,
        KvType::F16 => 2,
    };
    hp.n_layer as u128
        * hp.n_head_kv as u128
        * (hp.head_dim as u128 + hp.head_dim_v as u128)
        * el
        * block_tokens as u128
}

impl KvPool {
    /// `n_blocks` zeroed blocks of `block_tokens` positions for `hp`'s model. The storage comes
    /// from a zeroed allocation, so blocks never written stay out of resident memory.
    pub fn new(
        hp: &HParams,
        ty: KvType,
        block_tokens: usize,
        n_blocks: usize,
    ) -> Result<Self, ModelError> {
        let block_tokens = block_tokens.max(1);
        let elems = |dim: usize| {
            [hp.n_layer, hp.n_head_kv, block_tokens, dim]
                .iter()
                .try_fold(n_blocks, |a, &b| a.checked_mul(b))
                .ok_or(ModelError::Alloc {
                    what: "KV pool",
                    bytes: block_bytes(hp, ty, block_tokens) * n_blocks as u128,
                })
        };
        Ok(Self {
            block_tokens,
            n_layer: hp.n_layer,
            n_head_kv: hp.n_head_kv,
            dk: hp.head_dim,
            dv: hp.head_dim_v,
            ty,
            storage: Storage::Host {
                k: KvBuf::new(ty, elems(hp.head_dim)?)?,
                v: KvBuf::new(ty, elems(hp.head_dim_v)?)?,
            },
            alloc: BlockAllocator::new(n_blocks),
            prefix: HashMap::new(),
            prefix_used: HashMap::new(),
            clock: 0,
        })
    }

    /// The bookkeeping of `n_blocks` blocks of `block_tokens` positions whose storage lives
    /// elsewhere (a GPU's pool, `block_bytes` a block, laid out as its kernels read it): the
    /// allocator and the prefix cache as for a host pool, no rows here. A copy-on-write's block
    /// copies wait in [`Self::take_copies`] for the storage's owner to make (before anything
    /// writes the copies' destinations).
    pub fn external(
        hp: &HParams,
        ty: KvType,
        block_tokens: usize,
        n_blocks: usize,
        block_bytes: u64,
    ) -> Self {
        Self {
            block_tokens: block_tokens.max(1),
            n_layer: hp.n_layer,
            n_head_kv: hp.n_head_kv,
            dk: hp.head_dim,
            dv: hp.head_dim_v,
            ty,
            storage: Storage::External {
                block_bytes,
                copies: Vec::new(),
            },
            alloc: BlockAllocator::new(n_blocks),
            prefix: HashMap::new(),
            prefix_used: HashMap::new(),
            clock: 0,
        }
    }

    /// Whether the blocks' rows are in this pool (host memory), not in an external store.
    pub fn is_host(&self) -> bool {
        matches!(self.storage, Storage::Host { .. })
    }

    /// The block copies (source, destination) an external pool's owner has still to make,
    /// in order; empty for a host pool (it copies at once).
    pub fn take_copies(&mut self) -> Vec<(BlockId, BlockId)> {
        match &mut self.storage {
            Storage::Host { .. } => Vec::new(),
            Storage::External { copies, .. } => std::mem::take(copies),
        }
    }

    /// As many blocks as `bytes` holds (at least one).
    pub fn with_budget(
        hp: &HParams,
        ty: KvType,
        block_tokens: usize,
        bytes: u64,
    ) -> Result<Self, ModelError> {
        let per = block_bytes(hp, ty, block_tokens.max(1)).max(1);
        let n = (bytes as u128 / per).clamp(1, BlockId::MAX as u128) as usize;
        Self::new(hp, ty, block_tokens, n)
    }

    pub fn shared(self) -> SharedKvPool {
        Arc::new(Mutex::new(self))
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    pub fn kv_type(&self) -> KvType {
        self.ty
    }

    pub fn allocator(&self) -> &BlockAllocator {
        &self.alloc
    }

    pub(crate) fn allocator_mut(&mut self) -> &mut BlockAllocator {
        &mut self.alloc
    }

    pub fn stats(&self) -> KvPoolStats {
        let cached_only = self
            .prefix_used
            .keys()
            .filter(|&&b| self.alloc.refcount(b) == 1)
            .count();
        KvPoolStats {
            block_tokens: self.block_tokens,
            blocks_total: self.alloc.total(),
            blocks_used: self.alloc.used() - cached_only,
            blocks_cached: cached_only,
            block_bytes: match &self.storage {
                Storage::Host { k, v } => {
                    ((k.bytes() + v.bytes()) / self.alloc.total().max(1)) as u64
                }
                Storage::External { block_bytes, .. } => *block_bytes,
            },
        }
    }

    /// The cached blocks of the longest cached prefix among `hashes` (see [`prefix_hashes`]),
    /// each with one more user (the caller's table).
    pub fn prefix_lookup(&mut self, hashes: &[u64]) -> Vec<BlockId> {
        let mut found = Vec::new();
        for h in hashes {
            let Some(&b) = self.prefix.get(h) else { break };
            if !self.alloc.share(b) {
                break;
            }
            self.clock += 1;
            if let Some(u) = self.prefix_used.get_mut(&b) {
                u.0 = self.clock;
            }
            found.push(b);
        }
        found
    }

    /// Caches `block` as the one holding the prefix `hash` (the cache takes a reference);
    /// nothing changes when that prefix or that block is cached already.
    pub fn prefix_insert(&mut self, hash: u64, block: BlockId) {
        if self.prefix.contains_key(&hash) || self.prefix_used.contains_key(&block) {
            return;
        }
        if self.alloc.share(block) {
            self.clock += 1;
            self.prefix.insert(hash, block);
            self.prefix_used.insert(block, (self.clock, hash));
        }
    }

    /// Whether `block` is in the prefix cache.
    pub fn is_cached(&self, block: BlockId) -> bool {
        self.prefix_used.contains_key(&block)
    }

    /// Frees cached blocks no sequence uses, least recently used first, until `need` blocks
    /// are free (or none is left to free); returns how many it freed.
    pub fn prefix_evict(&mut self, need: usize) -> usize {
        let mut idle: Vec<(u64, BlockId, u64)> = self
            .prefix_used
            .iter()
            .filter(|(&b, _)| self.alloc.refcount(b) == 1)
            .map(|(&b, &(used, hash))| (used, b, hash))
            .collect();
        idle.sort_unstable();
        let mut freed = 0;
        for (_, b, hash) in idle {
            if self.alloc.free() >= need {
                break;
            }
            self.prefix.remove(&hash);
            self.prefix_used.remove(&b);
            if self.alloc.release(b) {
                freed += 1;
            }
        }
        freed
    }

    /// Copies every layer's and head's rows of block `src` into block `dst` (an external
    /// pool queues the copy for its owner, [`Self::take_copies`]).
    pub(crate) fn copy_block(&mut self, src: BlockId, dst: BlockId) {
        let (g, bt, dk, dv) = (self.rows(), self.block_tokens, self.dk, self.dv);
        match &mut self.storage {
            Storage::Host { k, v } => {
                for l in 0..self.n_layer {
                    for h in 0..self.n_head_kv {
                        let (a, b) = (g.row(src, l, h, 0), g.row(dst, l, h, 0));
                        k.copy_within(a * dk, b * dk, bt * dk);
                        v.copy_within(a * dv, b * dv, bt * dv);
                    }
                }
            }
            Storage::External { copies, .. } => copies.push((src, dst)),
        }
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_tokens)
    }

    /// Row index (in head-dim units) of position `slot` of `(layer, head)` inside block `b`.
    fn row(&self, b: BlockId, layer: usize, head: usize, slot: usize) -> usize {
        self.rows().row(b, layer, head, slot)
    }

    /// The block layout's row arithmetic, by value (usable while the storage is borrowed).
    fn rows(&self) -> RowLayout {
        RowLayout {
            n_layer: self.n_layer,
            n_head_kv: self.n_head_kv,
            block_tokens: self.block_tokens,
        }
    }

    /// Stores positions `pos0..` of `layer` for the sequence whose blocks are `table`: `k` is
    /// `[n, n_head_kv, dk]`, `v` is `[n, n_head_kv, dv]`. The table must cover them; a pool
    /// without host rows ([`Self::external`]) refuses.
    pub(crate) fn write(
        &mut self,
        table: &[BlockId],
        layer: usize,
        pos0: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), ModelError> {
        let (g, bt, dk, dv) = (self.rows(), self.block_tokens, self.dk, self.dv);
        let n_head_kv = self.n_head_kv;
        let Storage::Host { k: kb, v: vb } = &mut self.storage else {
            return Err(ModelError::KvPoolOnDevice);
        };
        let (kd, vd) = (n_head_kv * dk, n_head_kv * dv);
        for (i, (kr, vr)) in k.chunks_exact(kd).zip(v.chunks_exact(vd)).enumerate() {
            let p = pos0 + i;
            let b = table[p / bt];
            for h in 0..n_head_kv {
                let r = g.row(b, layer, h, p % bt);
                kb.write(r * dk, &kr[h * dk..(h + 1) * dk]);
                vb.write(r * dv, &vr[h * dv..(h + 1) * dv]);
            }
        }
        Ok(())
    }

    /// The first `len` key and value rows of one head (`[len, dk]`, `[len, dv]`), gathered
    /// through `table` into `kb` and `vb` (converted from f16 where the pool is f16).
    pub(crate) fn gather<'b>(
        &self,
        table: &[BlockId],
        layer: usize,
        head: usize,
        len: usize,
        kb: &'b mut Vec<f32>,
        vb: &'b mut Vec<f32>,
    ) -> (&'b [f32], &'b [f32]) {
        kb.resize(len * self.dk, 0.0);
        vb.resize(len * self.dv, 0.0);
        let bt = self.block_tokens;
        // An external pool has no rows here (its compute reads them on its device).
        let Storage::Host { k, v } = &self.storage else {
            return (&kb[..], &vb[..]);
        };
        for (i, &b) in table.iter().take(len.div_ceil(bt)).enumerate() {
            let n = bt.min(len - i * bt);
            let r = self.row(b, layer, head, 0);
            k.read(
                r * self.dk,
                &mut kb[i * bt * self.dk..(i * bt + n) * self.dk],
            );
            v.read(
                r * self.dv,
                &mut vb[i * bt * self.dv..(i * bt + n) * self.dv],
            );
        }
        (&kb[..], &vb[..])
    }
}

/// Locks a pool; a panic elsewhere while it was held leaves block contents possibly half
/// written but the bookkeeping consistent (every mutation of it is a single step).
pub fn lock(pool: &SharedKvPool) -> MutexGuard<'_, KvPool> {
    pool.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    enum Op {
        /// A new sequence taking `n` blocks.
        Start(usize),
        /// A new sequence sharing the first `n` blocks of sequence `of` (a prefix hit), plus
        /// `more` of its own.
        Fork { of: usize, n: usize, more: usize },
        /// Sequence `i` grows by one block.
        Grow(usize),
        /// Sequence `i` ends (or is cancelled): releases its blocks.
        End(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..5).prop_map(Op::Start),
            (0usize..8, 0usize..5, 0usize..3).prop_map(|(of, n, more)| Op::Fork { of, n, more }),
            (0usize..8).prop_map(Op::Grow),
            (0usize..8).prop_map(Op::End),
        ]
    }

    /// Every allocated block's refcount equals the number of live tables holding it, no free
    /// block is held, free + used = total.
    fn check(a: &BlockAllocator, tables: &[Option<Vec<BlockId>>]) {
        let mut holders: HashMap<BlockId, u32> = HashMap::new();
        for t in tables.iter().flatten() {
            let mut seen = std::collections::HashSet::new();
            for &b in t {
                assert!(seen.insert(b), "block {b} twice in one table");
                *holders.entry(b).or_default() += 1;
            }
        }
        for b in 0..a.total() as BlockId {
            assert_eq!(
                a.refcount(b),
                holders.get(&b).copied().unwrap_or(0),
                "block {b}"
            );
        }
        let mut free = a.free.clone();
        free.sort_unstable();
        free.dedup();
        assert_eq!(free.len(), a.free(), "a block twice on the free list");
        assert!(a.free.iter().all(|&b| a.refcount(b) == 0));
        assert_eq!(a.free() + a.used(), a.total());
    }

    /// A GPU pool's bookkeeping: sequences share a cached prefix as on the host; a rewind
    /// into a shared block allocates a fresh one and queues the copy (source, destination)
    /// for the device instead of copying rows; host rows are refused; stats report the
    /// device's block size.
    #[test]
    fn an_external_pool_shares_prefixes_and_queues_its_copies() {
        use crate::model::kv::KvCache;
        let md = crate::model::hparams::tests::md("llama");
        let hp = HParams::try_from(&md).expect("tiny hparams");
        let pool = KvPool::external(&hp, KvType::F16, 4, 8, 4096).shared();
        let prompt: Vec<u32> = (0..10).collect();
        let mut a = KvCache::in_pool(pool.clone(), 64);
        a.reserve(10).expect("room");
        assert_eq!(a.blocks().len(), 3);
        a.publish_prefix(&prompt[..8]);
        let mut b = KvCache::in_pool(pool.clone(), 64);
        assert_eq!(b.adopt_prefix(&prompt), 8, "two whole cached blocks");
        assert_eq!(b.blocks(), &a.blocks()[..2]);
        assert!(
            lock(&pool).take_copies().is_empty(),
            "sharing copies nothing"
        );
        // B rewinds to position 6, inside its second (shared) block: copy-on-write.
        let shared = b.blocks()[1];
        assert_eq!(b.own_from(6), 6);
        let fresh = b.blocks()[1];
        assert_ne!(fresh, shared);
        assert_eq!(lock(&pool).take_copies(), vec![(shared, fresh)]);
        assert!(lock(&pool).take_copies().is_empty(), "taken once");
        let k = vec![0f32; hp.n_head_kv * hp.head_dim];
        let v = vec![0f32; hp.n_head_kv * hp.head_dim_v];
        assert!(matches!(
            b.store(0, 6, &k, &v, 1),
            Err(ModelError::KvPoolOnDevice)
        ));
        let st = lock(&pool).stats();
        assert_eq!(
            (st.block_bytes, st.blocks_total, st.block_tokens),
            (4096, 8, 4)
        );
        drop((a, b));
        let st = lock(&pool).stats();
        assert_eq!(st.blocks_used, 0, "{st:?}");
        assert_eq!(
            st.blocks_cached, 2,
            "the prefix cache keeps its blocks: {st:?}"
        );
    }

    proptest! {
        #[test]
        fn no_block_owned_twice_and_all_freed_at_the_end(
            total in 0usize..24,
            ops in proptest::collection::vec(op(), 0..64),
        ) {
            let mut a = BlockAllocator::new(total);
            // A "sequence" is a table of blocks; a forked one shares its parent's prefix.
            let mut tables: Vec<Option<Vec<BlockId>>> = Vec::new();
            for op in ops {
                match op {
                    Op::Start(n) => {
                        if let Some(t) = a.alloc_n(n) {
                            tables.push(Some(t));
                        } else {
                            prop_assert!(n > a.free());
                        }
                    }
                    Op::Fork { of, n, more } => {
                        let Some(Some(parent)) = tables.get(of) else { continue };
                        let mut t: Vec<BlockId> = parent.iter().take(n).copied().collect();
                        if let Some(own) = a.alloc_n(more) {
                            for &b in &t {
                                prop_assert!(a.share(b));
                            }
                            t.extend(own);
                            tables.push(Some(t));
                        }
                    }
                    Op::Grow(i) => {
                        if let Some(Some(t)) = tables.get_mut(i) {
                            if let Some(b) = a.alloc() {
                                prop_assert_eq!(a.refcount(b), 1);
                                t.push(b);
                            }
                        }
                    }
                    Op::End(i) => {
                        if let Some(slot) = tables.get_mut(i) {
                            if let Some(t) = slot.take() {
                                for b in t {
                                    let others = a.refcount(b) - 1;
                                    // Freed exactly when this was the last user.
                                    prop_assert_eq!(a.release(b), others == 0);
                                }
                            }
                        }
                    }
                }
                check(&a, &tables);
            }
            // Every sequence ends: every block is free again.
            for t in tables.into_iter().flatten() {
                for b in t {
                    a.release(b);
                }
            }
            prop_assert_eq!(a.free(), total);
            prop_assert_eq!(a.used(), 0);
        }
    }

    #[test]
    fn releasing_a_free_or_unknown_block_changes_nothing() {
        let mut a = BlockAllocator::new(2);
        let b = a.alloc().unwrap();
        assert!(a.release(b));
        assert!(!a.release(b));
        assert!(!a.release(99));
        assert!(!a.share(b));
        assert_eq!(a.free(), 2);
    }
}
