// vendor.cuh — the few differences between CUDA (NVRTC) and HIP (hipRTC / hipcc).
//
// Every kernel includes this (through common.cuh) and uses only the names defined here for
// anything vendor-specific: the warp/wavefront width, shuffles, and half <-> float conversion.
// No system header is included for CUDA: NVRTC from the PyPI wheels ships none. hipRTC provides
// the HIP built-ins implicitly; only hipcc needs <hip/hip_runtime.h> (see below).
#pragma once

#if defined(__HIPCC__) || defined(__HIPCC_RTC__) || defined(__HIP_DEVICE_COMPILE__) || defined(__HIP_PLATFORM_AMD__)
#define RF_HIP 1
#else
#define RF_CUDA 1
#endif

// Fixed-width integers without <stdint.h>.
typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef short i16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef long long i64;

// Half-precision values are carried as their raw 16 bits (`rf_half`), so the block structs have
// the same size and alignment on both vendors and on the host, and no fp16 header is needed.
typedef u16 rf_half;

#if defined(RF_CUDA)
// Warp width. NVIDIA warps are always 32 lanes.
#define RF_WARP 32
#define RF_FULL_MASK 0xffffffffu

__device__ __forceinline__ float rf_h2f(rf_half h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ rf_half rf_f2h(float f) {
    rf_half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float rf_shfl_xor(float v, int mask) {
    return __shfl_xor_sync(RF_FULL_MASK, v, mask, RF_WARP);
}
__device__ __forceinline__ int rf_shfl_xor_int(int v, int mask) {
    return __shfl_xor_sync(RF_FULL_MASK, v, mask, RF_WARP);
}
// Orders the shared-memory accesses of one warp's lanes (they may diverge since Volta).
__device__ __forceinline__ void rf_syncwarp() { __syncwarp(); }
#else
// hipRTC includes the HIP device runtime implicitly (and defines __HIPCC_RTC__); hipcc, used
// for ahead-of-time code objects (scripts/hip-compile-kernels.sh), does not, so include it here.
#if !defined(__HIPCC_RTC__)
#include <hip/hip_runtime.h>
#endif
// Wavefront width: 64 on CDNA (gfx9xx), 32 on RDNA in wave32 mode. The compiler defines it
// per target, so one source serves both.
#if defined(__AMDGCN_WAVEFRONT_SIZE)
#define RF_WARP __AMDGCN_WAVEFRONT_SIZE
#else
#define RF_WARP 64
#endif

__device__ __forceinline__ float rf_h2f(rf_half h) {
    return (float)__builtin_bit_cast(_Float16, h);
}
__device__ __forceinline__ rf_half rf_f2h(float f) {
    return __builtin_bit_cast(rf_half, (_Float16)f);
}
__device__ __forceinline__ float rf_shfl_xor(float v, int mask) {
    return __shfl_xor(v, mask, RF_WARP);
}
__device__ __forceinline__ int rf_shfl_xor_int(int v, int mask) {
    return __shfl_xor(v, mask, RF_WARP);
}
// A wavefront runs in lockstep; only the compiler must not move LDS accesses across this.
__device__ __forceinline__ void rf_syncwarp() {
    __builtin_amdgcn_fence(__ATOMIC_RELEASE, "wavefront");
    __builtin_amdgcn_wave_barrier();
    __builtin_amdgcn_fence(__ATOMIC_ACQUIRE, "wavefront");
}
#endif

// Programmatic dependent launch (CUDA, sm_90 and later). A product launched with it
// (`DeviceKernel::launch_early`) may start while the stream's previous kernel finishes: it
// issues its weight loads (never written by a kernel), then rf_grid_wait() blocks until the
// previous kernel has completed and its writes are visible, before it reads the activations
// or writes its output. rf_grid_launch_dependents() in the kernels before products lets that
// start happen as soon as all of their blocks are running. Launched without the attribute,
// or on HIP and older GPUs, both do nothing.
__device__ __forceinline__ void rf_grid_wait() {
#if defined(RF_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void rf_grid_launch_dependents() {
#if defined(RF_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

#define RF_INF __int_as_float(0x7f800000)
