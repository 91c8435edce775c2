//! [`HipDevice`]: one AMD GPU, its arch and wavefront width, and the kernel modules compiled for
//! it. Layering as in `cuda/`: `hip_runtime_sys` (raw FFI) -> `check` (a `Result` per call) ->
//! RAII types whose `Drop` frees.
//!
//! HIP has no explicit context objects: the runtime keeps a current device per host thread.
//! Every type that touches the device stores its ordinal and calls [`bind`] (`hipSetDevice`,
//! a thread-local store) before a call that depends on the current device.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, CStr};
use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use hip_runtime_sys as sys;

use super::driver::{DeviceBuf, Event, HipDriver, Kernel, Module, PinnedBuf, Stream};
use crate::backend::buffer::Pod;
use crate::backend::compile_cache::{CacheHit, KernelCache};
use crate::backend::error::{BackendError, BackendResult};
use crate::backend::ComputeDevice;

/// The runtime's name and description of an error code.
pub(crate) fn err_text(e: sys::hipError_t) -> String {
    // SAFETY: hipGetErrorName/hipGetErrorString return static NUL-terminated strings (or NULL)
    // for any code.
    let (n, s) = unsafe { (sys::hipGetErrorName(e), sys::hipGetErrorString(e)) };
    let read = |p: *const c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: non-null, static and NUL-terminated (see above).
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let (n, s) = (read(n), read(s));
    // ROCm 5.x returns the name as the description for many codes; say it once.
    if s.is_empty() || s == n {
        n
    } else {
        format!("{n} ({s})")
    }
}

/// `Ok` for `hipSuccess`, else a [`BackendError::Driver`] naming the call.
pub(crate) fn check(op: &'static str, e: sys::hipError_t) -> BackendResult<()> {
    if e == sys::hipError_t::hipSuccess {
        Ok(())
    } else {
        Err(BackendError::Driver {
            backend: "HIP",
            op,
            reason: err_text(e),
        })
    }
}

/// Makes device `ordinal` current on the calling thread.
pub(crate) fn bind(ordinal: c_int) -> BackendResult<()> {
    // SAFETY: plain call; an invalid ordinal is reported as an error code.
    check("hipSetDevice", unsafe { sys::hipSetDevice(ordinal) })
}

/// The HIP driver version (`hipDriverGetVersion`), needing no device.
pub fn driver_version() -> BackendResult<i32> {
    let mut v: c_int = 0;
    // SAFETY: valid out-pointer.
    check("hipDriverGetVersion", unsafe {
        sys::hipDriverGetVersion(&mut v)
    })?;
    Ok(v)
}

type ModuleKey = (String, Vec<(String, String)>);

/// One HIP device.
#[derive(Debug)]
pub struct HipDevice {
    ordinal: c_int,
    drv: Arc<HipDriver>,
    name: String,
    /// Full target id (`gfx90a:sramecc+:xnack-`): what hipRTC compiles for.
    arch: String,
    warp: u32,
    cache: KernelCache,
    modules: Mutex<HashMap<ModuleKey, Arc<Module>>>,
}

