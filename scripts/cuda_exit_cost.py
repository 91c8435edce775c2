# What a CUDA process's exit costs (issue 12's ~0.1 s after the answer): create a context, make
# the allocations of one mode, then _exit; the caller times the whole process.
# Usage (GPU machine): s=$(date +%s%N); x=$(python3 cuda_exit_cost.py MODE); e=$(date +%s%N)
#   exit cost = e - x (ns). MODE: ctx | dev | dev+kv | dev+kv+pin | dev+kv+pin+free.
import ctypes, os, sys
cu = ctypes.CDLL("libcuda.so.1")
def ok(r, what):
    if r != 0:
        print(f"{what} failed: {r}", file=sys.stderr); os._exit(2)
ok(cu.cuInit(0), "cuInit")
dev = ctypes.c_int(); ok(cu.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
ctx = ctypes.c_void_p(); ok(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "retain")
ok(cu.cuCtxSetCurrent(ctx), "set")
mode = sys.argv[1]
keep = []
if "dev" in mode:  # the weights: 33 regions of 126 MB (one per pipeline unit), 4.16 GB
    for _ in range(33):
        p = ctypes.c_uint64(); ok(cu.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(126 << 20)), "alloc"); keep.append(p)
if "kv" in mode:  # one sequence's KV cache at ctx 4096: 512 MiB
    p = ctypes.c_uint64(); ok(cu.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(512 << 20)), "alloc kv"); keep.append(p)
if "pin" in mode:  # the staging ring: 112 MiB of pinned host memory
    h = ctypes.c_void_p(); ok(cu.cuMemHostAlloc(ctypes.byref(h), ctypes.c_size_t(112 << 20), 0), "hostalloc"); keep.append(h)
if "free" in mode:  # free everything before exiting (the teardown done by hand)
    for p in keep:
        if isinstance(p, ctypes.c_uint64): cu.cuMemFree_v2(p)
        else: cu.cuMemFreeHost(p)
ok(cu.cuCtxSynchronize(), "sync")
import time
print(time.time_ns())
sys.stdout.flush()
os._exit(0)
