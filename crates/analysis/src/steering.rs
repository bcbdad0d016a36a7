//! Steering through hooks: add `alpha x direction` to the residual stream, project a direction
//! out (directional ablation), or patch the whole activation from a source prompt, at chosen
//! positions. Every op is an `Op::Func` on one hook and reads each row's absolute position from
//! the hook context, so with the KV cache each position is steered exactly once (when it is
//! computed) and a full recompute steers the same positions the same way.

pub use crate::direction::check_direction;
use crate::direction::LayerRef;
use crate::{AnalysisError, Result};
use candle_core::{DType, Tensor, D};
use persona_lens_engine::hooks::HookFn;
use persona_lens_engine::{
    Batch, HookCtx, HookName, HookPoint, Hooks, LogitsAt, Model, Op, Selector, SharedPrefix,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// How the stored direction is scaled before `alpha` multiplies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NormConvention {
    /// As stored (a raw difference of means has the units of the residual stream).
    Raw,
    /// Unit L2 norm: alpha is in residual-stream units.
    Unit,
    /// Unit direction times the mean residual L2 norm at the hook (unsteered prompts, every
    /// position but the first, whose norm is an outlier in Gemma): alpha = fraction of a typical
    /// residual.
    MeanResid,
}

impl NormConvention {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(Self::Raw),
            "unit" => Ok(Self::Unit),
            "mean-resid" => Ok(Self::MeanResid),
            o => Err(AnalysisError::Invalid(format!(
                "unknown norm convention '{o}'; use raw, unit or mean-resid"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Unit => "unit",
            Self::MeanResid => "mean-resid",
        }
    }
}

/// Which positions a steering op touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SteerPositions {
    /// Prompt and generated tokens.
    All,
    /// Prompt tokens only.
    Prompt,
    /// Generated tokens only.
    Generated,
}

