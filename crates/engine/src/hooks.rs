//! TransformerLens-style hook points: capture into an [`ActivationCache`] and intervene
//! (replace / add / zero / scale / closure) on chosen batch rows, positions and heads.
//!
//! Shapes (b = batch, t = positions in this forward call, h = query heads, hkv = key/value heads):
//! - `hook_embed`, `blocks.{l}.hook_resid_pre|resid_mid|resid_post|attn_out|mlp_out`,
//!   `ln_final.hook_normalized`: `[b, t, d_model]`
//! - `blocks.{l}.attn.hook_q`: `[b, t, h, d_head]` after the q projection, its bias and q-norm,
//!   BEFORE rotary (TransformerLens); `hook_k`: `[b, t, hkv, d_head]` likewise; `hook_v`:
//!   `[b, t, hkv, d_head]`; `attn.hook_rot_q` / `attn.hook_rot_k`: the same AFTER rotary (what
//!   the scores use; rotary models only)
//! - `blocks.{l}.attn.hook_attn_scores`: `[b, h, t_q, t_k]` scaled (and soft-capped) pre-softmax
//!   scores with masked entries at -inf; `hook_pattern`: the softmax of it, same shape
//! - `blocks.{l}.attn.hook_z`: `[b, t, h, d_head]` (per-head value-weighted sum, before `o_proj`)
//! - `blocks.{l}.attn.hook_result`: `[b, t, h, d_model]`, each head's contribution to the residual
//!   stream. Summed over heads it equals `hook_attn_out` exactly. For Gemma the post-attention
//!   RMSNorm is not linear per head: we store `o_proj_h(z_h) * (1 + w) / rms(sum_h o_proj_h(z_h))`,
//!   i.e. each head's share with the norm's per-position scale frozen at its value for the sum.
//!   An intervention on it makes `hook_attn_out` the sum of the (edited) results.
//! - `blocks.{l}.mlp.hook_pre` (gate pre-activation), `mlp.hook_pre_linear` (up projection),
//!   `mlp.hook_post` (`act(gate) * up`, the input of `down_proj`): `[b, t, d_mlp]`
//!
//! Positions in selectors are absolute prompt positions (0 = first token of the prompt, BOS
//! included), whatever the left padding of the batch or the KV-cache offset of this call.

use crate::error::{EngineError, Result};
use candle_core::{DType, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    Embed,
    /// Learned position embeddings (GPT-2 only; never fires on rotary models).
    PosEmbed,
    ResidPre,
    AttnQ,
    AttnK,
    AttnV,
    /// Queries / keys after rotary (TransformerLens `hook_rot_q` / `hook_rot_k`).
    AttnRotQ,
    AttnRotK,
    AttnScores,
    AttnPattern,
    AttnZ,
    AttnResult,
    AttnOut,
    ResidMid,
    MlpPre,
    MlpPreLinear,
    MlpPost,
    MlpOut,
    ResidPost,
    LnFinal,
}

impl HookPoint {
    pub const BLOCK: [HookPoint; 17] = [
        HookPoint::ResidPre,
        HookPoint::AttnQ,
        HookPoint::AttnK,
        HookPoint::AttnV,
        HookPoint::AttnRotQ,
        HookPoint::AttnRotK,
        HookPoint::AttnScores,
        HookPoint::AttnPattern,
        HookPoint::AttnZ,
        HookPoint::AttnResult,
        HookPoint::AttnOut,
        HookPoint::ResidMid,
        HookPoint::MlpPre,
        HookPoint::MlpPreLinear,
        HookPoint::MlpPost,
        HookPoint::MlpOut,
        HookPoint::ResidPost,
    ];

