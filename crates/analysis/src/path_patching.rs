//! Exact path patching (Wang et al. 2022, the IOI paper): how much of a *sender* head's effect
//! reaches the metric through chosen *receivers* only (their query / key / value inputs, or the
//! logits directly).
//!
//! Step A: the base run with the sender head's `attn.hook_z` (every position) taken from the
//! source run and every other attention and MLP output frozen at the base run, so the residual
//! stream a receiver reads is the base one plus exactly the sender's change on the direct path
//! (post-attention norm included, computed, not linearised). The receivers' q / k / v are read
//! there. Step B: the base run with only those receiver inputs replaced; everything downstream
//! runs freely. For the logits receiver step A's final residual gives the metric at once.
//!
//! Denoising (the default) = base corrupted, source clean. In grouped-query models keys and values
//! belong to a key/value head shared by a group of query heads, so a receiver's k / v patch is its
//! group's (as in the model itself); q is per head.
//!
//! [`path_patch_one_by_one`] is the reference (two full forwards per sender through hooks, the
//! freezing done by replacing every `hook_attn_out` / `hook_mlp_out`); [`path_patch`] computes the
//! same numbers from the cached base run: the sender's layer once per batch of senders, each
//! receiver layer once, and the layers from the first receiver on.

use crate::heads::{check_heads, Head};
use crate::patching::{Direction, Patcher};
use crate::{AnalysisError, Result};
use candle_core::Tensor;
use persona_lens_engine::{Batch, HookCtx, HookName, HookPoint, Hooks, LogitsAt, Op, Selector};
use serde::{Deserialize, Serialize};

/// Which input of a receiver head is patched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QkvInput {
    Q,
    K,
    V,
}

impl QkvInput {
    pub fn point(self) -> HookPoint {
        match self {
            QkvInput::Q => HookPoint::AttnQ,
            QkvInput::K => HookPoint::AttnK,
            QkvInput::V => HookPoint::AttnV,
        }
    }

    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        let mut out = Vec::new();
        for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let x = match p {
                "q" => QkvInput::Q,
                "k" => QkvInput::K,
                "v" => QkvInput::V,
                o => {
                    return Err(AnalysisError::Invalid(format!(
                        "unknown receiver input '{o}'; use q, k, v or a comma list such as q,k,v"
                    )))
                }
            };
            if !out.contains(&x) {
                out.push(x);
            }
        }
        if out.is_empty() {
            return Err(AnalysisError::Invalid(
                "no receiver input given; use q, k, v or a comma list such as q,k,v".into(),
            ));
        }
        Ok(out)
    }
}

/// Where the sender's effect is allowed to arrive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Receivers {
    /// These heads' inputs (each receiver must come after the sender to receive anything).
    Heads {
        heads: Vec<Head>,
        inputs: Vec<QkvInput>,
    },
    /// The final residual stream (the sender's direct effect on the logits).
    Logits,
}

impl Receivers {
    /// `logits`, or heads such as `L12H2,L15H0` with inputs `q,k,v`.
    pub fn parse(spec: &str, inputs: &str) -> Result<Self> {
        if spec.trim() == "logits" {
            return Ok(Receivers::Logits);
        }
        let heads = spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<Head>>>()?;
        if heads.is_empty() {
            return Err(AnalysisError::Invalid(
                "no receivers given; name heads such as L12H2,L15H0 or 'logits'".into(),
            ));
        }
        Ok(Receivers::Heads {
            heads,
            inputs: QkvInput::parse_list(inputs)?,
        })
    }