impl SteerPositions {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(Self::All),
            "prompt" => Ok(Self::Prompt),
            "generated" => Ok(Self::Generated),
            o => Err(AnalysisError::Invalid(format!(
                "unknown position rule '{o}'; use all, prompt or generated"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Prompt => "prompt",
            Self::Generated => "generated",
        }
    }
}

/// What is done at the hook.
#[derive(Debug, Clone)]
pub enum SteerOp {
    /// x + v (v = alpha x the scaled direction), `[d]`.
    Add(Tensor),
    /// x + v_r with one vector per prompt row, `[rows, d]`: many directions steer one batch
    /// (each prompt repeated once per direction) instead of one generation per direction.
    AddPerRow(Tensor),
    /// x - (x . u) u for the unit direction u `[d]`.
    Ablate(Tensor),
    /// x - (x . u_r) u_r with one unit direction per prompt row, `[rows, d]`.
    AblatePerRow(Tensor),
    /// The activation of a source prompt `[t_src, d]`, end-aligned with each row's prompt
    /// (so the question tokens line up when the persona prefix differs in length); one source
    /// per row. Prompt positions only.
    Patch(Vec<Tensor>),
}

pub fn l2(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

/// The direction scaled by the convention (alpha not applied); `mean_resid_norm` is needed for
/// [`NormConvention::MeanResid`].
pub fn scale_direction(
    v: &[f32],
    conv: NormConvention,
    mean_resid_norm: Option<f64>,
) -> Result<Vec<f32>> {
    let n = l2(v);
    let s = match conv {
        NormConvention::Raw => 1.0,
        NormConvention::Unit => 1.0 / n,
        NormConvention::MeanResid => {
            mean_resid_norm.ok_or_else(|| {
                AnalysisError::Invalid("mean-resid scaling needs the mean residual norm".into())
            })? / n
        }
    };
    Ok(v.iter().map(|&x| (x as f64 * s) as f32).collect())
}

/// Mean L2 norm of the unsteered activation at `hook` over every prompt position but the first.
pub fn mean_resid_norm(model: &Model, prompts: &[Vec<u32>], hook: HookName) -> Result<f64> {
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in prompts.chunks(16) {
        let batch = Batch::left_padded(chunk, model.pad_id(), model.device())?;
        let mut hooks = Hooks::new();
        hooks.capture(hook);
        model.forward(&batch, None, &mut hooks, LogitsAt::None)?;
        let a = hooks.cache.get(&hook)?.to_dtype(DType::F32)?;
        let norms = a.sqr()?.sum(D::Minus1)?.sqrt()?.to_vec2::<f32>()?;
        for (r, row) in norms.iter().enumerate() {
            for &x in row.iter().skip(batch.pad[r] + 1) {
                sum += x as f64;
                n += 1;
            }
        }
    }
    if n == 0 {
        return Err(AnalysisError::Invalid(
            "prompts too short to measure the residual norm (need 2+ tokens)".into(),
        ));
    }
    Ok(sum / n as f64)
}

/// `[b, t, 1]` f32 mask: 1 where row r's position at index i is selected.
fn position_mask(
    x: &Tensor,
    ctx: &HookCtx,
    rule: SteerPositions,
    prompt_lens: &[usize],
) -> candle_core::Result<Tensor> {
    let (b, t) = (x.dim(0)?, x.dim(1)?);
    let mut m = vec![0f32; b * t];
    for r in 0..b {
        let plen = prompt_lens.get(r).copied().unwrap_or(usize::MAX);
        for i in 0..t {
            if let Some(p) = ctx.position(r, i) {
                let on = match rule {
                    SteerPositions::All => true,
                    SteerPositions::Prompt => p < plen,
                    SteerPositions::Generated => p >= plen,
                };
                m[r * t + i] = on as u8 as f32;
            }
        }
    }
    Tensor::from_vec(m, (b, t, 1), x.device())
}

/// An op that carries one entry per prompt (a patch's sources, per-row vectors) carries exactly
/// one per prompt.
fn check_per_prompt(op: &SteerOp, n_prompts: usize) -> Result<()> {
    match op {
        SteerOp::Patch(src) if src.len() != n_prompts => Err(AnalysisError::Invalid(format!(
            "{} source activations for {n_prompts} prompts",
            src.len()
        ))),
        SteerOp::AddPerRow(v) | SteerOp::AblatePerRow(v)
            if v.dims().len() != 2 || v.dims()[0] != n_prompts =>
        {
            Err(AnalysisError::Invalid(format!(
                "per-row steering vectors of shape {:?} for {n_prompts} prompts; give one [d] vector per prompt",
                v.dims()
            )))
        }
        _ => Ok(()),
    }
}

/// Registers `op` at `hook` for a batch whose rows have these prompt lengths (real tokens).
pub fn add_steering(
    hooks: &mut Hooks,
    hook: HookName,
    op: SteerOp,
    rule: SteerPositions,
    prompt_lens: Vec<usize>,
) -> Result<()> {
    if matches!(op, SteerOp::Patch(_)) && rule != SteerPositions::Prompt {
        return Err(AnalysisError::Invalid(
            "patching from a source prompt covers prompt positions only; steer the prompt positions (positions = prompt)"
                .into(),
        ));
    }
    check_per_prompt(&op, prompt_lens.len())?;
    let f: HookFn = Arc::new(move |x: &Tensor, ctx: &HookCtx| {
        let mask = position_mask(x, ctx, rule, &prompt_lens)?.to_dtype(x.dtype())?;
        match &op {
            SteerOp::Add(v) => {
                let v = v.to_dtype(x.dtype())?.reshape((1, 1, ()))?;
                x.broadcast_add(&mask.broadcast_mul(&v)?)
            }
            SteerOp::AddPerRow(v) => {
                let v = v.to_dtype(x.dtype())?.unsqueeze(1)?; // [b, 1, d]
                x.broadcast_add(&mask.broadcast_mul(&v)?)
            }
            SteerOp::Ablate(u) | SteerOp::AblatePerRow(u) => {
                let u = match u.rank() {
                    1 => u.to_dtype(x.dtype())?.reshape((1, 1, ()))?,
                    _ => u.to_dtype(x.dtype())?.unsqueeze(1)?, // [b, 1, d]
                };
                let proj = x.broadcast_mul(&u)?.sum_keepdim(D::Minus1)?; // [b,t,1]
                x.broadcast_sub(&proj.broadcast_mul(&mask)?.broadcast_mul(&u)?)
            }
            SteerOp::Patch(src) => {
                let (b, t, d) = x.dims3()?;
                let mut rows = Vec::with_capacity(b);
                for (r, s) in src.iter().enumerate() {
                    let ts = s.dim(0)?;
                    let plen = prompt_lens[r];
                    // Source row for each index of this call (end-aligned), else keep x.
                    let mut pieces = Vec::with_capacity(t);
                    for i in 0..t {
                        let keep = x.narrow(0, r, 1)?.narrow(1, i, 1)?;
                        let srow = ctx.position(r, i).and_then(|p| {
                            (p < plen).then_some(())?;
                            (p + ts).checked_sub(plen)
                        });
                        match srow {
                            Some(j) if j < ts => pieces
                                .push(s.narrow(0, j, 1)?.reshape((1, 1, d))?.to_dtype(x.dtype())?),
                            _ => pieces.push(keep),
                        }
                    }
                    rows.push(Tensor::cat(&pieces, 1)?);
                }
                Tensor::cat(&rows, 0)
            }
        }
    });
    hooks.intervene(hook, Op::Func(f), Selector::all());
    Ok(())
}

/// One prompt to steer, with what the record should say about it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SteerPrompt {
    pub id: String,
    /// Persona class (`novice`, `expert`, ... or `unknown` for a bare prompts file).
    pub persona: String,
    pub topic: String,
    pub text: String,
    /// The paired prompt of the other persona (same question and template), the source of
    /// `--mode patch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paired_text: Option<String>,
}

/// The activation at `hook` of each text, `[t, d]` per text (the source of a patch).
pub fn source_activations(
    model: &Model,
    texts: &[String],
    chat: bool,
    hook: HookName,
) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(texts.len());
    for t in texts {
        let ids = model.encode_prompt(t, chat)?;
        let b = Batch::left_padded(std::slice::from_ref(&ids), model.pad_id(), model.device())?;
        let mut h = Hooks::new();
        h.capture(hook);
        model.forward(&b, None, &mut h, LogitsAt::None)?;
        out.push(h.cache.get(&hook)?.get(0)?);
    }
    Ok(out)
}

