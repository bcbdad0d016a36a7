//! One crosscoder training step: loss and the four parameters' gradients, with the backward pass
//! written out by hand. Autograd built and walked a graph of about forty whole-batch and
//! whole-dictionary tensors per step (broadcasts, transposed copies of the decoder, the decoder
//! norm's chain), which cost more than the five matrix products that are the step's real work.
//! `tests::hand_gradients_equal_autograd` checks every gradient against candle's autograd on the
//! same forward, for both objectives, the auxiliary loss and a padded model.

use crate::crosscoder::batch_topk_mask;
use crate::Result;
use candle_core::{CpuStorage, DType, Layout, Tensor};

/// The parameters as plain tensors: `w_enc` (n, d, F), `b_enc` (F), `w_dec` (n, F, d),
/// `b_dec` (n, d).
pub struct StepParams<'a> {
    pub w_enc: &'a Tensor,
    pub b_enc: &'a Tensor,
    pub w_dec: &'a Tensor,
    pub b_dec: &'a Tensor,
}

/// The objective of one step, its schedule already applied.
#[derive(Debug, Clone, Copy)]
pub enum StepObjective {
    /// Decoder-norm-weighted L1 with coefficient `lambda` (warm-up applied).
    L1 { lambda: f64 },
    /// BatchTopK with the auxiliary loss on dead latents.
    BatchTopK {
        k: usize,
        aux_k: usize,
        aux_alpha: f64,
        dead_after: usize,
    },
}

pub struct StepOut {
    /// mse + the objective's extra term.
    pub loss: f64,
    /// Σ‖x − x̂‖² per example.
    pub mse: f64,
    /// L1: the weighted L1 per example; BatchTopK: the auxiliary loss (0 without dead latents).
    pub penalty: f64,
    /// The latent activations (B, F) after the objective's sparsity.
    pub acts: Tensor,
    /// BatchTopK: the smallest kept scaled activation of the batch (for the inference threshold).
    pub kept_min: Option<f32>,
    /// Examples since each latent last fired, this batch counted.
    pub since_fired: Tensor,
    /// Gradients of `loss` for w_enc, b_enc, w_dec, b_dec, in their parameters' shapes.
    pub grads: [Tensor; 4],
}

/// `Σ_l ‖W_dec[l, i]‖` per latent, as (1, F), and the per-(model, latent) norms (n, F).
fn decoder_norms(w_dec: &Tensor) -> Result<(Tensor, Tensor)> {
    let norms = w_dec.apply_op1_no_bwd(&RowNorms)?;
    let code_norm = norms.sum_keepdim(0)?;
    Ok((code_norm, norms))
}

pub(crate) fn contiguous_f32<'s>(
    s: &'s CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'s [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(x), Some((a, b))) => Ok(&x[a..b]),
        _ => candle_core::bail!("{op} needs a contiguous f32 tensor"),
    }
}

pub(crate) fn contiguous_f32_mut<'s>(
    s: &'s mut CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'s mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(x), Some((a, b))) => Ok(&mut x[a..b]),
        _ => candle_core::bail!("{op} needs a contiguous f32 tensor"),
    }
}

/// The Euclidean norm of every last-dimension row, in one pass (no squared copy of the
/// dictionary).
struct RowNorms;

impl candle_core::CustomOp1 for RowNorms {
    fn name(&self) -> &'static str {
        "row-norms"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
    ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let w = contiguous_f32(s, l, "row-norms")?;
        let dims = l.dims();
        let d = *dims.last().unwrap_or(&1);
        let norms: Vec<f32> = w
            .par_chunks(d.max(1))
            .map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt())
            .collect();
        Ok((CpuStorage::F32(norms), dims[..dims.len() - 1].into()))
    }
}

/// Column sums of a matrix `(rows, cols)` as `(1, cols)`: candle's `sum_keepdim(0)`, bit for
/// bit (each column is added up in row order, as candle's reduction does), but in one
/// vectorised pass per row over chunks of columns in parallel, instead of candle's
/// element-at-a-time loop with an index division per element (about a tenth of a training
/// step over its four batch-by-dictionary sums).
pub fn col_sum(m: &Tensor) -> Result<Tensor> {
    struct ColSum;
    impl candle_core::CustomOp1 for ColSum {
        fn name(&self) -> &'static str {
            "col-sum"
        }
        fn cpu_fwd(
            &self,
            s: &CpuStorage,
            l: &Layout,
        ) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
            use rayon::prelude::*;
            let (rows, cols) = match l.dims() {
                [r, c] => (*r, *c),
                other => candle_core::bail!("col-sum: a matrix, not {other:?}"),
            };
            let x = contiguous_f32(s, l, "col-sum")?;
            let mut out = vec![0f32; cols];
            const COLS: usize = 256;
            out.par_chunks_mut(COLS).enumerate().for_each(|(ci, acc)| {
                let c0 = ci * COLS;
                for r in 0..rows {
                    let row = &x[r * cols + c0..r * cols + c0 + acc.len()];
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += v;
                    }
                }
            });
            Ok((CpuStorage::F32(out), (1, cols).into()))
        }
    }
    Ok(m.apply_op1_no_bwd(&ColSum)?)
}