    /// The name after `blocks.{l}.` (block points) or the whole name (global points).
    pub fn suffix(&self) -> &'static str {
        match self {
            HookPoint::Embed => "hook_embed",
            HookPoint::PosEmbed => "hook_pos_embed",
            HookPoint::ResidPre => "hook_resid_pre",
            HookPoint::AttnQ => "attn.hook_q",
            HookPoint::AttnK => "attn.hook_k",
            HookPoint::AttnV => "attn.hook_v",
            HookPoint::AttnRotQ => "attn.hook_rot_q",
            HookPoint::AttnRotK => "attn.hook_rot_k",
            HookPoint::AttnScores => "attn.hook_attn_scores",
            HookPoint::AttnPattern => "attn.hook_pattern",
            HookPoint::AttnZ => "attn.hook_z",
            HookPoint::AttnResult => "attn.hook_result",
            HookPoint::AttnOut => "hook_attn_out",
            HookPoint::ResidMid => "hook_resid_mid",
            HookPoint::MlpPre => "mlp.hook_pre",
            HookPoint::MlpPreLinear => "mlp.hook_pre_linear",
            HookPoint::MlpPost => "mlp.hook_post",
            HookPoint::MlpOut => "hook_mlp_out",
            HookPoint::ResidPost => "hook_resid_post",
            HookPoint::LnFinal => "ln_final.hook_normalized",
        }
    }

    /// Index of the position (query position) axis.
    pub fn pos_axis(&self) -> usize {
        match self {
            HookPoint::AttnScores | HookPoint::AttnPattern => 2,
            _ => 1,
        }
    }

    /// Index of the head axis, for per-head hooks.
    pub fn head_axis(&self) -> Option<usize> {
        match self {
            HookPoint::AttnScores | HookPoint::AttnPattern => Some(1),
            HookPoint::AttnQ
            | HookPoint::AttnK
            | HookPoint::AttnV
            | HookPoint::AttnRotQ
            | HookPoint::AttnRotK
            | HookPoint::AttnZ
            | HookPoint::AttnResult => Some(2),
            _ => None,
        }
    }

    fn bit(&self) -> u32 {
        1u32 << (*self as u32)
    }
}

/// A concrete hook: a point, in a block or global.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HookName {
    pub layer: Option<usize>,
    pub point: HookPoint,
}

impl HookName {
    pub fn block(layer: usize, point: HookPoint) -> Self {
        HookName {
            layer: Some(layer),
            point,
        }
    }
    pub fn global(point: HookPoint) -> Self {
        HookName { layer: None, point }
    }

    /// Parses and range-checks a single (non-glob) hook name.
    pub fn parse(s: &str, n_layers: usize) -> Result<Self> {
        match resolve_hooks(s, n_layers)?.as_slice() {
            [one] => Ok(*one),
            _ => Err(EngineError::UnknownHook(s.into())),
        }
    }
}

impl fmt::Display for HookName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.layer {
            Some(l) => write!(f, "blocks.{l}.{}", self.point.suffix()),
            None => write!(f, "{}", self.point.suffix()),
        }
    }
}

/// Every hook of a model with `n_layers` blocks, in forward order.
pub fn all_hooks(n_layers: usize) -> Vec<HookName> {
    let mut v = vec![
        HookName::global(HookPoint::Embed),
        HookName::global(HookPoint::PosEmbed),
    ];
    for l in 0..n_layers {
        v.extend(HookPoint::BLOCK.iter().map(|p| HookName::block(l, *p)));
    }
    v.push(HookName::global(HookPoint::LnFinal));
    v
}

/// Glob match with `*` (any run of characters) and `?` (one character).
fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    match (pat.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob_match(&pat[1..], s) || (!s.is_empty() && glob_match(pat, &s[1..])),
        (Some(b'?'), Some(_)) => glob_match(&pat[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => glob_match(&pat[1..], &s[1..]),
        _ => false,
    }
}

/// Resolves a comma-separated list of hook names or globs (`blocks.*.hook_resid_post`).
/// Unknown names, globs matching nothing and layers out of range are errors.
pub fn resolve_hooks(pattern: &str, n_layers: usize) -> Result<Vec<HookName>> {
    let all = all_hooks(n_layers);
    let mut out = Vec::new();
    for pat in pattern.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if !pat.contains(['*', '?']) {
            // Give a precise error for an explicit layer out of range.
            if let Some(rest) = pat.strip_prefix("blocks.") {
                if let Some((num, suffix)) = rest.split_once('.') {
                    if let Ok(layer) = num.parse::<usize>() {
                        let known = HookPoint::BLOCK.iter().any(|p| p.suffix() == suffix);
                        if known && layer >= n_layers {
                            return Err(EngineError::LayerOutOfRange {
                                name: pat.into(),
                                layer,
                                n_layers,
                            });
                        }
                    }
                }
            }
        }
        let matched: Vec<HookName> = all
            .iter()
            .filter(|h| glob_match(pat.as_bytes(), h.to_string().as_bytes()))
            .copied()
            .collect();
        if matched.is_empty() {
            return Err(EngineError::UnknownHook(pat.into()));
        }
        for m in matched {
            if !out.contains(&m) {
                out.push(m);
            }
        }
    }
    if out.is_empty() {
        return Err(EngineError::UnknownHook(pattern.into()));
    }
    Ok(out)
}