/// One steered generation: `patched_outputs.jsonl` holds one per prompt x layer x alpha.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SteerRecord {
    pub model: String,
    pub prompt_id: String,
    pub persona: String,
    pub topic: String,
    pub prompt: String,
    pub chat: bool,
    /// The `--layer` value and the hook it names.
    pub layer: usize,
    pub hook: String,
    pub alpha: f64,
    /// `add` or `ablate`.
    pub mode: String,
    pub positions: String,
    /// Norm convention of the direction before alpha (`raw`, `unit`, `mean-resid`).
    pub norm: String,
    /// L2 norm of the scaled direction (alpha = 1), residual-stream units.
    pub direction_scale: f64,
    /// Mean residual L2 norm at the hook (unsteered prompts), for reference.
    pub mean_resid_norm: f64,
    pub direction_source: String,
    pub seed: u64,
    pub sampling: serde_json::Value,
    pub max_new_tokens: usize,
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub stopped_on_eos: bool,
}

impl SteerRecord {
    /// The record as the autorater reads it.
    pub fn answer(&self) -> persona_lens_rate::Answer {
        persona_lens_rate::Answer {
            text: self.text.clone(),
            model: Some(self.model.clone()),
            prompt_id: self.prompt_id.clone(),
            persona: self.persona.clone(),
            topic: self.topic.clone(),
            prompt: self.prompt.clone(),
            layer: Some(self.layer as i64),
            alpha: Some(self.alpha),
            mode: self.mode.clone(),
            prompt_ids: self.prompt_ids.clone(),
            generated_ids: self.generated_ids.clone(),
        }
    }
}

/// Generates for `prompts` (batches of `batch_size`) with `op` at `hook` (None = unsteered).
pub fn steered_generate(
    model: &Model,
    prompts: &[Vec<u32>],
    steer: Option<(HookName, &SteerOp, SteerPositions)>,
    opts: &persona_lens_engine::GenerateOptions,
    batch_size: usize,
    progress: &dyn Fn(usize),
) -> Result<Vec<persona_lens_engine::Generation>> {
    let mut out = Vec::with_capacity(prompts.len());
    let bs = batch_size.max(1);
    if let Some((_, op, _)) = steer {
        // Before slicing per batch below.
        check_per_prompt(op, prompts.len())?;
    }
    for (ci, chunk) in prompts.chunks(bs).enumerate() {
        let mut hooks = Hooks::new();
        // A patch and per-row vectors carry one entry per prompt: this chunk's slice.
        let op = match steer {
            Some((hook, op, rule)) => {
                let op = match op {
                    SteerOp::Patch(all) => {
                        SteerOp::Patch(all[ci * bs..ci * bs + chunk.len()].to_vec())
                    }
                    SteerOp::AddPerRow(all) => {
                        SteerOp::AddPerRow(all.narrow(0, ci * bs, chunk.len())?)
                    }
                    o => o.clone(),
                };
                Some((hook, op, rule))
            }
            None => None,
        };
        if let Some((hook, op, rule)) = &op {
            add_steering(
                &mut hooks,
                *hook,
                op.clone(),
                *rule,
                chunk.iter().map(Vec::len).collect(),
            )?;
        }
        let prefix = match opts.use_kv_cache {
            true => shared_prompt_prefix(model, chunk, op.as_ref())?,
            false => None,
        };
        out.extend(persona_lens_engine::generate_after_prefix(
            model,
            chunk,
            opts,
            &mut hooks,
            prefix.as_ref().map(|(p, g)| (p, g.as_slice())),
        )?);
        progress(chunk.len());
    }
    Ok(out)
}

/// The chat template's prefix that every prompt of `chunk` starts with, run once per distinct
/// edit (the unsteered run and a vector added to every row: one prefix row; per-row vectors: one
/// prefix row per distinct vector), with each prompt's group; `None` where nothing is shared
/// ([`SharedPrefix::for_row_groups`]) or the edit differs by prompt there (a patch's sources).
fn shared_prompt_prefix(
    model: &Model,
    chunk: &[Vec<u32>],
    op: Option<&(HookName, SteerOp, SteerPositions)>,
) -> Result<Option<(SharedPrefix, Vec<usize>)>> {
    // Rows with bitwise-equal vectors share a prefix row.
    let (groups, prefix_op) = match op {
        Some((_, SteerOp::Patch(_), _)) => return Ok(None),
        Some((_, SteerOp::AddPerRow(v), _)) => {
            let rows = v.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            let bits = |r: &[f32]| r.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            // Each group's vector bits and the first row holding it.
            let mut distinct: Vec<(Vec<u32>, u32)> = Vec::new();
            let mut group_of_row = Vec::with_capacity(rows.len());
            for (r, row) in rows.iter().enumerate() {
                let key = bits(row);
                let g = match distinct.iter().position(|(d, _)| *d == key) {
                    Some(g) => g,
                    None => {
                        distinct.push((key, r as u32));
                        distinct.len() - 1
                    }
                };
                group_of_row.push(g);
            }
            let firsts: Vec<u32> = distinct.iter().map(|&(_, r)| r).collect();
            let ix = Tensor::new(firsts.as_slice(), v.device())?;
            (
                group_of_row,
                Some(SteerOp::AddPerRow(v.index_select(&ix, 0)?)),
            )
        }
        Some((_, o, _)) => (vec![0; chunk.len()], Some(o.clone())),
        None => (vec![0; chunk.len()], None),
    };
    let n_groups = groups.iter().max().map_or(1, |g| g + 1);
    let mut hooks = Hooks::new();
    if let (Some((hook, _, rule)), Some(o)) = (op, prefix_op) {
        // The prefix lies before every prompt's end: a prompt position for each position rule.
        add_steering(&mut hooks, *hook, o, *rule, vec![usize::MAX; n_groups])?;
    }
    Ok(SharedPrefix::for_row_groups(model, chunk, n_groups, &mut hooks)?.map(|p| (p, groups)))
}