impl HipDevice {
    /// Opens device `ordinal`. No runtime-visible GPU (no `/dev/kfd`, no device, an ordinal past
    /// the count) is [`BackendError::NoDevice`] with backend "HIP", so `auto` falls back.
    pub fn open(ordinal: usize) -> BackendResult<Arc<Self>> {
        let no_dev = |reason: String| BackendError::NoDevice {
            backend: "HIP",
            reason,
        };
        // SAFETY: plain call; flags must be 0.
        let e = unsafe { sys::hipInit(0) };
        if e != sys::hipError_t::hipSuccess {
            return Err(no_dev(format!(
                "no HIP device: hipInit failed: {} (no AMD GPU visible to the ROCm runtime: \
                 check that /dev/kfd exists and that this user is in the render/video groups)",
                err_text(e)
            )));
        }
        let mut count: c_int = 0;
        // SAFETY: valid out-pointer.
        let e = unsafe { sys::hipGetDeviceCount(&mut count) };
        if e != sys::hipError_t::hipSuccess || count <= 0 {
            return Err(no_dev(format!(
                "no HIP device: hipGetDeviceCount found none ({})",
                err_text(e)
            )));
        }
        let ord = c_int::try_from(ordinal)
            .ok()
            .filter(|o| *o < count)
            .ok_or_else(|| no_dev(format!("no HIP device {ordinal}: only {count} present")))?;
        bind(ord)?;
        let warp = attribute(ord, sys::hipDeviceAttribute_t::hipDeviceAttributeWarpSize)?;
        let (name, arch) = name_and_arch(ord)?;
        let warp = u32::try_from(warp).map_err(|_| BackendError::Driver {
            backend: "HIP",
            op: "hipDeviceGetAttribute",
            reason: format!("warp size {warp}"),
        })?;
        // The kernels take RF_WARP from the compiler's default wavefront for the target; a
        // device reporting another width (e.g. an RDNA GPU forced to wave64) would get launch
        // shapes that do not match the code, so refuse rather than compute garbage.
        if super::wavefront_size(&arch) != Some(warp) {
            return Err(BackendError::Driver {
                backend: "HIP",
                op: "open",
                reason: format!(
                    "{name} ({arch}) reports a wavefront of {warp}, the kernels are built for {:?}",
                    super::wavefront_size(&arch)
                ),
            });
        }
        Ok(Arc::new(Self {
            ordinal: ord,
            drv: Arc::new(HipDriver { ordinal: ord }),
            name,
            arch,
            warp,
            cache: KernelCache::from_env(),
            modules: Mutex::new(HashMap::new()),
        }))
    }

    pub fn ordinal(&self) -> usize {
        usize::try_from(self.ordinal).unwrap_or(0)
    }

    /// Full target id, e.g. `gfx90a:sramecc+:xnack-`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The loaded module of `file` (with `defines`), from memory, the disk cache or hipRTC.
    pub fn module(
        &self,
        file: &str,
        defines: &[(String, String)],
    ) -> BackendResult<(Arc<Module>, CacheHit)> {
        let key: ModuleKey = (file.to_string(), defines.to_vec());
        let mut mods = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = mods.get(&key) {
            return Ok((Arc::clone(m), CacheHit::Memory));
        }
        let (image, hit) = super::compile(&self.cache, file, &self.arch, defines)?;
        let m = Module::load(&self.drv, file, &image)?;
        mods.insert(key, Arc::clone(&m));
        Ok((m, hit))
    }

    /// Entry point `name` of kernel file `file` (compiled without defines).
    pub fn kernel(&self, file: &str, name: &str) -> BackendResult<Kernel> {
        self.module(file, &[])?.0.kernel(name)
    }

    /// Allocates and fills a buffer from host data (synchronous; setup and tests).
    pub fn upload<T: Pod>(&self, data: &[T], what: &str) -> BackendResult<DeviceBuf> {
        DeviceBuf::upload(&self.drv, data, what)
    }

    /// Waits for all work on every stream of this device.
    pub fn synchronize(&self) -> BackendResult<()> {
        bind(self.ordinal)?;
        // SAFETY: plain call on the current device.
        check("hipDeviceSynchronize", unsafe {
            sys::hipDeviceSynchronize()
        })
    }
}

fn attribute(ord: c_int, attr: sys::hipDeviceAttribute_t) -> BackendResult<c_int> {
    let mut v: c_int = 0;
    // SAFETY: valid out-pointer; the ordinal was checked against the device count.
    check("hipDeviceGetAttribute", unsafe {
        sys::hipDeviceGetAttribute(&mut v, attr, ord)
    })?;
    Ok(v)
}