/// Which batch rows, positions and heads an intervention touches (None = all).
#[derive(Debug, Clone, Default)]
pub struct Selector {
    pub rows: Option<Vec<usize>>,
    pub positions: Option<Vec<usize>>,
    pub heads: Option<Vec<usize>>,
}

impl Selector {
    pub fn all() -> Self {
        Self::default()
    }
    pub fn rows(mut self, r: impl Into<Vec<usize>>) -> Self {
        self.rows = Some(r.into());
        self
    }
    pub fn positions(mut self, p: impl Into<Vec<usize>>) -> Self {
        self.positions = Some(p.into());
        self
    }
    pub fn heads(mut self, h: impl Into<Vec<usize>>) -> Self {
        self.heads = Some(h.into());
        self
    }
    fn is_all(&self) -> bool {
        self.rows.is_none() && self.positions.is_none() && self.heads.is_none()
    }
}

/// What the forward pass is doing when a hook fires.
#[derive(Debug, Clone)]
pub struct HookCtx {
    pub name: HookName,
    /// Left padding of each batch row (index of its first real token).
    pub pad: Vec<usize>,
    /// Index (in the padded sequence) of the first position of this forward call.
    pub start: usize,
}

impl HookCtx {
    /// Absolute prompt position of index `i` of this call in row `r` (None for padding).
    pub fn position(&self, r: usize, i: usize) -> Option<usize> {
        (self.start + i).checked_sub(self.pad[r])
    }
}

pub type HookFn = Arc<dyn Fn(&Tensor, &HookCtx) -> candle_core::Result<Tensor> + Send + Sync>;

#[derive(Clone)]
pub enum Op {
    /// Replace by this tensor (broadcast to the activation's shape).
    Replace(Tensor),
    /// Add this tensor (broadcast).
    Add(Tensor),
    Zero,
    Scale(f64),
    /// Any function of the activation; its output must have the same shape.
    Func(HookFn),
}

#[derive(Clone)]
pub struct Intervention {
    pub hook: HookName,
    pub op: Op,
    pub sel: Selector,
}

/// Captured activations, by hook name. Each forward call appends one chunk per hook.
#[derive(Default, Clone, Debug)]
pub struct ActivationCache {
    chunks: BTreeMap<HookName, Vec<Tensor>>,
    /// Left padding per row for the captured batch.
    pub pad: Vec<usize>,
    /// Real positions per row where rows are right padded (`Model::run_with_cache`); empty for
    /// a single forward's cache, whose rows end at the last position.
    pub lens: Vec<usize>,
}