/// `dst[r, :] += coef[r] · src[r, :]` over last-dimension rows, in place.
struct AddScaledRows(Vec<f32>);

impl candle_core::InplaceOp2 for AddScaledRows {
    fn name(&self) -> &'static str {
        "add-scaled-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let src = contiguous_f32(s2, l2, "add-scaled-rows")?;
        let dst = contiguous_f32_mut(s1, l1, "add-scaled-rows")?;
        let rows = self.0.len();
        if rows == 0 || dst.len() != src.len() || dst.len() % rows != 0 {
            candle_core::bail!(
                "add-scaled-rows: {} rows against {} elements",
                rows,
                dst.len()
            )
        }
        let d = dst.len() / rows;
        dst.par_chunks_mut(d)
            .zip(src.par_chunks(d))
            .zip(self.0.par_iter())
            .for_each(|((o, w), &c)| {
                for (o, &w) in o.iter_mut().zip(w) {
                    *o += c * w;
                }
            });
        Ok(())
    }
}

/// Zeroes the padded coordinates of narrower models in place: `w_dec` (n, F, d) from column
/// `dims[m]` on, `w_enc` (n, d, F) from row `dims[m]` on. Only the padding is written.
pub fn zero_padding(w_enc: &Tensor, w_dec: &Tensor, dims: &[usize]) -> Result<()> {
    struct ZeroPad<'a>(&'a [usize], bool);
    impl candle_core::InplaceOp1 for ZeroPad<'_> {
        fn name(&self) -> &'static str {
            "zero-padding"
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
            let (n, a, b) = match l.dims() {
                [n, a, b] => (*n, *a, *b),
                other => candle_core::bail!("zero-padding: a 3-d tensor, not {other:?}"),
            };
            let w = contiguous_f32_mut(s, l, "zero-padding")?;
            for (m, block) in w.chunks_mut(a * b).enumerate().take(n) {
                let real = self.0.get(m).copied().unwrap_or(usize::MAX);
                if self.1 {
                    // decoder (F, d) per model: the tail of every row
                    for row in block.chunks_mut(b) {
                        row[real.min(b)..].iter_mut().for_each(|v| *v = 0.0);
                    }
                } else {
                    // encoder (d, F) per model: whole rows from `real` on
                    block[real.min(a) * b..].iter_mut().for_each(|v| *v = 0.0);
                }
            }
            Ok(())
        }
    }
    w_dec.inplace_op1(&ZeroPad(dims, true))?;
    w_enc.inplace_op1(&ZeroPad(dims, false))?;
    Ok(())
}

