//! The prefill GEMM seam: `Y[n, rows] = X[n, k] · W[rows, k]^T` with f16 operands (weight tiles
//! dequantized by `dequant.cu`, activations converted on the device) and f32 results. The layer
//! pass calls a [`GemmF16`]; CUDA supplies cuBLAS (`cuda/blas.rs`), and [`PortableGemm`] (the
//! tiled kernel in `kernels/gemm.cu`) serves HIP and CUDA without cuBLAS.
//!
//! hipBLAS is deliberately not bound: its C ABI changed between ROCm 5 and ROCm 6/7 (types and
//! enum values of `hipblasGemmEx`), and no AMD GPU is available here to check a binding against,
//! so a guessed binding would be untestable undefined behaviour. The portable kernel is plain
//! CUDA/HIP C++ that the compile checks cover for sm_80/sm_90 and gfx90a/gfx1030.

use super::{Arg, DeviceKernel, KernelDevice, LaunchShape};
use crate::backend::error::{BackendError, BackendResult};
use crate::backend::DeviceBuffer;

/// The operands of one `gemm_f16_nt`: `y[t * ldy + r] = sum_j x16[t, j] * w16[r, j]` for
/// `t < n`, `r < rows` (row-major, f16 in, f32 out); `y` points at the first output column of
/// this weight tile, whose rows are `ldy` floats apart.
#[derive(Clone, Copy)]
pub struct GemmF16Nt<'a> {
    pub w16: &'a dyn DeviceBuffer,
    pub rows: usize,
    pub k: usize,
    pub x16: &'a dyn DeviceBuffer,
    pub n: usize,
    pub y: &'a dyn DeviceBuffer,
    pub ldy: usize,
}

impl GemmF16Nt<'_> {
    /// Every extent fits its buffer and every size fits the kernels' `int`.
    pub fn check(&self) -> BackendResult<()> {
        let bad = || BackendError::InvalidArgument {
            op: "gemm_f16_nt",
            what: format!(
                "rows {}, k {}, n {}, ldy {}: empty, too large or buffers too small",
                self.rows, self.k, self.n, self.ldy
            ),
        };
        if self.rows == 0 || self.k == 0 || self.n == 0 || self.ldy < self.rows {
            return Err(bad());
        }
        let w = self.rows.checked_mul(self.k).and_then(|e| e.checked_mul(2));
        let x = self.n.checked_mul(self.k).and_then(|e| e.checked_mul(2));
        let y = (self.n - 1)
            .checked_mul(self.ldy)
            .and_then(|e| e.checked_add(self.rows))
            .and_then(|e| e.checked_mul(4));
        let fits =
            |need: Option<usize>, b: &dyn DeviceBuffer| need.is_some_and(|n| n <= b.len_bytes());
        let ints = [self.rows, self.k, self.n, self.ldy]
            .iter()
            .all(|&v| i32::try_from(v).is_ok());
        if !fits(w, self.w16) || !fits(x, self.x16) || !fits(y, self.y) || !ints {
            return Err(bad());
        }
        Ok(())
    }
}

/// An f16 GEMM provider for the layer pass on device `D`.
pub trait GemmF16<D: KernelDevice>: Send {
    /// For reports (`"cuBLAS"`, `"portable gemm.cu"`).
    fn name(&self) -> &'static str;
    /// Queues `g` on `stream`.
    fn gemm_f16_nt(&mut self, dev: &D, stream: &D::Stream, g: &GemmF16Nt) -> BackendResult<()>;
    /// A hint that now is a good time to finish any lazy set-up (the layer pass calls it when
    /// the runtime is idle); the default does nothing.
    fn warm(&mut self) {}
}

/// Output tile of one block of `gemm.cu`: weight rows x tokens (RF_GEMM_BM x RF_GEMM_BN).
pub const GEMM_TILE: (usize, usize) = (64, 64);
/// Threads of one block of `gemm.cu` (16 x 16, each computing 4 x 4 outputs): a multiple of
/// both warp widths, with no warp-level code in the kernel.
pub const GEMM_BLOCK: (u32, u32) = (16, 16);
/// Most blocks in grid y (CUDA and HIP both cap y at 65535).
const GRID_Y_MAX: usize = 65_535;