impl ActivationCache {
    pub fn names(&self) -> Vec<HookName> {
        self.chunks.keys().copied().collect()
    }
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
    /// The activation in the padded layout of the forward call(s), chunks joined along positions.
    pub fn get(&self, name: &HookName) -> Result<Tensor> {
        let chunks = self.chunks.get(name).ok_or_else(|| {
            EngineError::InvalidArgument(format!("hook '{name}' was not captured"))
        })?;
        if chunks.len() == 1 {
            return Ok(chunks[0].clone());
        }
        if matches!(name.point, HookPoint::AttnScores | HookPoint::AttnPattern) {
            return Err(EngineError::InvalidArgument(format!(
                "hook '{name}' was captured over {} incremental steps with different key lengths; capture it in a single forward",
                chunks.len()
            )));
        }
        Ok(Tensor::cat(chunks, name.point.pos_axis())?)
    }
    pub fn get_str(&self, name: &str) -> Result<Tensor> {
        let key = self
            .chunks
            .keys()
            .find(|k| k.to_string() == name)
            .ok_or_else(|| {
                EngineError::InvalidArgument(format!("hook '{name}' was not captured"))
            })?;
        self.get(key)
    }
    /// Row `r` of an activation with padding removed: `[t_real, ...]`, index = prompt position.
    pub fn row(&self, name: &HookName, r: usize) -> Result<Tensor> {
        let t = self.get(name)?.get(r)?;
        let pad = self.pad.get(r).copied().unwrap_or(0);
        let axis = name.point.pos_axis() - 1;
        let len = match self.lens.get(r) {
            Some(&l) => l,
            None => t.dim(axis)? - pad,
        };
        let t = t.narrow(axis, pad, len)?;
        if matches!(name.point, HookPoint::AttnScores | HookPoint::AttnPattern) {
            let klen = match self.lens.get(r) {
                Some(&l) => l,
                None => t.dim(2)? - pad,
            };
            return Ok(t.narrow(2, pad, klen)?);
        }
        Ok(t)
    }
    /// The activation with every row position-aligned: index p = prompt position p, zeros after
    /// the row's last token (right padding). For patterns/scores both position axes are aligned.
    pub fn aligned(&self, name: &HookName) -> Result<Tensor> {
        let full = self.get(name)?;
        let b = full.dim(0)?;
        let rows: Vec<Tensor> = (0..b).map(|r| self.row(name, r)).collect::<Result<_>>()?;
        let axis = name.point.pos_axis() - 1;
        let t = rows
            .iter()
            .map(|x| x.dim(axis))
            .collect::<candle_core::Result<Vec<_>>>()?
            .into_iter()
            .max()
            .unwrap_or(0);
        let padded: Vec<Tensor> = rows
            .into_iter()
            .map(|x| {
                let mut x = x.pad_with_zeros(axis, 0, t - x.dim(axis)?)?;
                if matches!(name.point, HookPoint::AttnScores | HookPoint::AttnPattern) {
                    x = x.pad_with_zeros(2, 0, t - x.dim(2)?)?;
                }
                Ok(x)
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Tensor::stack(&padded, 0)?)
    }

    pub fn insert(&mut self, name: HookName, t: Tensor) {
        self.chunks.entry(name).or_default().push(t);
    }
    pub fn clear(&mut self) {
        self.chunks.clear();
    }
}

/// The hook registry handed to `forward`. Empty hooks cost one integer test per site.
#[derive(Default, Clone)]
pub struct Hooks {
    captures: HashMap<HookName, ()>,
    interventions: Vec<Intervention>,
    /// Bit mask of points wanted per layer (index n_layers = global points).
    wanted: Vec<u32>,
    pub cache: ActivationCache,
    /// Use only ops with a backward pass (for gradients through the forward, e.g. attribution
    /// patching); slightly slower.
    pub differentiable: bool,
    /// Run blocks `0..=l` only and return no logits (TransformerLens's `stop_at_layer = l + 1`):
    /// captures of earlier hooks cost only the blocks they need.
    pub stop_after_block: Option<usize>,
    /// Start at block `l` from its input `[b, t, d]` (TransformerLens's `start_at_layer`): the
    /// embedding and blocks `0..l` are skipped, so their hooks do not fire. The tensor must be
    /// `blocks.l.hook_resid_pre` of an earlier forward over the same ids and padding, with the
    /// same interventions before block `l`; then the results are those of a whole forward. One
    /// forward consumes it.
    pub start_at_block: Option<(usize, Tensor)>,
}

impl Hooks {
    pub fn new() -> Self {
        Self::default()
    }

    fn mark(&mut self, h: HookName) {
        let idx = h.layer.map(|l| l + 1).unwrap_or(0);
        if self.wanted.len() <= idx {
            self.wanted.resize(idx + 1, 0);
        }
        self.wanted[idx] |= h.point.bit();
    }

    pub fn capture(&mut self, h: HookName) -> &mut Self {
        self.captures.insert(h, ());
        self.mark(h);
        self
    }

    pub fn capture_all(&mut self, hs: &[HookName]) -> &mut Self {
        for h in hs {
            self.capture(*h);
        }
        self
    }