/// A direction ready to steer with: where it applies and where it came from.
#[derive(Debug, Clone)]
pub struct LoadedDirection {
    pub hook: HookName,
    /// The residual row (see [`crate::resid_rows`]).
    pub row: usize,
    pub vector: Vec<f32>,
    pub source: String,
}

/// How a steering grid changes the residual stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SteerMode {
    /// `x + alpha v`.
    Add,
    /// Project the direction out (alpha ignored).
    Ablate,
    /// The paired prompt's whole activation at the layer, end-aligned, prompt positions only.
    Patch,
}

impl SteerMode {
    pub fn name(self) -> &'static str {
        match self {
            SteerMode::Add => "add",
            SteerMode::Ablate => "ablate",
            SteerMode::Patch => "patch",
        }
    }
}

impl SteerMode {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "add" => Ok(SteerMode::Add),
            "ablate" => Ok(SteerMode::Ablate),
            "patch" => Ok(SteerMode::Patch),
            o => Err(AnalysisError::Invalid(format!(
                "unknown steering mode '{o}'; use add, ablate or patch"
            ))),
        }
    }
}

/// A layer x alpha steering experiment: per layer value the direction loaded there (for
/// `Patch`, one that only names the hook), the strengths, and how they act.
pub struct SteerGrid<'a> {
    /// (the layer value the records report, the direction at it)
    pub directions: Vec<(usize, LoadedDirection)>,
    /// Strengths (ablate and patch run once, at 1).
    pub alphas: Vec<f64>,
    pub mode: SteerMode,
    pub norm: NormConvention,
    pub positions: SteerPositions,
    pub gen: &'a persona_lens_engine::GenerateOptions,
    pub batch_size: usize,
    /// The sampling seed, recorded with each answer.
    pub seed: u64,
}

/// Runs the grid over the prompts: one steered generation per (layer, alpha, prompt), records
/// in that order. `progress` is told of each finished generation.
pub fn run_grid(
    model: &Model,
    prompts: &[SteerPrompt],
    chat: bool,
    grid: &SteerGrid,
    progress: &dyn Fn(usize),
) -> Result<Vec<SteerRecord>> {
    let ids: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| model.encode_prompt(&p.text, chat))
        .collect::<std::result::Result<_, _>>()?;
    let sampling = serde_json::to_value(&grid.gen.sampling)
        .map_err(|e| AnalysisError::Invalid(format!("sampling options: {e}")))?;
    let mut records = Vec::new();
    for (layer, d) in &grid.directions {
        let mrn = mean_resid_norm(model, &ids, d.hook)?;
        let scaled = scale_direction(&d.vector, grid.norm, Some(mrn))?;
        let scale = l2(&scaled);
        let added = |alpha: f64| -> Vec<f32> {
            scaled.iter().map(|x| (*x as f64 * alpha) as f32).collect()
        };
        // Generations per alpha, in the grid's order. Added vectors: every alpha of the layer
        // in one generation (row a * prompts + p steered by alpha a's vector), since decoding
        // more rows per step costs little more than decoding a few.
        let per_alpha: Vec<Vec<persona_lens_engine::Generation>> = match grid.mode {
            SteerMode::Add => {
                let rows: Vec<Vec<u32>> = grid.alphas.iter().flat_map(|_| ids.clone()).collect();
                let flat: Vec<f32> = grid
                    .alphas
                    .iter()
                    .flat_map(|&a| {
                        let v = added(a);
                        ids.iter().flat_map(move |_| v.clone())
                    })
                    .collect();
                let op = SteerOp::AddPerRow(Tensor::from_vec(
                    flat,
                    (rows.len(), scaled.len()),
                    model.device(),
                )?);
                let gens = steered_generate(
                    model,
                    &rows,
                    Some((d.hook, &op, grid.positions)),
                    grid.gen,
                    grid.batch_size.max(RANDOM_DIRECTION_ROWS),
                    progress,
                )?;
                gens.chunks(ids.len().max(1)).map(<[_]>::to_vec).collect()
            }
            SteerMode::Patch | SteerMode::Ablate => grid
                .alphas
                .iter()
                .map(|_| {
                    let op = match grid.mode {
                        SteerMode::Patch => {
                            let texts: Vec<String> = prompts
                                .iter()
                                .map(|p| p.paired_text.clone().unwrap_or_default())
                                .collect();
                            SteerOp::Patch(source_activations(model, &texts, chat, d.hook)?)
                        }
                        _ => {
                            let unit = scale_direction(&d.vector, NormConvention::Unit, None)?;
                            SteerOp::Ablate(Tensor::new(unit.as_slice(), model.device())?)
                        }
                    };
                    steered_generate(
                        model,
                        &ids,
                        Some((d.hook, &op, grid.positions)),
                        grid.gen,
                        grid.batch_size,
                        progress,
                    )
                })
                .collect::<Result<_>>()?,
        };
        for (&alpha, gens) in grid.alphas.iter().zip(per_alpha) {
            for (p, g) in prompts.iter().zip(gens) {
                let text = model.tokenizer.decode(&g.generated_ids, true)?;
                records.push(SteerRecord {
                    model: model.info.name.clone(),
                    prompt_id: p.id.clone(),
                    persona: p.persona.clone(),
                    topic: p.topic.clone(),
                    prompt: p.text.clone(),
                    chat,
                    layer: *layer,
                    hook: d.hook.to_string(),
                    alpha,
                    mode: grid.mode.name().into(),
                    positions: grid.positions.name().into(),
                    norm: grid.norm.name().into(),
                    direction_scale: scale,
                    mean_resid_norm: mrn,
                    direction_source: d.source.clone(),
                    seed: grid.seed,
                    sampling: sampling.clone(),
                    max_new_tokens: grid.gen.max_new_tokens,
                    prompt_ids: g.prompt_ids,
                    stopped_on_eos: g.stopped_on.is_some(),
                    generated_ids: g.generated_ids,
                    text,
                });
            }
        }
    }
    Ok(records)
}

