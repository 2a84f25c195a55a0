//! Opening a compute device.
//!
//! On CUDA, cudarc records two CUDA events per allocation and one per kernel argument by default, so
//! that tensors can be shared between streams safely. candle runs every operation of a device on one
//! stream, where that bookkeeping is pure overhead: about ten driver calls per operation, for a U-Net
//! step of thousands of small kernels. [`cuda`] turns it off ([`CudaOptions::event_tracking`] keeps
//! it, for A/B benchmarks).
//!
//! cudarc allocates from the device's default stream-ordered memory pool, whose release threshold is 0:
//! at every synchronisation (each training step reads its loss back) the pool hands all free memory back
//! to the driver, and the next step maps it again. [`cuda`] raises the threshold so the pool keeps it,
//! as PyTorch's caching allocator does ([`CudaOptions::release_pool`] keeps the default).

use candle_core::Device;

use crate::error::{Error, Result};

/// How [`cuda_with`] sets a CUDA device up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CudaOptions {
    /// Keep cudarc's per-allocation event tracking (off by default).
    pub event_tracking: bool,
    /// Keep the memory pool's default release threshold of 0 (by default the pool keeps its memory).
    pub release_pool: bool,
}

/// The CUDA device `ordinal`, set up for single-stream use (see the module documentation).
pub fn cuda(ordinal: usize) -> Result<Device> {
    cuda_with(ordinal, CudaOptions::default())
}

/// [`cuda`] with the set-up in `opts`.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn cuda_with(ordinal: usize, opts: CudaOptions) -> Result<Device> {
    let device = Device::new_cuda(ordinal)
        .map_err(|e| Error::Config(format!("no CUDA device {ordinal} ({e})")))?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        if !opts.event_tracking {
            // SAFETY: candle issues all work of this device on the one stream it was created with,
            // and no tensor exists yet, so every use is ordered by that stream.
            unsafe { d.disable_event_tracking() };
        }
        if !opts.release_pool {
            keep_pool_memory(d)?;
        }
    }
    Ok(device)
}

/// Sets the default memory pool's release threshold to "never release".
#[cfg(feature = "cuda")]
fn keep_pool_memory(d: &candle_core::CudaDevice) -> Result<()> {
    use cudarc::driver::sys;
    let stream = d.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread()
        .map_err(|e| Error::Config(format!("CUDA context: {e:?}")))?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: plain driver calls on a live context; `pool` and `threshold` outlive them.
    let ok = unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS
            && sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            ) == sys::CUresult::CUDA_SUCCESS
    };
    if !ok {
        eprintln!("note: could not set the CUDA memory pool's release threshold; continuing");
    }
    Ok(())
}