    pub fn intervene(&mut self, hook: HookName, op: Op, sel: Selector) -> &mut Self {
        self.interventions.push(Intervention { hook, op, sel });
        self.mark(hook);
        self
    }

    /// Puts `ivs` before this call's own interventions; returns how many (see [`StandingHooks`]).
    fn push_front(&mut self, ivs: &[Intervention]) -> usize {
        for iv in ivs {
            self.mark(iv.hook);
        }
        self.interventions.splice(0..0, ivs.iter().cloned());
        ivs.len()
    }

    pub fn is_captured(&self, h: &HookName) -> bool {
        self.captures.contains_key(h)
    }

    /// Whether anything wants this hook (cheap: one bit test).
    #[inline]
    pub fn wants(&self, h: HookName) -> bool {
        let idx = h.layer.map(|l| l + 1).unwrap_or(0);
        self.wanted.get(idx).is_some_and(|m| m & h.point.bit() != 0)
    }

    /// Whether any hook edits activations (then the forward checks that they stay finite).
    pub fn intervenes(&self) -> bool {
        !self.interventions.is_empty()
    }

    /// The hooks that edit activations, comma separated (for error messages).
    pub fn intervened_hooks(&self) -> String {
        let mut v: Vec<String> = self
            .interventions
            .iter()
            .map(|i| i.hook.to_string())
            .collect();
        v.dedup();
        v.join(", ")
    }

    pub fn has_intervention(&self, h: HookName) -> bool {
        self.interventions.iter().any(|i| i.hook == h)
    }