/// The step on a normalised batch `x` (B, n·d).
pub fn step(
    x: &Tensor,
    p: &StepParams,
    objective: StepObjective,
    since_fired: &Tensor,
) -> Result<StepOut> {
    let (n, f, d) = p.w_dec.dims3()?;
    let bsz = x.dim(0)?;
    let inv_b = 1.0 / bsz as f64;
    let w_enc = p.w_enc.reshape((n * d, f))?;
    let w_dec_flat = p.w_dec.transpose(0, 1)?.contiguous()?.reshape((f, n * d))?;
    let z = x.matmul(&w_enc)?.broadcast_add(p.b_enc)?;
    let pre = z.relu()?;
    let (code_norm, norms) = decoder_norms(p.w_dec)?;
    // acts = pre · mask; the mask (and the scaled activations it was chosen on) is None for L1
    // (all of pre).
    let (acts, mask, kept_min, l1_penalty) = match objective {
        StepObjective::L1 { .. } => {
            let pen = pre
                .broadcast_mul(&code_norm)?
                .sum_all()?
                .to_scalar::<f32>()? as f64;
            (pre.clone(), None, None, pen * inv_b)
        }
        StepObjective::BatchTopK { k, .. } => {
            let scaled = pre.broadcast_mul(&code_norm)?;
            let m = batch_topk_mask(&scaled, k)?;
            let kept: Vec<f32> = (&scaled * &m)?.flatten_all()?.to_vec1()?;
            let min_pos = kept
                .iter()
                .copied()
                .filter(|v| *v > 0.0)
                .fold(f32::INFINITY, f32::min);
            ((&pre * &m)?, Some((m, scaled)), Some(min_pos), 0.0)
        }
    };
    let recon = acts
        .matmul(&w_dec_flat)?
        .broadcast_add(&p.b_dec.reshape(n * d)?)?;
    let err = (x - &recon)?;
    let mse = err.sqr()?.sum_all()?.to_scalar::<f32>()? as f64 * inv_b;
    // A latent fired in the batch where its column of acts (ReLU outputs, masked: never
    // negative) has a positive sum.
    let fired = col_sum(&acts)?.squeeze(0)?.gt(0f32)?;
    let since_fired = fired.where_cond(
        &since_fired.zeros_like()?,
        &since_fired.affine(1.0, bsz as f64)?,
    )?;

    // Backward. d loss / d recon = -2 err / B.
    let g_recon = err.affine(-2.0 * inv_b, 0.0)?;
    let mut g_w_dec_flat = acts.t()?.matmul(&g_recon)?;
    let g_b_dec = col_sum(&g_recon)?.reshape((n, d))?;
    let mut g_acts = g_recon.matmul(&w_dec_flat.t()?)?;
    let mut g_norms = None;
    let (loss, penalty, g_pre) = match objective {
        StepObjective::L1 { lambda } => {
            // penalty = Σ_b Σ_i pre_bi · cn_i / B: into pre through cn, into W_dec through the
            // norms (d‖w‖/dw = w / ‖w‖).
            g_acts = g_acts.broadcast_add(&code_norm.affine(lambda * inv_b, 0.0)?)?;
            g_norms = Some(col_sum(&pre)?.affine(lambda * inv_b, 0.0)?);
            (mse + lambda * l1_penalty, l1_penalty, g_acts)
        }
        StepObjective::BatchTopK {
            aux_k,
            aux_alpha,
            dead_after,
            ..
        } => {
            let (m, scaled) = mask.as_ref().expect("BatchTopK has a mask");
            let mut g_pre = (&g_acts * m)?;
            let dead = since_fired.ge(dead_after as f64)?.to_dtype(DType::F32)?;
            let n_dead = dead.sum_all()?.to_scalar::<f32>()? as usize;
            let mut aux_value = 0.0;
            if n_dead > 0 && aux_alpha > 0.0 {
                let dead_scaled = scaled.broadcast_mul(&dead.unsqueeze(0)?)?;
                let m_aux = batch_topk_mask(&dead_scaled, aux_k.min(n_dead))?;
                let aux_acts = (&pre * &m_aux)?;
                let aux_recon = aux_acts.matmul(&w_dec_flat)?;
                let diff = (&err - &aux_recon)?;
                let num = diff.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                let den = err
                    .broadcast_sub(&(col_sum(&err)? * inv_b)?)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f32>()? as f64
                    + 1e-8;
                aux_value = num / den;
                // d (α num / den) / d aux_recon = -2 α diff / den (the residual is detached).
                let g_aux_recon = diff.affine(-2.0 * aux_alpha / den, 0.0)?;
                g_w_dec_flat = (g_w_dec_flat + aux_acts.t()?.matmul(&g_aux_recon)?)?;
                let g_aux_acts = g_aux_recon.matmul(&w_dec_flat.t()?)?;
                g_pre = (g_pre + (g_aux_acts * &m_aux)?)?;
            }
            (mse + aux_alpha * aux_value, aux_value, g_pre)
        }
    };
    // Through the ReLU (candle's convention: the gradient passes where z >= 0).
    let g_z = (g_pre * z.ge(0f32)?.to_dtype(DType::F32)?)?;
    let g_w_enc = x.t()?.matmul(&g_z)?.reshape((n, d, f))?;
    let g_b_enc = col_sum(&g_z)?.squeeze(0)?;
    let g_w_dec = g_w_dec_flat
        .reshape((f, n, d))?
        .transpose(0, 1)?
        .contiguous()?;
    if let Some(g_cn) = g_norms {
        // g_cn (1, F) per latent, shared by every model's vector of that latent:
        // d‖w‖/dw = w / ‖w‖, added in place.
        let coef = g_cn
            .broadcast_div(&norms)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        g_w_dec.inplace_op2(&p.w_dec.contiguous()?, &AddScaledRows(coef))?;
    }
    Ok(StepOut {
        loss,
        mse,
        penalty,
        acts,
        kept_min,
        since_fired,
        grads: [g_w_enc, g_b_enc, g_w_dec, g_b_dec],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// `col_sum` is candle's `sum_keepdim(0)` bit for bit, on shapes that leave a partial chunk
    /// of columns and on values whose sums depend on the order they are added in.
    #[test]
    fn col_sum_is_bitwise_candles_sum() -> Result<()> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (rows, cols) in [(256, 1280), (3, 1), (17, 300), (1, 513)] {
            let v: Vec<f32> = (0..rows * cols)
                .map(|_| (rng.random::<f32>() - 0.5) * 10f32.powi(rng.random_range(-3..4)))
                .collect();
            let m = Tensor::from_vec(v, (rows, cols), &Device::Cpu)?;
            let ours: Vec<u32> = col_sum(&m)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|x| x.to_bits())
                .collect();
            let theirs: Vec<u32> = m
                .sum_keepdim(0)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|x| x.to_bits())
                .collect();
            assert_eq!(ours, theirs, "{rows} x {cols}");
        }
        Ok(())
    }

    /// The same loss through candle's autograd (the training loop's code before the hand-written
    /// backward), for the reference gradients.
    fn autograd(
        x: &Tensor,
        p: &StepParams,
        objective: StepObjective,
        since_fired: &Tensor,
    ) -> Result<(f64, [Tensor; 4])> {
        let (n, f, d) = p.w_dec.dims3()?;
        let bsz = x.dim(0)?;
        let vars = [p.w_enc, p.b_enc, p.w_dec, p.b_dec].map(|t| Var::from_tensor(t).unwrap());
        let [w_enc, b_enc, w_dec, b_dec] = &vars;
        let pre = x
            .matmul(&w_enc.as_tensor().reshape((n * d, f))?)?
            .broadcast_add(b_enc.as_tensor())?
            .relu()?;
        let code_norm = w_dec
            .as_tensor()
            .sqr()?
            .sum(D::Minus1)?
            .sqrt()?
            .sum_keepdim(0)?;
        let w_dec_flat = w_dec.as_tensor().transpose(0, 1)?.reshape((f, n * d))?;
        let (acts, extra) = match objective {
            StepObjective::L1 { lambda } => {
                let pen = pre
                    .broadcast_mul(&code_norm)?
                    .sum_all()?
                    .affine(lambda / bsz as f64, 0.0)?;
                (pre.clone(), Some(pen))
            }
            StepObjective::BatchTopK { k, .. } => {
                let scaled = pre.broadcast_mul(&code_norm)?.detach();
                let m = batch_topk_mask(&scaled, k)?;
                ((&pre * &m)?, None)
            }
        };
        let recon = acts
            .matmul(&w_dec_flat)?
            .broadcast_add(&b_dec.as_tensor().reshape(n * d)?)?;
        let err = (x - &recon)?;
        let mse = err.sqr()?.sum_all()?.affine(1.0 / bsz as f64, 0.0)?;
        let fired = acts.gt(0f32)?.to_dtype(DType::F32)?.sum(0)?.gt(0f32)?;
        let since = fired.where_cond(
            &since_fired.zeros_like()?,
            &since_fired.affine(1.0, bsz as f64)?,
        )?;
        let loss = match (objective, extra) {
            (_, Some(pen)) => (&mse + pen)?,
            (
                StepObjective::BatchTopK {
                    aux_k,
                    aux_alpha,
                    dead_after,
                    ..
                },
                None,
            ) => {
                let dead = since.ge(dead_after as f64)?.to_dtype(DType::F32)?;
                let n_dead = dead.sum_all()?.to_scalar::<f32>()? as usize;
                if n_dead == 0 {
                    return finish(mse, vars);
                }
                let scaled = pre
                    .broadcast_mul(&code_norm)?
                    .broadcast_mul(&dead.unsqueeze(0)?)?
                    .detach();
                let m = batch_topk_mask(&scaled, aux_k.min(n_dead))?;
                let aux_recon = (&pre * &m)?.matmul(&w_dec_flat)?;
                let resid = err.detach();
                let num = (&resid - &aux_recon)?.sqr()?.sum_all()?;
                let den = resid
                    .broadcast_sub(&resid.mean_keepdim(0)?)?
                    .sqr()?
                    .sum_all()?
                    .affine(1.0, 1e-8)?;
                (&mse + (num / den)?.affine(aux_alpha, 0.0)?)?
            }
            (StepObjective::L1 { .. }, None) => unreachable!(),
        };
        finish(loss, vars)
    }

    fn finish(loss: Tensor, vars: [Var; 4]) -> Result<(f64, [Tensor; 4])> {
        let grads = loss.backward()?;
        let g = vars.map(|v| grads.get(v.as_tensor()).unwrap().clone());
        Ok((loss.to_scalar::<f32>()? as f64, g))
    }

    fn randn(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn zero_padding_zeroes_exactly_the_padding() -> Result<()> {
        let (n, d, f) = (2, 6, 5);
        let w_enc = (randn(&[n, d, f], 7, 1.0) + 2.0)?;
        let w_dec = (randn(&[n, f, d], 8, 1.0) + 2.0)?;
        let (enc0, dec0) = (w_enc.copy()?, w_dec.copy()?);
        zero_padding(&w_enc, &w_dec, &[6, 4])?;
        let (enc, dec) = (w_enc.to_vec3::<f32>()?, w_dec.to_vec3::<f32>()?);
        let (enc0, dec0) = (enc0.to_vec3::<f32>()?, dec0.to_vec3::<f32>()?);
        for m in 0..n {
            let real = [6, 4][m];
            for j in 0..d {
                for i in 0..f {
                    let (want_e, want_d) = if j < real {
                        (enc0[m][j][i], dec0[m][i][j])
                    } else {
                        (0.0, 0.0)
                    };
                    assert_eq!(enc[m][j][i], want_e, "w_enc[{m}][{j}][{i}]");
                    assert_eq!(dec[m][i][j], want_d, "w_dec[{m}][{i}][{j}]");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn hand_gradients_equal_autograd() -> Result<()> {
        let (n, d, f, b) = (2, 6, 12, 9);
        // The second model is narrower: its last two coordinates are padding (zero inputs and
        // zero weights), as in a store of two models of different widths.
        let mut pad = vec![1f32; n * d];
        pad[d + 4] = 0.0;
        pad[d + 5] = 0.0;
        let pad = Tensor::from_vec(pad, (n, d), &Device::Cpu)?;
        let x = randn(&[b, n, d], 1, 1.0)
            .broadcast_mul(&pad)?
            .reshape((b, n * d))?;
        let w_dec = randn(&[n, f, d], 2, 0.5).broadcast_mul(&pad.unsqueeze(1)?)?;
        let w_enc = randn(&[n, d, f], 3, 0.5).broadcast_mul(&pad.unsqueeze(2)?)?;
        let b_enc = randn(&[f], 4, 0.1);
        let b_dec = randn(&[n, d], 5, 0.1).broadcast_mul(&pad)?;
        let p = StepParams {
            w_enc: &w_enc,
            b_enc: &b_enc,
            w_dec: &w_dec,
            b_dec: &b_dec,
        };
        // Half the latents have not fired for long: the auxiliary loss is on.
        let since: Vec<f32> = (0..f).map(|i| if i % 2 == 0 { 1e6 } else { 0.0 }).collect();
        let since = Tensor::from_vec(since, f, &Device::Cpu)?;
        let objectives = [
            StepObjective::L1 { lambda: 0.7 },
            StepObjective::BatchTopK {
                k: 3,
                aux_k: 4,
                aux_alpha: 0.5,
                dead_after: 100,
            },
            StepObjective::BatchTopK {
                k: 3,
                aux_k: 4,
                aux_alpha: 0.5,
                dead_after: usize::MAX,
            },
        ];
        for objective in objectives {
            let ours = step(&x, &p, objective, &since)?;
            let (loss, reference) = autograd(&x, &p, objective, &since)?;
            assert!(
                (ours.loss - loss).abs() <= 1e-5 * loss.abs().max(1.0),
                "{objective:?}: loss {} vs autograd {loss}",
                ours.loss
            );
            if let StepObjective::BatchTopK { dead_after, .. } = objective {
                assert_eq!(ours.penalty > 0.0, dead_after == 100, "{objective:?}");
            }
            for (name, (a, r)) in ["w_enc", "b_enc", "w_dec", "b_dec"]
                .iter()
                .zip(ours.grads.iter().zip(&reference))
            {
                assert_eq!(a.dims(), r.dims(), "{name}");
                let scale = r.abs()?.max_all()?.to_scalar::<f32>()?;
                let diff = (a - r)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(scale > 0.0, "{objective:?} {name}: zero reference gradient");
                assert!(
                    diff <= 1e-5 * scale,
                    "{objective:?} {name}: max |hand - autograd| {diff} (largest {scale})"
                );
            }
        }
        Ok(())
    }
}
