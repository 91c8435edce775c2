//! cuBLAS for prefill: `Y[n, rows] = X[n, k] · W[rows, k]^T` with f16 operands (weight tiles
//! dequantized by `dequant.cu`, activations converted on the device) and f32 results: CUDA's
//! [`GemmF16`]. cuBLAS is optional: without the library, or with `LayeredOptions::use_blas`
//! off (`RuntimeBuilder::vendor_gemm(false)`; the CLI's `ROCMFORGE_NO_CUBLAS=1`), the forward
//! passes use the portable kernel (`backend::gpu::PortableGemm`, `kernels/gemm.cu`).

use super::driver::Stream;
use super::CudaDevice;
use crate::backend::error::{BackendError, BackendResult};
use crate::backend::gpu::{GemmF16, GemmF16Nt};
use cudarc::cublas::{result, sys};

pub struct Blas {
    handle: sys::cublasHandle_t,
    /// The stream the handle's work goes to (`cublasSetStream`), as an address.
    stream: usize,
}

// SAFETY: a cuBLAS handle may be used from any thread as long as calls are not concurrent;
// `Blas` is only used through `&mut` or by one owner at a time.
unsafe impl Send for Blas {}

fn err(op: &'static str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Driver {
        backend: "cuBLAS",
        op,
        reason: e.to_string(),
    }
}

impl Blas {
    /// A handle bound to `stream`, or `None` when libcublas cannot be loaded (with the reason).
    pub fn open(stream: &Stream) -> Result<Self, String> {
        let mut me = Self::create()?;
        me.set_stream(stream)?;
        Ok(me)
    }

    /// A handle on the default stream; the calling thread must have the context current.
    /// Split from [`Blas::open`] so that the model load can create it on another thread (it
    /// loads libcublas/libcublasLt: ~0.1 s warm, more from a cold disk) and bind the stream
    /// when it joins.
    pub fn create() -> Result<Self, String> {
        // SAFETY: only probes whether the library loads (cudarc panics on use otherwise).
        if !unsafe { sys::is_culib_present() } {
            return Err("libcublas.so not found".into());
        }
        let handle = result::create_handle().map_err(|e| format!("cublasCreate: {e}"))?;
        Ok(Self { handle, stream: 0 })
    }

    /// Runs this handle's work on `stream` from now on.
    pub fn set_stream(&mut self, stream: &Stream) -> Result<(), String> {
        // SAFETY: the handle is alive; the stream is alive for the handle's use (the owner
        // keeps both and drops the handle first).
        unsafe { result::set_stream(self.handle, stream.raw() as sys::cudaStream_t) }
            .map_err(|e| format!("cublasSetStream: {e}"))?;
        self.stream = stream.raw() as usize;
        Ok(())
    }
}

impl GemmF16<CudaDevice> for Blas {
    fn name(&self) -> &'static str {
        "cuBLAS"
    }

    /// `y[t * ldy + r] = sum_k x16[t, k] * w16[r, k]` (see [`GemmF16Nt`]) on `stream`.
    fn gemm_f16_nt(
        &mut self,
        _dev: &CudaDevice,
        stream: &Stream,
        g: &GemmF16Nt,
    ) -> BackendResult<()> {
        g.check()?;
        if self.stream != stream.raw() as usize {
            self.set_stream(stream)
                .map_err(|e| err("cublasSetStream", e))?;
        }
        let GemmF16Nt {
            w16,
            rows,
            k,
            x16,
            n,
            y,
            ldy,
        } = *g;
        let i = |v: usize| {
            i32::try_from(v).map_err(|_| BackendError::InvalidArgument {
                op: "gemm_f16_nt",
                what: format!("{v} exceeds i32"),
            })
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Column-major view: C[rows, n] = op(A)[rows, k] · B[k, n] with A = W stored as a
        // [k, rows] column-major matrix (transposed), B = X as [k, n], C = Y with ld = ldy.
        // SAFETY: every pointer is a live device allocation holding the extents checked above;
        // alpha/beta are host scalars (default pointer mode).
        unsafe {
            result::gemm_ex(
                self.handle,
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                i(rows)?,
                i(n)?,
                i(k)?,
                (&alpha as *const f32).cast(),
                w16.device_ptr() as *const _,
                sys::cudaDataType::CUDA_R_16F,
                i(k)?,
                x16.device_ptr() as *const _,
                sys::cudaDataType::CUDA_R_16F,
                i(k)?,
                (&beta as *const f32).cast(),
                y.device_ptr() as *mut _,
                sys::cudaDataType::CUDA_R_32F,
                i(ldy)?,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| err("cublasGemmEx", e))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle is alive and no call is in flight on the host.
        if let Err(e) = unsafe { result::destroy_handle(self.handle) } {
            tracing::warn!(error = %e, "cublasDestroy failed");
        }
    }
}