    /// Runs the interventions registered for `h` (in registration order), then captures.
    pub fn fire(&mut self, h: HookName, x: Tensor, ctx: &HookCtx) -> Result<Tensor> {
        if !self.wants(h) {
            return Ok(x);
        }
        let mut x = x;
        for iv in self.interventions.iter().filter(|i| i.hook == h) {
            x = apply(&x, iv, ctx)?;
        }
        if self.captures.contains_key(&h) {
            self.cache.pad = ctx.pad.clone();
            self.cache.insert(h, x.clone());
        }
        Ok(x)
    }
}

/// Set by [`interrupt_all`]: every model's next entry point fails.
static INTERRUPT_ALL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// [`crate::Model::interrupt`] for every model of the process (a front end's Ctrl-C while a
/// job runs models it loaded itself, such as the whole study).
pub fn interrupt_all(on: bool) {
    INTERRUPT_ALL.store(on, std::sync::atomic::Ordering::SeqCst);
}

/// Interventions that apply to every forward of a model until removed (TransformerLens's
/// `add_hook(..., is_permanent=True)` and `reset_hooks`): a planted feature or head, a standing
/// ablation, a steering vector kept on for a session. They run before each call's own
/// interventions, at every entry point of the decoder (whole forwards, generation with a KV
/// cache, and the block-by-block runs of patching).
///
/// The same entry points read the model's interrupt flag ([`crate::Model::interrupt`]): a front
/// end that runs work on another thread (the Python module, on Ctrl-C) stops it at the next
/// block with [`EngineError::Interrupted`].
#[derive(Default)]
pub struct StandingHooks {
    hooks: std::sync::RwLock<Vec<Intervention>>,
    interrupted: std::sync::atomic::AtomicBool,
}

impl StandingHooks {
    /// Makes every later entry point fail with [`EngineError::Interrupted`] until cleared.
    pub fn set_interrupted(&self, on: bool) {
        self.interrupted
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn is_interrupted(&self) -> bool {
        self.interrupted.load(std::sync::atomic::Ordering::SeqCst)
            || INTERRUPT_ALL.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn add(&self, hook: HookName, op: Op, sel: Selector) {
        self.write().push(Intervention { hook, op, sel });
    }

    pub fn clear(&self) {
        self.write().clear();
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Intervention>> {
        // A panic while holding the lock leaves a valid Vec: keep using it.
        self.hooks.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Intervention>> {
        self.hooks.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` with the standing interventions added to `hooks` (and removed again after,
    /// also on error).
    pub fn around<T>(
        &self,
        hooks: &mut Hooks,
        f: impl FnOnce(&mut Hooks) -> Result<T>,
    ) -> Result<T> {
        if self.is_interrupted() {
            return Err(EngineError::Interrupted);
        }
        let n = {
            let st = self.read();
            if st.is_empty() {
                0
            } else {
                hooks.push_front(&st)
            }
        };
        if n == 0 {
            return f(hooks);
        }
        let r = f(hooks);
        hooks.interventions.drain(0..n);
        r
    }
}

fn apply(x: &Tensor, iv: &Intervention, ctx: &HookCtx) -> Result<Tensor> {
    let new = match &iv.op {
        Op::Replace(v) => v
            .to_dtype(x.dtype())?
            .broadcast_as(x.shape())?
            .contiguous()?,
        Op::Add(v) => x.broadcast_add(&v.to_dtype(x.dtype())?)?,
        Op::Zero => x.zeros_like()?,
        Op::Scale(s) => (x * *s)?,
        Op::Func(f) => {
            let y = f(x, ctx)?;
            if y.shape() != x.shape() {
                return Err(EngineError::InvalidArgument(format!(
                    "hook function on '{}' returned shape {:?}, expected {:?}",
                    iv.hook,
                    y.dims(),
                    x.dims()
                )));
            }
            y
        }
    };
    if iv.sel.is_all() {
        return Ok(new);
    }
    let mask = selector_mask(x, iv, ctx)?;
    Ok(mask.where_cond(&new, x)?)
}

/// A u8 mask with x's shape, 1 where the selector applies.
fn selector_mask(x: &Tensor, iv: &Intervention, ctx: &HookCtx) -> Result<Tensor> {
    let dims = x.dims();
    let b = dims[0];
    let pa = iv.hook.point.pos_axis();
    let t = dims[pa];
    // rows x positions
    let mut rp = vec![0u8; b * t];
    for r in 0..b {
        if iv.sel.rows.as_ref().is_some_and(|rows| !rows.contains(&r)) {
            continue;
        }
        for i in 0..t {
            let ok = match (&iv.sel.positions, ctx.position(r, i)) {
                (None, _) => true,
                (Some(ps), Some(p)) => ps.contains(&p),
                (Some(_), None) => false,
            };
            if ok {
                rp[r * t + i] = 1;
            }
        }
    }
    let dev = x.device();
    let mut shape = vec![1usize; dims.len()];
    shape[0] = b;
    shape[pa] = t;
    let mut m = Tensor::from_vec(rp, (b, t), dev)?.reshape(shape.clone())?;
    if let Some(heads) = &iv.sel.heads {
        let ha = iv.hook.point.head_axis().ok_or_else(|| {
            EngineError::InvalidArgument(format!(
                "hook '{}' has no head axis; drop the head selector",
                iv.hook
            ))
        })?;
        let nh = dims[ha];
        if let Some(bad) = heads.iter().find(|&&h| h >= nh) {
            return Err(EngineError::InvalidArgument(format!(
                "head {bad} out of range for '{}' ({nh} heads)",
                iv.hook
            )));
        }
        let hv: Vec<u8> = (0..nh).map(|h| heads.contains(&h) as u8).collect();
        let mut hs = vec![1usize; dims.len()];
        hs[ha] = nh;
        let hm = Tensor::from_vec(hv, nh, dev)?.reshape(hs)?;
        m = m.broadcast_mul(&hm)?;
    }
    Ok(m.to_dtype(DType::U8)?.broadcast_as(dims)?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_globs() {
        let hs = resolve_hooks("blocks.*.hook_resid_post", 3).unwrap();
        assert_eq!(hs.len(), 3);
        assert_eq!(hs[2].to_string(), "blocks.2.hook_resid_post");
        assert_eq!(
            resolve_hooks("hook_embed,ln_final.hook_normalized", 3)
                .unwrap()
                .len(),
            2
        );
        assert!(matches!(
            resolve_hooks("blocks.7.hook_resid_pre", 3),
            Err(EngineError::LayerOutOfRange { layer: 7, .. })
        ));
        assert!(matches!(
            resolve_hooks("blocks.0.hook_nope", 3),
            Err(EngineError::UnknownHook(_))
        ));
        assert_eq!(all_hooks(2).len(), 3 + 2 * HookPoint::BLOCK.len());
    }
}