/// The launch of `gemm.cu` for `rows` weight rows and `n` tokens: one block per 64 x 64 output
/// tile, rows along x (no practical limit), tokens along y.
pub fn gemm_launch_shape(rows: usize, n: usize) -> BackendResult<LaunchShape> {
    let (bm, bn) = GEMM_TILE;
    let gy = n.div_ceil(bn);
    let gx = u32::try_from(rows.div_ceil(bm)).ok();
    match gx {
        Some(gx) if gx > 0 && gy > 0 && gy <= GRID_Y_MAX => Ok(LaunchShape {
            grid: (gx, gy as u32, 1),
            block: (GEMM_BLOCK.0, GEMM_BLOCK.1, 1),
            shared_bytes: 0,
        }),
        _ => Err(BackendError::InvalidArgument {
            op: "gemm_f16_nt",
            what: format!("no launch for {rows} rows x {n} tokens"),
        }),
    }
}

/// The arguments of `gemm_f16_nt_f32` in its parameter order.
pub fn gemm_args(g: &GemmF16Nt) -> [Arg; 7] {
    // Sizes were checked to fit i32 by `GemmF16Nt::check`.
    let i = |v: usize| Arg::I32(v as i32);
    [
        Arg::Ptr(g.w16.device_ptr()),
        Arg::Ptr(g.x16.device_ptr()),
        Arg::Ptr(g.y.device_ptr()),
        i(g.rows),
        i(g.k),
        i(g.n),
        i(g.ldy),
    ]
}

/// The tiled f16 x f16 -> f32 kernel in `kernels/gemm.cu` (shared-memory tiles, f32
/// accumulation, no warp-width assumption): HIP's prefill GEMM, and CUDA's when cuBLAS is
/// absent or disabled.
#[derive(Debug, Clone, Copy, Default)]
pub struct PortableGemm;

/// The vendor GEMM being opened on its own thread.
type Opening<D> = std::thread::JoinHandle<std::result::Result<Box<dyn GemmF16<D>>, String>>;

/// The vendor's GEMM, opened late: loading cuBLAS takes ~0.15 s and, while it runs, the
/// driver holds back other threads' allocations and first copies (H100: the pipeline's uploader
/// and the KV cache's allocation waited 140 ms for it when it opened beside the load). So it
/// opens on a thread of its own only when [`GemmF16::warm`] is called (the layer pass does when
/// the runtime has no request to serve: after the first one, before a second arrives; opened
/// right after the first forward pass it held back that pass's logits copy 100 ms) or,
/// synchronously, at the first GEMM if that comes earlier (a long first prompt pays ~0.15 s once). Decode never needs it. Falls back to
/// [`PortableGemm`] when the vendor library does not open.
pub struct DeferredGemm<D: KernelDevice> {
    dev: std::sync::Arc<D>,
    opening: Option<Opening<D>>,
    engine: Option<Box<dyn GemmF16<D>>>,
}

impl<D: KernelDevice> DeferredGemm<D> {
    /// Nothing is opened yet.
    pub fn new(dev: std::sync::Arc<D>) -> Self {
        Self {
            dev,
            opening: None,
            engine: None,
        }
    }

    /// The engine: joins the opening thread, or opens it here when none was started.
    fn engine(&mut self) -> &mut dyn GemmF16<D> {
        let (dev, opening) = (&self.dev, &mut self.opening);
        self.engine
            .get_or_insert_with(|| {
                let opened = match opening.take() {
                    Some(h) => h
                        .join()
                        .unwrap_or_else(|_| Err("the thread opening it panicked".into())),
                    None => tracing::info_span!("gemm_open").in_scope(|| dev.vendor_gemm()),
                };
                opened.unwrap_or_else(|why| {
                    tracing::info!(%why, vendor = D::VENDOR, "prefill uses the portable GEMM kernel");
                    Box::new(PortableGemm)
                })
            })
            .as_mut()
    }
}

