//! Process-wide settings of candle's CPU thread pools.

use std::sync::Once;

/// The spin limit persona-lens gives candle's barrier pool unless the user set one.
///
/// candle runs elementwise ops of 64k+ elements on a barrier pool whose workers spin
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` iterations (default 25,000) after each op before parking,
/// while matrix multiplies run on a separate rayon pool. With as many threads as cores the
/// spinning workers take the cores the next matmul needs. On 2 cores (AMD EPYC, AVX-512),
/// `bench-forward --threads 2` at batch 16 ran 1.17x (SmolLM2-135M) and 1.10x (gemma-3-270m)
/// faster with 1000 than with the default; see bench/README.md.
pub const BARRIER_POOL_SPIN_LIMIT: u32 = 1000;

/// Overrides the smallest output side (rows and columns) on which gemm runs its AVX-512 kernels,
/// [`gemm_common::DEFAULT_AVX512_MIN_DIM`] (64) by default; 0 runs them on every product. Only
/// CPUs with AVX-512 see a difference. On a 2-core Xeon with AVX-512 (bench/README.md), AVX-512
/// everywhere made batch-16 forwards 1.28-1.54x faster and batch-1 forwards of short prompts
/// 0.59-0.77x as fast; with the threshold, batch 16 ran 1.23-1.41x faster, batch 1 unchanged,
/// crosscoder training 1.36x.
pub const AVX512_MIN_DIM_VAR: &str = "PERSONA_LENS_AVX512_MIN_DIM";

static TUNE: Once = Once::new();

/// Sets `CANDLE_BARRIER_POOL_SPIN_LIMIT` to [`BARRIER_POOL_SPIN_LIMIT`] unless it is already set.
/// candle reads it once, when its first large elementwise op creates the pool, so this runs
/// before any tensor work: model loading and crosscoder training call it. Also applies
/// [`AVX512_MIN_DIM_VAR`] when set, routes f32 products to MKL where it is installed
/// ([`crate::mkl`]) and pins candle's per-product thread lookup ([`pin_candle_thread_count`]).
/// Idempotent.
pub fn tune_cpu_pools() {
    TUNE.call_once(|| {
        if let Some(value) = std::env::var_os(AVX512_MIN_DIM_VAR) {
            match value.to_str().and_then(|v| v.trim().parse::<usize>().ok()) {
                Some(min_dim) => gemm_common::set_avx512_min_dim(min_dim),
                None => eprintln!(
                    "warning: {AVX512_MIN_DIM_VAR}={value:?} is not a whole number; keeping {}",
                    gemm_common::get_avx512_min_dim()
                ),
            }
        }
        crate::mkl::init();
        pin_candle_thread_count();
        if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
            std::env::set_var(
                "CANDLE_BARRIER_POOL_SPIN_LIMIT",
                BARRIER_POOL_SPIN_LIMIT.to_string(),
            );
        }
    });
}

/// Sets `RAYON_NUM_THREADS` to the thread count candle's matrix product would look up, unless
/// the user set it.
///
/// Why: without the variable candle (0.11) asks `num_cpus` for the physical core count on every
/// matrix product, which reads and parses `/proc/cpuinfo`: 4.6 % of a long batch-1 generation's
/// samples (`perf record`, 2026-12-07; bench/README.md). The variable holds the count candle
/// would find, so its products use as many threads as before. rayon's global pool is started
/// first, so it keeps its own default size (all logical CPUs) instead of reading the variable.
fn pin_candle_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return;
    }
    let _ = rayon::current_num_threads();
    let n = candle_core::utils::get_num_threads();
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    /// The patched gemm picks its kernel by shape: on an AVX-512 CPU the AVX-512 kernel (min dim
    /// 0) and the AVX2 kernel (min dim usize::MAX) must agree on the same product. On a CPU
    /// without AVX-512 both settings run the AVX2 kernel and this only checks the dispatch
    /// wrapper passes every argument through (a swapped stride or alpha/beta fails it too).
    #[test]
    fn avx512_and_avx2_kernels_agree() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (96, 640), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (640, 200), &dev).unwrap();
        // A transposed right operand gives gemm other strides than the contiguous one.
        let bt = Tensor::randn(0f32, 1.0, (200, 640), &dev)
            .unwrap()
            .t()
            .unwrap();
        let naive = |x: &Tensor, y: &Tensor| -> Vec<Vec<f32>> {
            let (x, y) = (x.to_vec2::<f32>().unwrap(), y.to_vec2::<f32>().unwrap());
            (0..x.len())
                .map(|i| {
                    (0..y[0].len())
                        .map(|j| (0..y.len()).map(|k| x[i][k] * y[k][j]).sum())
                        .collect()
                })
                .collect()
        };
        let before = gemm_common::get_avx512_min_dim();
        // gemm's own kernels, not MKL's (src/mkl.rs), even where MKL is installed. Process-wide:
        // other tests running meanwhile use gemm's kernels too, which are also correct.
        crate::mkl::init();
        let hook = gemm_common::f32_gemm_hook();
        gemm_common::set_f32_gemm_hook(None);
        for rhs in [&b, &bt] {
            let want = naive(&a, rhs);
            for min_dim in [0, usize::MAX] {
                gemm_common::set_avx512_min_dim(min_dim);
                let got = a.matmul(rhs).unwrap().to_vec2::<f32>().unwrap();
                let worst = got
                    .iter()
                    .flatten()
                    .zip(want.iter().flatten())
                    .map(|(g, w)| (g - w).abs())
                    .fold(0f32, f32::max);
                // Sums of 640 products of unit normals (about 25 in size): f32 rounding
                // of either order stays far below 1e-3.
                assert!(worst < 1e-3, "min_dim {min_dim}: max |diff| {worst}");
            }
        }
        gemm_common::set_avx512_min_dim(before);
        gemm_common::set_f32_gemm_hook(hook);
    }
}
