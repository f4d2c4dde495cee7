//! Memory in use by tensors, for the logs: what torch's `max_memory_allocated` is to TRL.
//!
//! On the CPU the bytes come from [`CountingAlloc`], a global allocator the binary installs
//! (two relaxed atomic updates per allocation); on CUDA from the memory pool that candle's
//! stream-ordered allocations draw from (its used-memory counter and high-water mark). The
//! GPU-wide figure `nvidia-smi` shows adds the CUDA context and memory the pool holds but
//! does not use; the pool's counters say what the tensors needed.

use candle_core::Device;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting the bytes it has handed out and their high-water mark.
pub struct CountingAlloc;

fn grow(n: usize) {
    let now = LIVE.fetch_add(n, Relaxed) + n;
    // A read first: most allocations stay below the peak, and a plain load does not take the
    // cache line from the other cores.
    if now > PEAK.load(Relaxed) {
        PEAK.fetch_max(now, Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to `System`; only counters are added.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Relaxed);
            grow(new_size);
        }
        p
    }
}

static KEEP_FREED: AtomicBool = AtomicBool::new(true);

/// Whether [`keep_freed_device_memory`] acts (on unless turned off: the binary reads
/// `ORPO_KEEP_GPU_MEMORY=0`, to measure what keeping saves).
pub fn set_keep_freed_device_memory(on: bool) {
    KEEP_FREED.store(on, Relaxed);
}

/// Lets a GPU's memory pool keep what tensors free, as torch's caching allocator does. CUDA's
/// default pool has a release threshold of 0: at every synchronisation (each training step has
/// one, reading the gradient norm) it hands all its unused memory back to the driver, and the
/// next step maps the same tens of GB afresh; RMM, CCCL and cuda-python raise the threshold to
/// the maximum for that reason. Returns whether the pool now keeps its memory (false on the
/// CPU, where allocations bypass the pool, or when turned off).
pub fn keep_freed_device_memory(device: &Device) -> bool {
    if !KEEP_FREED.load(Relaxed) {
        return false;
    }
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => cuda::Pool::of(d).is_some_and(|p| p.keep_freed_memory()),
        _ => false,
    }
}

/// Bytes in use now and the most in use since the previous reading; on CUDA also the most
/// the memory pool held from the device (in use, or freed and kept for reuse) in that window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub now: u64,
    pub peak: u64,
    pub reserved_peak: Option<u64>,
}

impl Usage {
    pub fn now_gib(&self) -> f64 {
        gib(self.now)
    }

    pub fn peak_gib(&self) -> f64 {
        gib(self.peak)
    }

    pub fn reserved_peak_gib(&self) -> Option<f64> {
        self.reserved_peak.map(gib)
    }
}

pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Reads a device's memory in windows: each [`MemoryMeter::read`] returns the peak since the
/// previous one (or since the meter was made) and starts the next window.
pub struct MemoryMeter {
    source: Source,
    /// The highest peak any reading has returned.
    run_peak: AtomicU64,
}

enum Source {
    Host,
    #[cfg(feature = "cuda")]
    Pool(cuda::Pool),
}

impl MemoryMeter {
    /// `None` where nothing counts: a CPU run without [`CountingAlloc`] installed (a library
    /// user's binary), or a GPU whose allocations bypass the memory pool.
    pub fn new(device: &Device) -> Option<Self> {
        let source = match device {
            Device::Cpu if LIVE.load(Relaxed) > 0 => Source::Host,
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Source::Pool(cuda::Pool::of(d)?),
            _ => return None,
        };
        let meter = MemoryMeter {
            source,
            run_peak: AtomicU64::new(0),
        };
        // Starts the first window here: loading's peak is not the run's.
        meter.source.read();
        Some(meter)
    }

    pub fn read(&self) -> Usage {
        let usage = self.source.read();
        self.run_peak.fetch_max(usage.peak, Relaxed);
        usage
    }

    /// The highest peak of all readings so far (from the meter's creation to the last read).
    pub fn run_peak_gib(&self) -> f64 {
        gib(self.run_peak.load(Relaxed))
    }
}

