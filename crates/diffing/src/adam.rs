//! Adam for the crosscoder's parameters: one in-place pass per parameter over weight, gradient
//! and both moments, instead of about a dozen whole-tensor ops, each allocating a new tensor of
//! the parameter's size (the dictionary's weights are millions of elements: those copies were
//! memory traffic the size of the matrix products). The arithmetic is the composed version's, op
//! for op, so both give the same bits (`fused_adam_is_bitwise_the_composed_one`).

use crate::step::{contiguous_f32, contiguous_f32_mut};
use crate::Result;
use candle_core::{CpuStorage, Layout, Tensor, Var};
use std::sync::Mutex;

/// Adam's constants for one step: β1, β2, ε, the bias corrections `1 − β^t` and the learning
/// rate.
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub b1: f64,
    pub b2: f64,
    pub eps: f64,
    pub c1: f64,
    pub c2: f64,
    pub lr: f64,
}

impl AdamStep {
    pub fn new(b1: f64, b2: f64, eps: f64, t: i32, lr: f64) -> Self {
        AdamStep {
            b1,
            b2,
            eps,
            c1: 1.0 - b1.powi(t),
            c2: 1.0 - b2.powi(t),
            lr,
        }
    }

    /// The reference: the same update as whole-tensor candle ops (each `tensor * f64` is candle's
    /// `affine(x, 0)`, each `tensor / f64` is `affine(1 / x, 0)`). Returns (weight, m, v).
    pub fn composed(
        &self,
        w: &Tensor,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let m = ((m * self.b1)? + (g * (1.0 - self.b1))?)?;
        let v = ((v * self.b2)? + (g.sqr()? * (1.0 - self.b2))?)?;
        let upd = ((&m / self.c1)? / ((&v / self.c2)?.sqrt()? + self.eps)?)?;
        Ok(((w - (upd * self.lr)?)?, m, v))
    }

    /// Updates `var` and the moments `m`, `v` (host vectors of the parameter's size) in place.
    pub fn apply(&self, var: &Var, g: &Tensor, m: &mut [f32], v: &mut [f32]) -> Result<()> {
        let g = g.contiguous()?;
        let op = FusedAdam {
            step: *self,
            moments: Mutex::new((m, v)),
        };
        var.as_tensor().inplace_op2(&g, &op)?;
        Ok(())
    }
}

struct FusedAdam<'a> {
    step: AdamStep,
    moments: Mutex<(&'a mut [f32], &'a mut [f32])>,
}

impl candle_core::InplaceOp2 for FusedAdam<'_> {
    fn name(&self) -> &'static str {
        "fused-adam"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let g = contiguous_f32(s2, l2, "fused-adam")?;
        let w = contiguous_f32_mut(s1, l1, "fused-adam")?;
        let mut guard = self
            .moments
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused-adam: moments poisoned".into()))?;
        let (m, v) = &mut *guard;
        if g.len() != w.len() || m.len() != w.len() || v.len() != w.len() {
            candle_core::bail!(
                "fused-adam: weight of {} elements, gradient {}, moments {} and {}",
                w.len(),
                g.len(),
                m.len(),
                v.len()
            )
        }
        // f32 constants exactly as candle's affine converts them.
        let s = self.step;
        let (b1, b1c) = (s.b1 as f32, (1.0 - s.b1) as f32);
        let (b2, b2c) = (s.b2 as f32, (1.0 - s.b2) as f32);
        let (ic1, ic2) = ((1.0 / s.c1) as f32, (1.0 / s.c2) as f32);
        let (eps, lr) = (s.eps as f32, s.lr as f32);
        const CHUNK: usize = 1 << 14;
        w.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((w, g), m), v)| {
                for i in 0..w.len() {
                    let gi = g[i];
                    let mi = (m[i] * b1 + 0.0) + (gi * b1c + 0.0);
                    let vi = (v[i] * b2 + 0.0) + ((gi * gi) * b2c + 0.0);
                    let upd = (mi * ic1 + 0.0) / ((vi * ic2 + 0.0).sqrt() * 1.0 + eps);
                    w[i] -= upd * lr + 0.0;
                    m[i] = mi;
                    v[i] = vi;
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64, zeros_every: usize) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                if zeros_every > 0 && i % zeros_every == 0 {
                    0.0
                } else {
                    rng.random::<f32>() * 2.0 - 1.0
                }
            })
            .collect()
    }

    #[test]
    fn fused_adam_is_bitwise_the_composed_one() -> Result<()> {
        // More elements than one parallel chunk, some zero gradients, three steps.
        let n = 40_000;
        let dev = Device::Cpu;
        let w0 = Tensor::from_vec(random(n, 1, 0), n, &dev)?;
        let var = Var::from_tensor(&w0)?;
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let (mut w_ref, mut m_ref, mut v_ref) = (w0.clone(), w0.zeros_like()?, w0.zeros_like()?);
        for t in 1..=3 {
            let g = Tensor::from_vec(random(n, 10 + t as u64, 7), n, &dev)?;
            let step = AdamStep::new(0.9, 0.999, 1e-8, t, 1e-3 * t as f64);
            step.apply(&var, &g, &mut m, &mut v)?;
            (w_ref, m_ref, v_ref) = step.composed(&w_ref, &g, &m_ref, &v_ref)?;
            let same = |a: &[f32], b: &Tensor| -> Result<bool> {
                let b = b.to_vec1::<f32>()?;
                Ok(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()))
            };
            assert!(
                same(&var.as_tensor().to_vec1::<f32>()?, &w_ref)?,
                "weights, step {t}"
            );
            assert!(same(&m, &m_ref)?, "first moment, step {t}");
            assert!(same(&v, &v_ref)?, "second moment, step {t}");
        }
        assert_ne!(var.as_tensor().to_vec1::<f32>()?, w0.to_vec1::<f32>()?);
        Ok(())
    }
}