/// Marketing name and `gcnArchName` of device `ord`.
///
/// `hipDeviceProp_t` changed layout in ROCm 6 (the header maps the call to
/// `hipGetDevicePropertiesR0600`; the plain symbol keeps the 5.x layout these bindings describe).
/// The struct is therefore written into a zeroed buffer with generous slack, and the arch string
/// is validated (`gfx...`); if it is not where the 5.x layout puts it, the buffer is searched for
/// the first `gfx` string instead of trusting an offset.
fn name_and_arch(ord: c_int) -> BackendResult<(String, String)> {
    #[repr(C)]
    struct Padded {
        prop: MaybeUninit<sys::hipDeviceProp_t>,
        slack: [u8; 8192],
    }
    let mut buf = MaybeUninit::<Padded>::zeroed();
    // SAFETY: the runtime writes at most one hipDeviceProp_t (any release's layout, all far
    // smaller than prop + 8 KiB of slack) into zeroed memory owned by this frame.
    check("hipGetDeviceProperties", unsafe {
        sys::hipGetDeviceProperties(buf.as_mut_ptr().cast::<sys::hipDeviceProp_t>(), ord)
    })?;
    let size = std::mem::size_of::<Padded>();
    // SAFETY: the whole buffer was zero-initialised and is plain bytes.
    let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), size) };
    let cstr_at = |off: usize| -> String {
        let tail = bytes.get(off..).unwrap_or(&[]);
        let end = tail
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(tail.len())
            .min(256);
        String::from_utf8_lossy(&tail[..end]).into_owned()
    };
    let name = cstr_at(0);
    let arch_off = std::mem::offset_of!(sys::hipDeviceProp_t, gcnArchName);
    let mut arch = cstr_at(arch_off);
    if super::wavefront_size(&arch).is_none() {
        arch = bytes
            .windows(3)
            .enumerate()
            .skip(256)
            .find(|(i, w)| *w == b"gfx" && bytes[i - 1] == 0)
            .map(|(i, _)| cstr_at(i))
            .unwrap_or_default();
    }
    if super::wavefront_size(&arch).is_none() {
        return Err(BackendError::Driver {
            backend: "HIP",
            op: "hipGetDeviceProperties",
            reason: format!("device {ord} reports no gfx architecture (got {arch:?})"),
        });
    }
    let name = if name.trim().is_empty() {
        format!("HIP device {ord}")
    } else {
        name
    };
    Ok((name, arch))
}

impl ComputeDevice for HipDevice {
    type Buf = DeviceBuf;
    type Pinned = PinnedBuf;
    type Stream = Stream;
    type Event = Event;

    fn describe(&self) -> String {
        format!("{} ({}, wave{})", self.name, self.arch, self.warp)
    }

    fn warp_size(&self) -> u32 {
        self.warp
    }

    fn mem_info(&self) -> BackendResult<(usize, usize)> {
        crate::backend::driver::Driver::mem_info(&*self.drv)
    }

    fn alloc(&self, bytes: usize, what: &str) -> BackendResult<DeviceBuf> {
        DeviceBuf::alloc(&self.drv, bytes, what)
    }

    fn alloc_pinned(&self, bytes: usize) -> BackendResult<PinnedBuf> {
        PinnedBuf::alloc(&self.drv, bytes)
    }

    fn new_stream(&self) -> BackendResult<Stream> {
        Stream::new(&self.drv)
    }

    fn new_event(&self, timing: bool) -> BackendResult<Event> {
        Event::new(&self.drv, timing)
    }

    unsafe fn copy_htod_async(
        &self,
        stream: &Stream,
        dst: &DeviceBuf,
        dst_off: usize,
        src: &PinnedBuf,
        src_off: usize,
        len: usize,
    ) -> BackendResult<()> {
        // SAFETY: liveness until the copy completed is this function's own contract, passed on.
        unsafe { stream.copy_htod_async(dst, dst_off, src, src_off, len) }
    }
}