    /// One past the last layer a sender may sit in (senders must precede a receiver).
    pub fn sender_layer_end(&self, n_layers: usize) -> usize {
        match self {
            Receivers::Logits => n_layers,
            Receivers::Heads { heads, .. } => heads.iter().map(|h| h.layer).max().unwrap_or(0),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Receivers::Logits => "logits (direct path)".into(),
            Receivers::Heads { heads, inputs } => format!(
                "{} ({})",
                heads
                    .iter()
                    .map(|h| h.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                inputs
                    .iter()
                    .map(|i| format!("{i:?}").to_lowercase())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }

    /// Receiver heads of layer `l` on `input`'s hook, as that hook's head indices (key/value
    /// heads for k and v).
    fn hook_heads(&self, l: usize, input: QkvInput, n_heads: usize, n_kv: usize) -> Vec<usize> {
        let Receivers::Heads { heads, .. } = self else {
            return vec![];
        };
        let mut v: Vec<usize> = heads
            .iter()
            .filter(|h| h.layer == l)
            .map(|h| match input {
                QkvInput::Q => h.head,
                _ => h.head / (n_heads / n_kv).max(1),
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    fn layers(&self) -> Vec<usize> {
        match self {
            Receivers::Logits => vec![],
            Receivers::Heads { heads, .. } => {
                let mut v: Vec<usize> = heads.iter().map(|h| h.layer).collect();
                v.sort_unstable();
                v.dedup();
                v
            }
        }
    }

    fn inputs(&self) -> &[QkvInput] {
        match self {
            Receivers::Logits => &[],
            Receivers::Heads { inputs, .. } => inputs,
        }
    }
}

/// Every head before the last receiver layer: the default sender set.
pub fn all_senders(p: &Patcher, receivers: &Receivers) -> Vec<Head> {
    let cfg = p.model.config();
    (0..receivers.sender_layer_end(cfg.n_layers))
        .flat_map(|layer| (0..cfg.n_heads).map(move |head| Head { layer, head }))
        .collect()
}

fn check(p: &Patcher, senders: &[Head], receivers: &Receivers) -> Result<()> {
    check_heads(p.model, senders)?;
    if let Receivers::Heads { heads, .. } = receivers {
        check_heads(p.model, heads)?;
    }
    let end = receivers.sender_layer_end(p.model.config().n_layers);
    if let Some(s) = senders.iter().find(|s| s.layer >= end) {
        return Err(AnalysisError::Invalid(format!(
            "sender {s} is not before any receiver (the last receiver layer is {end}); pick senders in layers 0..{}",
            end as isize - 1
        )));
    }
    Ok(())
}

fn hn(l: usize, p: HookPoint) -> HookName {
    HookName::block(l, p)
}

/// Reference: per sender, two full forwards through hooks.
pub fn path_patch_one_by_one(
    p: &Patcher,
    senders: &[Head],
    receivers: &Receivers,
    dir: Direction,
) -> Result<Vec<f32>> {
    check(p, senders, receivers)?;
    let cfg = p.model.config();
    let (base, _, base_ids) = p.runs(dir);
    let batch = Batch::left_padded(&[base_ids.to_vec()], p.model.pad_id(), p.model.device())?;
    let mut out = Vec::with_capacity(senders.len());
    for s in senders {
        // Step A: sender from the source, everything else frozen at the base run.
        let mut hooks = Hooks::new();
        let z = p.source_activation(dir, &hn(s.layer, HookPoint::AttnZ))?;
        hooks.intervene(
            hn(s.layer, HookPoint::AttnZ),
            Op::Replace(z),
            Selector::all().heads(vec![s.head]),
        );
        for l in 0..cfg.n_layers {
            if l != s.layer {
                let a = base.hooks.cache.get(&hn(l, HookPoint::AttnOut))?;
                hooks.intervene(hn(l, HookPoint::AttnOut), Op::Replace(a), Selector::all());
            }
            let m = base.hooks.cache.get(&hn(l, HookPoint::MlpOut))?;
            hooks.intervene(hn(l, HookPoint::MlpOut), Op::Replace(m), Selector::all());
        }
        for &l in &receivers.layers() {
            for i in receivers.inputs() {
                hooks.capture(hn(l, i.point()));
            }
        }
        let logits = p
            .model
            .forward(&batch, None, &mut hooks, LogitsAt::Last)?
            .ok_or_else(|| AnalysisError::Invalid("no logits".into()))?;
        if matches!(receivers, Receivers::Logits) {
            out.push(p.eval.of_logits(&logits)?[0]);
            continue;
        }
        // Step B: only the receivers' inputs from step A.
        let mut hooks_b = Hooks::new();
        for &l in &receivers.layers() {
            for &i in receivers.inputs() {
                let heads = receivers.hook_heads(l, i, cfg.n_heads, cfg.n_kv_heads);
                let t = hooks.cache.get(&hn(l, i.point()))?;
                hooks_b.intervene(
                    hn(l, i.point()),
                    Op::Replace(t),
                    Selector::all().heads(heads),
                );
            }
        }
        let logits = p
            .model
            .forward(&batch, None, &mut hooks_b, LogitsAt::Last)?
            .ok_or_else(|| AnalysisError::Invalid("no logits".into()))?;
        out.push(p.eval.of_logits(&logits)?[0]);
    }
    Ok(out)
}

/// Batched path patching from the cached base run; equals [`path_patch_one_by_one`] to float
/// noise. `progress` gets the number of senders done.
pub fn path_patch(
    p: &Patcher,
    senders: &[Head],
    receivers: &Receivers,
    dir: Direction,
    progress: Option<&dyn Fn(usize)>,
) -> Result<Vec<f32>> {
    check(p, senders, receivers)?;
    let mut out = Vec::with_capacity(senders.len());
    for chunk in senders.chunks(p.max_rows.max(1)) {
        out.extend(path_chunk(p, chunk, receivers, dir)?);
        if let Some(f) = progress {
            f(out.len());
        }
    }
    Ok(out)
}

fn path_chunk(
    p: &Patcher,
    senders: &[Head],
    receivers: &Receivers,
    dir: Direction,
) -> Result<Vec<f32>> {
    let dec = &p.model.decoder;
    let cfg = p.model.config();
    let (base, _, _) = p.runs(dir);
    let seq = p.pair.base_len(dir);
    let cc = dec.call_ctx(&[0], 0, seq)?;
    let b = senders.len();
    let base_at = |l: usize, pt: HookPoint| base.hooks.cache.get(&hn(l, pt));
    let rows = |t: Tensor, n: usize| -> Result<Tensor> {
        let mut d = t.dims().to_vec();
        d[0] = n;
        Ok(t.broadcast_as(d)?.contiguous()?)
    };
    let run_block = |l: usize, x: Tensor, hooks: &mut Hooks| -> Result<Tensor> {
        let mut ctx = HookCtx {
            name: hn(l, HookPoint::ResidPre),
            pad: vec![0; x.dim(0)?],
            start: 0,
        };
        Ok(dec.block_forward(l, x, &cc, None, hooks, &mut ctx)?)
    };

    // The sender's change to the residual stream, one row per sender: [b, seq, d].
    let mut delta_rows: Vec<Option<Tensor>> = vec![None; b];
    let mut layers: Vec<usize> = senders.iter().map(|s| s.layer).collect();
    layers.sort_unstable();
    layers.dedup();
    for &l in &layers {
        let idx: Vec<usize> = (0..b).filter(|&i| senders[i].layer == l).collect();
        let z_src = p.source_activation(dir, &hn(l, HookPoint::AttnZ))?;
        let mut hooks = Hooks::new();
        for (r, &i) in idx.iter().enumerate() {
            hooks.intervene(
                hn(l, HookPoint::AttnZ),
                Op::Replace(z_src.clone()),
                Selector::all().rows(vec![r]).heads(vec![senders[i].head]),
            );
        }
        hooks.capture(hn(l, HookPoint::AttnOut));
        run_block(
            l,
            rows(base_at(l, HookPoint::ResidPre)?, idx.len())?,
            &mut hooks,
        )?;
        let a = hooks.cache.get(&hn(l, HookPoint::AttnOut))?;
        let d = a.broadcast_sub(&base_at(l, HookPoint::AttnOut)?)?;
        for (r, &i) in idx.iter().enumerate() {
            delta_rows[i] = Some(d.narrow(0, r, 1)?);
        }
    }
    let delta_rows: Vec<Tensor> = delta_rows.into_iter().map(|d| d.expect("set")).collect();

    if matches!(receivers, Receivers::Logits) {
        let last = base_at(cfg.n_layers - 1, HookPoint::ResidPost)?.narrow(1, seq - 1, 1)?;
        let delta = Tensor::cat(&delta_rows, 0)?.narrow(1, seq - 1, 1)?;
        let x = delta.broadcast_add(&last)?.squeeze(1)?;
        return p.eval.of_resid(dec, &x);
    }

    // Step A at each receiver layer: the base residual plus the change of senders before it.
    let zero = delta_rows[0].zeros_like()?;
    let mut captured: Vec<(usize, QkvInput, Tensor)> = Vec::new();
    for &l in &receivers.layers() {
        let d: Vec<Tensor> = (0..b)
            .map(|i| {
                if senders[i].layer < l {
                    delta_rows[i].clone()
                } else {
                    zero.clone()
                }
            })
            .collect();
        let x = Tensor::cat(&d, 0)?.broadcast_add(&base_at(l, HookPoint::ResidPre)?)?;
        let mut hooks = Hooks::new();
        for i in receivers.inputs() {
            hooks.capture(hn(l, i.point()));
        }
        run_block(l, x, &mut hooks)?;
        for &i in receivers.inputs() {
            captured.push((l, i, hooks.cache.get(&hn(l, i.point()))?));
        }
    }

    // Step B: from the first receiver layer with only the receivers' inputs replaced.
    let first = receivers.layers()[0];
    let mut x = rows(base_at(first, HookPoint::ResidPre)?, b)?;
    for l in first..cfg.n_layers {
        let mut hooks = Hooks::new();
        for (cl, i, t) in captured.iter().filter(|(cl, _, _)| *cl == l) {
            let heads = receivers.hook_heads(*cl, *i, cfg.n_heads, cfg.n_kv_heads);
            hooks.intervene(
                hn(l, i.point()),
                Op::Replace(t.clone()),
                Selector::all().heads(heads),
            );
        }
        x = run_block(l, x, &mut hooks)?;
    }
    let last = x.narrow(1, seq - 1, 1)?.squeeze(1)?;
    p.eval.of_resid(dec, &last)
}
