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

static TUNE: Once = Once::new();

/// Sets `CANDLE_BARRIER_POOL_SPIN_LIMIT` to [`BARRIER_POOL_SPIN_LIMIT`] unless it is already set.
/// candle reads it once, when its first large elementwise op creates the pool, so this runs
/// before any tensor work: model loading and crosscoder training call it. Idempotent.
pub fn tune_cpu_pools() {
    TUNE.call_once(|| {
        if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
            std::env::set_var(
                "CANDLE_BARRIER_POOL_SPIN_LIMIT",
                BARRIER_POOL_SPIN_LIMIT.to_string(),
            );
        }
    });
}