impl<D: KernelDevice> GemmF16<D> for DeferredGemm<D> {
    fn name(&self) -> &'static str {
        match &self.engine {
            Some(e) => e.name(),
            None => "vendor GEMM (not used yet)",
        }
    }

    fn gemm_f16_nt(&mut self, dev: &D, stream: &D::Stream, g: &GemmF16Nt) -> BackendResult<()> {
        self.engine().gemm_f16_nt(dev, stream, g)
    }

    fn warm(&mut self) {
        if self.engine.is_some() || self.opening.is_some() {
            return;
        }
        let dev = std::sync::Arc::clone(&self.dev);
        self.opening = std::thread::Builder::new()
            .name("rf-gemm-open".into())
            .spawn(move || tracing::info_span!("gemm_open").in_scope(|| dev.vendor_gemm()))
            .map_err(|e| tracing::info!(error = %e, "no thread to open the vendor GEMM on"))
            .ok();
    }
}

impl<D: KernelDevice> GemmF16<D> for PortableGemm {
    fn name(&self) -> &'static str {
        "portable gemm.cu"
    }

    fn gemm_f16_nt(&mut self, dev: &D, stream: &D::Stream, g: &GemmF16Nt) -> BackendResult<()> {
        g.check()?;
        let shape = gemm_launch_shape(g.rows, g.n)?;
        let k = dev.kernel("gemm.cu", "gemm_f16_nt_f32")?;
        let args = gemm_args(g);
        // SAFETY: `check` proved w16 holds rows x k, x16 n x k f16 and y (n - 1) * ldy + rows
        // f32; the kernel bounds every access by rows, k and n; the arguments follow
        // gemm_f16_nt_f32's parameter list.
        unsafe { k.launch(stream, shape, &args) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::buffer::Fake;
    use crate::backend::DeviceBuffer;

    fn buf(len: usize) -> Fake {
        Fake(4096, len)
    }

    #[test]
    fn tiles_cover_odd_shapes_and_refuse_empty_ones() {
        let s = gemm_launch_shape(65, 1).expect("shape");
        assert_eq!(s.grid, (2, 1, 1));
        assert_eq!(s.block, (16, 16, 1));
        let s = gemm_launch_shape(4096, 129).expect("shape");
        assert_eq!(s.grid, (64, 3, 1));
        // 16 x 16 threads of 4 x 4 outputs cover exactly one 64 x 64 tile.
        assert_eq!(
            (GEMM_BLOCK.0 as usize * 4, GEMM_BLOCK.1 as usize * 4),
            GEMM_TILE
        );
        assert_eq!((GEMM_BLOCK.0 * GEMM_BLOCK.1) % 64, 0);
        assert!(gemm_launch_shape(0, 5).is_err());
        assert!(gemm_launch_shape(5, 0).is_err());
        assert!(gemm_launch_shape(5, 64 * 65_536).is_err());
    }

    #[test]
    fn operands_are_checked_against_their_buffers() {
        let (rows, k, n, ldy) = (3, 5, 2, 7);
        let (w, x, y) = (
            buf(rows * k * 2),
            buf(n * k * 2),
            buf(((n - 1) * ldy + rows) * 4),
        );
        let g = GemmF16Nt {
            w16: &w,
            rows,
            k,
            x16: &x,
            n,
            y: &y,
            ldy,
        };
        g.check().expect("exact sizes fit");
        let short = buf(y.len_bytes() - 1);
        assert!(GemmF16Nt { y: &short, ..g }.check().is_err());
        let short = buf(w.len_bytes() - 2);
        assert!(GemmF16Nt { w16: &short, ..g }.check().is_err());
        assert!(GemmF16Nt { n: 0, ..g }.check().is_err());
        assert!(GemmF16Nt { ldy: rows - 1, ..g }.check().is_err());
        let args = gemm_args(&g);
        assert_eq!(args[0], Arg::Ptr(4096));
        assert_eq!(
            &args[3..],
            &[Arg::I32(3), Arg::I32(5), Arg::I32(2), Arg::I32(7)]
        );
    }
}