impl Source {
    fn read(&self) -> Usage {
        match self {
            Source::Host => {
                let now = LIVE.load(Relaxed);
                let peak = PEAK.swap(now, Relaxed).max(now);
                Usage {
                    now: now as u64,
                    peak: peak as u64,
                    reserved_peak: None,
                }
            }
            #[cfg(feature = "cuda")]
            Source::Pool(p) => p.read(),
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::Usage;
    use candle_core::cuda_backend::cudarc::driver::result::{ctx as context, device, mem_pool};
    use candle_core::cuda_backend::cudarc::driver::{sys, CudaContext};
    use candle_core::CudaDevice;
    use std::sync::Arc;

    use sys::CUmemPool_attribute::{
        CU_MEMPOOL_ATTR_RELEASE_THRESHOLD as RELEASE_THRESHOLD,
        CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH as RESERVED_HIGH,
        CU_MEMPOOL_ATTR_USED_MEM_CURRENT as CURRENT, CU_MEMPOOL_ATTR_USED_MEM_HIGH as HIGH,
    };

    /// The device's current memory pool, the one `cuMemAllocAsync` (cudarc's allocations on a
    /// stream) draws from.
    pub struct Pool {
        ctx: Arc<CudaContext>,
        pool: sys::CUmemoryPool,
    }

    /// Makes the context current on this thread without `bind_to_thread`, whose first act is
    /// to take (and clear) the error cudarc parks for its next call, from a drop's
    /// asynchronous free for instance: a meter reading must not swallow that error.
    fn make_current(ctx: &CudaContext) -> bool {
        // SAFETY: the context is alive (held by the device) and is not released here.
        unsafe { context::set_current(ctx.cu_ctx()) }.is_ok()
    }

    impl Pool {
        pub fn of(dev: &CudaDevice) -> Option<Self> {
            let ctx = dev.cuda_stream().context().clone();
            if !ctx.has_async_alloc() || !make_current(&ctx) {
                return None;
            }
            // SAFETY: the device handle comes from a live context.
            let pool = unsafe { device::get_mem_pool(ctx.cu_device()) }.ok()?;
            Some(Pool { ctx, pool })
        }

        fn attribute(&self, attr: sys::CUmemPool_attribute) -> u64 {
            let mut v: u64 = 0;
            // SAFETY: both attributes are cuuint64_t; the pool belongs to a live context.
            let ok = make_current(&self.ctx)
                && unsafe { mem_pool::get_attribute(self.pool, attr, (&mut v as *mut u64).cast()) }
                    .is_ok();
            if ok {
                v
            } else {
                0
            }
        }

        fn set(&self, attr: sys::CUmemPool_attribute, mut value: u64) -> bool {
            // SAFETY: as in `attribute`.
            make_current(&self.ctx)
                && unsafe {
                    mem_pool::set_attribute(self.pool, attr, (&mut value as *mut u64).cast())
                }
                .is_ok()
        }

        /// Setting a high-water mark to 0 resets it to the current value.
        fn reset(&self, attr: sys::CUmemPool_attribute) {
            self.set(attr, 0);
        }

        /// Whether the pool now keeps freed memory across synchronisations (see
        /// [`super::keep_freed_device_memory`]).
        pub fn keep_freed_memory(&self) -> bool {
            self.set(RELEASE_THRESHOLD, u64::MAX) && self.attribute(RELEASE_THRESHOLD) == u64::MAX
        }

        pub fn read(&self) -> Usage {
            let now = self.attribute(CURRENT);
            let peak = self.attribute(HIGH).max(now);
            let reserved_peak = Some(self.attribute(RESERVED_HIGH));
            self.reset(HIGH);
            self.reset(RESERVED_HIGH);
            Usage {
                now,
                peak,
                reserved_peak,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_meter_needs_the_counting_allocator() {
        // The test harness runs on the system allocator: nothing is counted.
        assert!(LIVE.load(Relaxed) == 0 && MemoryMeter::new(&Device::Cpu).is_none());
    }

    #[test]
    fn only_a_gpu_pool_is_told_to_keep_freed_memory() {
        // The CPU's counterpart is the binary's allocator tuning (main.rs, keep_freed_memory).
        assert!(!keep_freed_device_memory(&Device::Cpu));
    }
}
