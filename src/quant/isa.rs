//! [`CpuIsa`]: which instruction sets the CPU's quantized matrix kernels may use, a tuning knob
//! (`RuntimeBuilder::cpu_isa`; the CLI takes it from `ROCMFORGE_CPU_ISA`).
//!
//! Process-wide, like the CPU it describes: the kernels are chosen per call deep inside
//! `matvec`/`matmul`, far from any configuration object, so the choice is one atomic that caps
//! what the hardware offers, read at each kernel choice (one relaxed load per weight matrix
//! product). The default, [`CpuIsa::Best`], is what the CPU has.

use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

/// The most a kernel choice may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CpuIsa {
    /// The best the CPU has: AMX-INT8 (with AVX-512) for the batched Q4_0/Q4_1/Q8_0
    /// products, AVX-512 VNNI, else AVX2, else the portable kernels.
    #[default]
    Best,
    /// At most AVX-512 VNNI: skips the AMX tile products (to compare the two).
    Vnni,
    /// At most AVX2: skips the VNNI kernels (to compare the two paths, or to run the AVX2
    /// path's tests on a VNNI machine).
    Avx2,
}

impl FromStr for CpuIsa {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "best" | "auto" | "" => Ok(Self::Best),
            "avx2" => Ok(Self::Avx2),
            "vnni" | "avx512-vnni" => Ok(Self::Vnni),
            other => Err(format!(
                "unknown CPU instruction set {other:?} (expected best, vnni or avx2)"
            )),
        }
    }
}

static CHOICE: AtomicU8 = AtomicU8::new(0);

/// Sets the cap for every kernel chosen from now on (in this process).
pub fn set_cpu_isa(isa: CpuIsa) {
    let v = match isa {
        CpuIsa::Best => 0,
        CpuIsa::Avx2 => 1,
        CpuIsa::Vnni => 2,
    };
    CHOICE.store(v, Ordering::Relaxed);
}

/// The cap in force.
pub fn cpu_isa() -> CpuIsa {
    match CHOICE.load(Ordering::Relaxed) {
        1 => CpuIsa::Avx2,
        2 => CpuIsa::Vnni,
        _ => CpuIsa::Best,
    }
}

/// The kernels the register-tiled Q4_0/Q4_1/Q8_0 products run with now, under the cap:
/// `"amx-int8+avx512-vnni"` (AMX for the batched products), `"avx512-vnni"`, `"avx2"` or
/// `"portable"` (for logs, benchmarks and tests).
pub fn tile_kernels() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        match super::simd_tile::Isa::detect() {
            Some(super::simd_tile::Isa::Vnni) if super::simd_tile::amx::enabled() => {
                "amx-int8+avx512-vnni"
            }
            Some(super::simd_tile::Isa::Vnni) => "avx512-vnni",
            Some(super::simd_tile::Isa::Avx2) => "avx2",
            None => "portable",
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        "portable"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!("avx2".parse::<CpuIsa>(), Ok(CpuIsa::Avx2));
        assert_eq!(" AVX2 ".parse::<CpuIsa>(), Ok(CpuIsa::Avx2));
        assert_eq!("best".parse::<CpuIsa>(), Ok(CpuIsa::Best));
        assert_eq!("".parse::<CpuIsa>(), Ok(CpuIsa::Best));
        assert_eq!("vnni".parse::<CpuIsa>(), Ok(CpuIsa::Vnni));
        assert_eq!("AVX512-VNNI".parse::<CpuIsa>(), Ok(CpuIsa::Vnni));
        assert!("avx512".parse::<CpuIsa>().is_err());
    }
}