/// Loads a direction from `persona-lens direction` output (`directions.safetensors`, needs
/// `layer`; `persona_direction.npy` with its JSON sidecar) or a llama.cpp control vector
/// (`.gguf`, needs `layer`, a block output).
pub fn load_direction(
    path: &std::path::Path,
    layer: Option<LayerRef>,
    kind: crate::direction::DirectionKind,
    n_layers: usize,
) -> Result<LoadedDirection> {
    use crate::direction::DirectionSet;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let need_layer = || {
        AnalysisError::Invalid(format!(
            "{} holds a direction per layer; choose a layer",
            path.display()
        ))
    };
    let row_of = |l: LayerRef| -> Result<(usize, HookName)> { Ok((l.row(), l.hook(n_layers)?)) };
    match ext.as_str() {
        "safetensors" => {
            let l = layer.ok_or_else(need_layer)?;
            let (row, hook) = row_of(l)?;
            let set = DirectionSet::load(path)?;
            let (_, v) = set.at_row(row, kind)?;
            Ok(LoadedDirection {
                hook,
                row,
                vector: v,
                source: format!(
                    "{} ({kind:?}, residual row {row}, model {})",
                    path.display(),
                    set.meta.model
                ),
            })
        }
        "npy" => {
            let (v, shape) = crate::npy::read(path)?;
            if shape.len() != 1 {
                return Err(AnalysisError::Invalid(format!(
                    "{} has shape {shape:?}; a direction is one vector [d_model]",
                    path.display()
                )));
            }
            let side = path.with_extension("json");
            let side_row = std::fs::read_to_string(&side)
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .and_then(|j| j["resid_index"].as_u64())
                .map(|r| r as usize);
            let (row, hook) = match (layer, side_row) {
                (Some(l), _) => row_of(l)?,
                (None, Some(r)) => row_of(LayerRef::ResidRow(r))?,
                (None, None) => {
                    return Err(AnalysisError::Invalid(format!(
                        "{} has no sidecar {} naming its layer; choose a layer",
                        path.display(),
                        side.display()
                    )))
                }
            };
            Ok(LoadedDirection {
                hook,
                row,
                vector: v,
                source: format!("{} (residual row {row})", path.display()),
            })
        }
        "gguf" => {
            let at = layer.ok_or_else(need_layer)?;
            // llama.cpp adds direction.{l} to the output of block l = residual row l + 1.
            let l = at.block().ok_or_else(|| {
                AnalysisError::Invalid(format!(
                    "{}: a control vector acts on a block's output; {at} is the embeddings",
                    path.display()
                ))
            })?;
            let cv = crate::control_vector::read(path)?;
            let v = cv.layer(l)?;
            let (row, hook) = row_of(at)?;
            Ok(LoadedDirection {
                hook,
                row,
                vector: v,
                source: format!(
                    "{} (control vector direction.{l}, model hint {})",
                    path.display(),
                    cv.model_hint
                ),
            })
        }
        _ => Err(AnalysisError::Invalid(format!(
            "{}: unknown direction file; use directions.safetensors or persona_direction.npy from `persona-lens direction`, or a control-vector .gguf",
            path.display()
        ))),
    }
}

/// One greedy answer and its scores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScoredAnswer {
    pub text: String,
    /// Flesch-Kincaid grade (None: too short to score).
    pub grade: Option<f64>,
    /// Perplexity under the unsteered model (exp of nats per token), where asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
}

/// A steering vector against its controls on one set of prompts: the unsteered answers, the
/// steered answers, and the answers steered by norm-matched random directions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirectionVsRandom {
    pub hook: String,
    /// L2 norm of the steering vector (alpha included); every random direction has it too.
    pub norm: f64,
    pub unsteered: Vec<ScoredAnswer>,
    pub steered: Vec<ScoredAnswer>,
    /// `[direction][prompt]` grades under each random direction.
    pub random_grades: Vec<Vec<Option<f64>>>,
}

impl DirectionVsRandom {
    /// Per prompt `(prompt index, steered grade - unsteered grade)` for prompts where both score.
    pub fn grade_shifts(&self) -> Vec<(usize, f64)> {
        shifts(
            &self.unsteered,
            &self.steered.iter().map(|a| a.grade).collect::<Vec<_>>(),
        )
    }

