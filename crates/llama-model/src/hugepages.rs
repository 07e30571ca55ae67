//! Large CPU buffers (packed weights, the KV pool) on 2 MiB pages.
//!
//! A decode step streams every weight and much of the KV pool from DRAM. On
//! 4 KiB pages that is a TLB miss every 64 cache lines, and the hardware
//! prefetchers stop at every 4 KiB boundary. Linux backs an anonymous
//! mapping with huge pages when asked (`MADV_HUGEPAGE`; many distributions
//! set transparent huge pages to `madvise`, so nothing happens unasked).
//! Asking before the first touch makes the page faults themselves allocate
//! huge pages. Elsewhere, or when the kernel declines, the buffer is an
//! ordinary one.

use candle_core::{DType, Device, Shape, Tensor};

/// Huge page size on x86-64 and most aarch64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// A zeroed buffer of `len` floats whose pages may become huge pages.
pub fn zeroed_f32(len: usize) -> Vec<f32> {
    // `vec![0; n]` asks the allocator for zeroed memory: large blocks come
    // straight from mmap, untouched, so the advice applies to every page.
    let v = vec![0f32; len];
    advise(v.as_ptr() as *const u8, len * 4);
    v
}

/// As [`zeroed_f32`], for 16-bit floats, whose all-zero bits are +0.
fn zeroed_half<T: Copy>(len: usize) -> Vec<T> {
    assert!(std::mem::size_of::<T>() == 2 && std::mem::align_of::<T>() == 2);
    let v = std::mem::ManuallyDrop::new(vec![0u16; len]);
    advise(v.as_ptr() as *const u8, len * 2);
    // SAFETY: same size and alignment as u16 (checked above), the buffer is
    // initialised, and ownership moves to the new Vec (the old one is not dropped).
    unsafe { Vec::from_raw_parts(v.as_ptr() as *mut T, v.len(), v.capacity()) }
}

/// `Tensor::zeros`, on huge pages for CPU tensors of floats.
pub fn zeros(
    shape: impl Into<Shape>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let shape = shape.into();
    let n = shape.elem_count();
    if !device.is_cpu() {
        return Tensor::zeros(shape, dtype, device);
    }
    match dtype {
        DType::F32 => Tensor::from_vec(zeroed_f32(n), shape, device),
        DType::F16 => Tensor::from_vec(zeroed_half::<half::f16>(n), shape, device),
        DType::BF16 => Tensor::from_vec(zeroed_half::<half::bf16>(n), shape, device),
        _ => Tensor::zeros(shape, dtype, device),
    }
}

fn advise(ptr: *const u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
        let end = (ptr as usize + len) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: the range lies inside the live allocation; MADV_HUGEPAGE
            // only changes how the kernel backs it, never its contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, len, HUGE_PAGE);
}
