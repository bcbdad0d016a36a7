#![cfg_attr(not(feature = "std"), no_std)]

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::Relaxed};

// persona-lens patch: with the `x86-v4` feature, the AVX-512 kernels run only on products whose
// output has at least this many rows and columns; smaller ones (a prompt's few tokens at batch 1)
// keep the AVX2 kernels, whose 16-row tiles waste less of the short side (measured in
// persona-lens's bench/README.md). 0 means AVX-512 for every shape (upstream behaviour).
pub const DEFAULT_AVX512_MIN_DIM: usize = 64;
static AVX512_MIN_DIM: AtomicUsize = AtomicUsize::new(DEFAULT_AVX512_MIN_DIM);

#[inline]
pub fn get_avx512_min_dim() -> usize {
    AVX512_MIN_DIM.load(Relaxed)
}
#[inline]
pub fn set_avx512_min_dim(min_dim: usize) {
    AVX512_MIN_DIM.store(min_dim, Relaxed)
}

// persona-lens patch: an f32 product computed outside gemm (a BLAS library's sgemm, loaded at run
// time by persona-lens). Same arguments as gemm's kernels: dst := alpha * dst + beta * lhs * rhs
// when read_dst, else dst := beta * lhs * rhs, element (i, j) at i * rs + j * cs; `threads` is
// the caller's parallelism. It returns false for a layout it cannot take, and gemm's own kernel
// computes the product then.
pub type F32GemmHook = unsafe fn(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_cs: isize,
    dst_rs: isize,
    read_dst: bool,
    lhs: *const f32,
    lhs_cs: isize,
    lhs_rs: isize,
    rhs: *const f32,
    rhs_cs: isize,
    rhs_rs: isize,
    alpha: f32,
    beta: f32,
    threads: usize,
) -> bool;
static F32_GEMM_HOOK: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

/// Routes every f32 product through `hook` (None: gemm's own kernels again).
pub fn set_f32_gemm_hook(hook: Option<F32GemmHook>) {
    F32_GEMM_HOOK.store(
        hook.map_or(core::ptr::null_mut(), |f| f as *mut ()),
        Relaxed,
    )
}

#[inline]
pub fn f32_gemm_hook() -> Option<F32GemmHook> {
    let ptr = F32_GEMM_HOOK.load(Relaxed);
    if ptr.is_null() {
        None
    } else {
        Some(unsafe { core::mem::transmute::<*mut (), F32GemmHook>(ptr) })
    }
}

/// The number of threads a `Parallelism` asks for (outside the macros, whose `cfg`s would be
/// read in the crates that expand them).
pub fn parallelism_threads(parallelism: Parallelism) -> usize {
    match parallelism {
        Parallelism::None => 1,
        #[cfg(feature = "rayon")]
        Parallelism::Rayon(0) => rayon::current_num_threads(),
        #[cfg(feature = "rayon")]
        Parallelism::Rayon(n) => n,
    }
}

#[cfg(feature = "wasm-simd128-enable")]
pub const DEFAULT_WASM_SIMD128: bool = true;

#[cfg(not(feature = "wasm-simd128-enable"))]
pub const DEFAULT_WASM_SIMD128: bool = false;

static WASM_SIMD128: AtomicBool = AtomicBool::new(DEFAULT_WASM_SIMD128);

#[inline]
pub fn get_wasm_simd128() -> bool {
    WASM_SIMD128.load(Relaxed)
}
#[inline]
pub fn set_wasm_simd128(enable: bool) {
    WASM_SIMD128.store(enable, Relaxed)
}

extern crate alloc;

pub mod cache;

pub mod gemm;
pub mod gemv;
pub mod gevv;

pub mod horizontal_microkernel;
pub mod microkernel;

pub mod pack_operands;
pub mod simd;

pub use pulp;

#[derive(Copy, Clone, Debug)]
pub enum Parallelism {
    None,
    #[cfg(feature = "rayon")]
    Rayon(usize),
}

pub struct Ptr<T: ?Sized>(pub *mut T);

impl<T: ?Sized> Clone for Ptr<T> {
    #[inline]
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: ?Sized> Copy for Ptr<T> {}

unsafe impl<T: ?Sized> Send for Ptr<T> {}
unsafe impl<T: ?Sized> Sync for Ptr<T> {}

impl<T> Ptr<T> {
    #[inline(always)]
    pub fn wrapping_offset(self, offset: isize) -> Self {
        Ptr::<T>(self.0.wrapping_offset(offset))
    }
    #[inline(always)]
    pub fn wrapping_add(self, offset: usize) -> Self {
        Ptr::<T>(self.0.wrapping_add(offset))
    }
}

#[cfg(not(feature = "std"))]
#[macro_export]
macro_rules! feature_detected {
    ($tt: tt) => {
        cfg!(feature = $tt)
    };
}

#[cfg(all(feature = "std", any(target_arch = "x86", target_arch = "x86_64")))]
#[macro_export]
macro_rules! feature_detected {
    ($tt: tt) => {
        ::std::arch::is_x86_feature_detected!($tt)
    };
}
#[cfg(all(feature = "std", target_arch = "aarch64"))]
#[macro_export]
macro_rules! feature_detected {
    ($tt: tt) => {
        ::std::arch::is_aarch64_feature_detected!($tt)
    };
}
#[cfg(all(feature = "std", target_family = "wasm"))]
#[macro_export]
macro_rules! feature_detected {
    ("simd128") => {
        $crate::get_wasm_simd128()
    };
}