    /// Mean grade shift of each random direction (prompts where both score).
    pub fn random_mean_shifts(&self) -> Vec<f64> {
        self.random_grades
            .iter()
            .map(|g| {
                let s = shifts(&self.unsteered, g);
                s.iter().map(|x| x.1).sum::<f64>() / s.len().max(1) as f64
            })
            .collect()
    }
}

fn shifts(base: &[ScoredAnswer], other: &[Option<f64>]) -> Vec<(usize, f64)> {
    base.iter()
        .zip(other)
        .enumerate()
        .filter_map(|(i, (b, o))| Some((i, (*o)? - b.grade?)))
        .collect()
}

/// `n` Gaussian random directions `[d]`, each scaled to L2 norm `norm` (seeded).
pub fn random_directions(d: usize, n: usize, norm: f64, seed: u64) -> Vec<Vec<f32>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let v: Vec<f64> = (0..d)
                .map(|_| {
                    // Box-Muller: a standard normal from two uniforms.
                    let u1: f64 = rng.random_range(1e-12..1.0);
                    let u2: f64 = rng.random_range(0.0..1.0);
                    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
                })
                .collect();
            let n2 = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter().map(|x| (x / n2 * norm) as f32).collect()
        })
        .collect()
}

/// Most rows per generation batch where many vectors steer the same prompts (random directions x
/// prompts, a grid layer's alphas x prompts, an unsteered and a steered copy of each prompt).
pub const RANDOM_DIRECTION_ROWS: usize = 192;

/// Greedy answers to `prompts` unsteered, steered by `vector` (added at `hook`, `positions`), and
/// steered by `n_random` random directions of the same norm (seeded), graded by Flesch-Kincaid;
/// the unsteered and steered answers also get their perplexity under the unsteered model.
#[allow(clippy::too_many_arguments)]
pub fn steer_against_random(
    model: &Model,
    prompts: &[Vec<u32>],
    hook: HookName,
    vector: &[f32],
    positions: SteerPositions,
    n_random: usize,
    seed: u64,
    opts: &persona_lens_engine::GenerateOptions,
    batch_size: usize,
    progress: &dyn Fn(usize),
) -> Result<DirectionVsRandom> {
    let norm = vector
        .iter()
        .map(|x| (*x as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let dirs = random_directions(vector.len(), n_random, norm, seed);
    let np = prompts.len();
    if np == 0 {
        return Ok(DirectionVsRandom {
            hook: hook.to_string(),
            norm,
            unsteered: vec![],
            steered: vec![],
            random_grades: vec![vec![]; dirs.len()],
        });
    }
    // One generation for everything: row p unsteered (its zero vector adds nothing), row np + p
    // steered by `vector`, row (2 + j) * np + p by random direction j. Decoding many rows at
    // once costs little more per step than decoding a few, so this is several times faster
    // than one generation per direction.
    let zero = vec![0f32; vector.len()];
    let vectors: Vec<&[f32]> = [zero.as_slice(), vector]
        .into_iter()
        .chain(dirs.iter().map(Vec::as_slice))
        .collect();
    let rows: Vec<Vec<u32>> = vectors.iter().flat_map(|_| prompts.to_vec()).collect();
    let flat: Vec<f32> = vectors
        .iter()
        .flat_map(|v| prompts.iter().flat_map(move |_| v.iter().copied()))
        .collect();
    let per_row = SteerOp::AddPerRow(Tensor::from_vec(
        flat,
        (rows.len(), vector.len()),
        model.device(),
    )?);
    let gens = steered_generate(
        model,
        &rows,
        Some((hook, &per_row, positions)),
        opts,
        batch_size.max(RANDOM_DIRECTION_ROWS),
        progress,
    )?;
    // Perplexity under the unsteered model for the unsteered and steered answers.
    let pairs: Vec<(&[u32], &[u32])> = rows[..2 * np]
        .iter()
        .zip(&gens)
        .map(|(p, g)| (p.as_slice(), g.generated_ids.as_slice()))
        .collect();
    let mut perplexities = persona_lens_rate::perplexities(model, &pairs)
        .map_err(|e| AnalysisError::Invalid(e.to_string()))?
        .into_iter();
    let mut scored = gens
        .iter()
        .map(|g| {
            let text = model.tokenizer.decode(&g.generated_ids, true)?;
            Ok(ScoredAnswer {
                grade: persona_lens_rate::readability::complexity_grade(&text),
                text,
                perplexity: perplexities.next().flatten().map(|x| x.1),
            })
        })
        .collect::<Result<Vec<ScoredAnswer>>>()?;
    let rest = scored.split_off(2 * np);
    let steered = scored.split_off(np);
    Ok(DirectionVsRandom {
        hook: hook.to_string(),
        norm,
        unsteered: scored,
        steered,
        random_grades: rest
            .chunks(np)
            .map(|c| c.iter().map(|a| a.grade).collect())
            .collect(),
    })
}

/// The last-position readout `mean(logit[expert]) - mean(logit[simple])` (logits) of each prompt,
/// with `op` at `hook` on every position (None: the unedited model); batches of 16.
pub fn readout_with(
    model: &Model,
    prompts: &[Vec<u32>],
    edit: Option<(HookName, &SteerOp)>,
    expert: &[u32],
    simple: &[u32],
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(16) {
        let mut hooks = Hooks::new();
        if let Some((hook, op)) = edit {
            add_steering(
                &mut hooks,
                hook,
                op.clone(),
                SteerPositions::All,
                chunk.iter().map(Vec::len).collect(),
            )?;
        }
        let b = Batch::left_padded(chunk, model.pad_id(), model.device())?;
        out.extend(readouts(model, &b, &mut hooks, (expert, simple))?);
    }
    Ok(out)
}

/// Each row's last-position readout (mean logit of `expert` words minus mean logit of `simple`
/// words) in one forward of `batch` with `hooks`.
fn readouts(
    model: &Model,
    batch: &Batch,
    hooks: &mut Hooks,
    words: (&[u32], &[u32]),
) -> Result<Vec<f64>> {
    let logits = model
        .forward(batch, None, hooks, LogitsAt::Last)?
        .ok_or_else(|| AnalysisError::Invalid("no logits".into()))?;
    readouts_of(&logits, words)
}

/// [`readouts`] of last-position logits `[rows, vocab]`.
fn readouts_of(logits: &Tensor, (expert, simple): (&[u32], &[u32])) -> Result<Vec<f64>> {
    let mean = |row: &[f32], ids: &[u32]| {
        ids.iter().map(|&i| row[i as usize] as f64).sum::<f64>() / ids.len().max(1) as f64
    };
    let logits: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
    Ok(logits
        .iter()
        .map(|r| mean(r, expert) - mean(r, simple))
        .collect())
}

/// Rows (prompts x directions) per forward of [`ablation_against_random`].
pub const ABLATION_DIRECTION_ROWS: usize = 96;

/// Directional ablation against random directions: how much projecting `direction` out at
/// `hook` (every position) shrinks the expert-minus-novice readout gap, per prompt (expert
/// prompts: intact minus ablated; novice prompts: ablated minus intact), and the mean of the same
/// for each of `n_random` random unit directions (seeded).
pub struct AblationVsRandom {
    /// Per prompt (expert prompts first, then novice) the gap reduction (logits).
    pub reductions: Vec<f64>,
    /// Mean gap reduction of each random direction.
    pub random_means: Vec<f64>,
    /// Expert-minus-novice mean readout, intact (logits).
    pub gap_intact: f64,
}

#[allow(clippy::too_many_arguments)]
pub fn ablation_against_random(
    model: &Model,
    expert_prompts: &[Vec<u32>],
    novice_prompts: &[Vec<u32>],
    hook: HookName,
    direction: &[f32],
    n_random: usize,
    seed: u64,
    words: (&[u32], &[u32]),
) -> Result<AblationVsRandom> {
    ablation_against_random_grouped(
        model,
        (expert_prompts, novice_prompts),
        hook,
        direction,
        n_random,
        seed,
        words,
        ABLATION_DIRECTION_ROWS,
    )
}

/// [`ablation_against_random`] with at most `max_rows` rows per forward. Every prompt (expert and
/// novice) runs intact once, keeping the residual entering `hook`'s block; the ablations then
/// run from that block only (nothing before it changes), several directions per forward, each
/// row projecting out its own direction. Equal to one full forward per direction and prompt set
/// within float rounding (different padding and batch shapes).
#[allow(clippy::too_many_arguments)]
pub fn ablation_against_random_grouped(
    model: &Model,
    (expert_prompts, novice_prompts): (&[Vec<u32>], &[Vec<u32>]),
    hook: HookName,
    direction: &[f32],
    n_random: usize,
    seed: u64,
    words: (&[u32], &[u32]),
    max_rows: usize,
) -> Result<AblationVsRandom> {
    let n_expert = expert_prompts.len();
    let prompts: Vec<Vec<u32>> = expert_prompts
        .iter()
        .chain(novice_prompts)
        .cloned()
        .collect();
    let unit = scale_direction(direction, NormConvention::Unit, None)?;
    let randoms = random_directions(direction.len(), n_random, 1.0, seed);
    if prompts.is_empty() {
        // Means over no prompts count as 0, as one forward per direction gave them.
        return Ok(AblationVsRandom {
            reductions: vec![],
            random_means: vec![0.0; randoms.len()],
            gap_intact: 0.0,
        });
    }
    let batch = Batch::left_padded(&prompts, model.pad_id(), model.device())?;
    // Blocks before the hook's own run the same for every direction: start there (a global
    // hook such as the embeddings starts at block 0, from the ids).
    let first = hook.layer;
    let entry = first.map(|l| HookName::block(l, HookPoint::ResidPre));
    let mut hooks = Hooks::new();
    if let Some(h) = entry {
        hooks.capture(h);
    }
    let intact = readouts(model, &batch, &mut hooks, words)?;
    let resid = entry.map(|h| hooks.cache.get(&h)).transpose()?;
    let n = prompts.len();
    let per_forward = (max_rows / n).max(1);
    let directions: Vec<&[f32]> = std::iter::once(unit.as_slice())
        .chain(randoms.iter().map(Vec::as_slice))
        .collect();
    let d = direction.len();
    let plen = persona_lens_engine::prefix::common_prefix_len(&prompts);
    // Row k * n + p: prompt p with direction k of the group.
    let mut ablated: Vec<Vec<f64>> = Vec::with_capacity(directions.len());
    for group in directions.chunks(per_forward) {
        let k = group.len();
        let units = |per: usize| -> Result<SteerOp> {
            let flat: Vec<f32> = group
                .iter()
                .flat_map(|u| (0..per).flat_map(move |_| u.iter().copied()))
                .collect();
            Ok(SteerOp::AblatePerRow(Tensor::from_vec(
                flat,
                (k * per, d),
                model.device(),
            )?))
        };
        // The common prefix (the chat template's system turn) once per direction: its keys and
        // values, ablated by that direction, stand in for every prompt's first columns.
        let prefix = match plen >= persona_lens_engine::prefix::MIN_SHARED_PREFIX {
            true => {
                let mut phooks = Hooks::new();
                add_steering(
                    &mut phooks,
                    hook,
                    units(1)?,
                    SteerPositions::All,
                    vec![plen; k],
                )?;
                if let (Some(l), Some(x)) = (first, &resid) {
                    let row0 = x.get(0)?.narrow(0, batch.pad[0], plen)?.unsqueeze(0)?;
                    phooks.start_at_block = Some((l, row0.repeat((k, 1, 1))?));
                }
                SharedPrefix::for_row_groups(model, &prompts, k, &mut phooks)?
            }
            false => None,
        };
        let rows: Vec<u32> = (0..k).flat_map(|_| 0..n as u32).collect();
        let rows = Tensor::new(rows.as_slice(), model.device())?;
        let b = Batch {
            ids: batch.ids.index_select(&rows, 0)?,
            pad: (0..k).flat_map(|_| batch.pad.iter().copied()).collect(),
            lens: (0..k).flat_map(|_| batch.lens.iter().copied()).collect(),
        };
        let width = prefix
            .as_ref()
            .and_then(|p| p.width_for(&b, &vec![usize::MAX; k * n]));
        let group_of_row: Vec<usize> = (0..k * n).map(|r| r / n).collect();
        let (mut kv, rest) = match (&prefix, width) {
            (Some(p), Some(w)) => {
                let (kv, rest) = p.split(&b, w, &group_of_row)?;
                (Some(kv), rest)
            }
            _ => (None, b.clone()),
        };
        let skipped = width.unwrap_or(0);
        let mut hooks = Hooks::new();
        add_steering(
            &mut hooks,
            hook,
            units(n)?,
            SteerPositions::All,
            b.lens.clone(),
        )?;
        if let (Some(l), Some(x)) = (first, &resid) {
            let t = x.dim(1)?;
            let x = x.index_select(&rows, 0)?.narrow(1, skipped, t - skipped)?;
            hooks.start_at_block = Some((l, x));
        }
        let logits = model
            .forward(&rest, kv.as_mut(), &mut hooks, LogitsAt::Last)?
            .ok_or_else(|| AnalysisError::Invalid("no logits".into()))?;
        let r = readouts_of(&logits, words)?;
        ablated.extend(r.chunks(n).map(<[f64]>::to_vec));
    }
    // Per prompt: expert prompts intact minus ablated, novice prompts ablated minus intact.
    let reduce = |abl: &[f64]| -> Vec<f64> {
        (0..n)
            .map(|p| match p < n_expert {
                true => intact[p] - abl[p],
                false => abl[p] - intact[p],
            })
            .collect()
    };
    let m = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    Ok(AblationVsRandom {
        reductions: reduce(&ablated[0]),
        random_means: ablated[1..].iter().map(|a| m(&reduce(a))).collect(),
        gap_intact: m(&intact[..n_expert]) - m(&intact[n_expert..]),
    })
}

#[cfg(test)]
mod tests {
    use super::{SteerMode, SteerRecord};

    /// The autorater's view of a record equals what it reads from the record's JSON line.
    #[test]
    fn a_record_answers_as_its_json_line_reads() {
        let r = SteerRecord {
            model: "m".into(),
            prompt_id: "physics/q1/t0/novice".into(),
            persona: "novice".into(),
            topic: "physics".into(),
            prompt: "Why is the sky blue?".into(),
            chat: true,
            layer: 6,
            hook: "blocks.7.hook_resid_pre".into(),
            alpha: 2.5,
            mode: "add".into(),
            positions: "all".into(),
            norm: "raw".into(),
            direction_scale: 1.0,
            mean_resid_norm: 2.0,
            direction_source: "d".into(),
            seed: 3,
            sampling: serde_json::json!({"greedy": true}),
            max_new_tokens: 8,
            prompt_ids: vec![1, 2, 3],
            generated_ids: vec![4, 5],
            text: "Because light scatters.".into(),
            stopped_on_eos: false,
        };
        let line = serde_json::to_string(&r).unwrap();
        let read: persona_lens_rate::Answer = serde_json::from_str(&line).unwrap();
        assert_eq!(r.answer(), read);
    }

    /// One name per mode: what `FromStr` reads and the records write; anything else is refused.
    #[test]
    fn steer_mode_names_round_trip() {
        for m in [SteerMode::Add, SteerMode::Ablate, SteerMode::Patch] {
            assert_eq!(m.name().parse::<SteerMode>().unwrap(), m);
        }
        let e = "nudge".parse::<SteerMode>().unwrap_err().to_string();
        assert!(e.contains("use add, ablate or patch"), "{e}");
    }
}
