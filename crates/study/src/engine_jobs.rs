//! The engine's primitives: tokenize, generate, cache, inspect.

use crate::{DtypeArg, ModelArgs, QuantArg};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use persona_lens_engine::{
    generate as gen, io, models_dir, read_token_ids, Batch, CachePositions, GenerateOptions,
    HookName, Hooks, LoadOptions, LogitsAt, Model, Precision, QuantKernel, Sampling,
};
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

pub fn load_model(a: &ModelArgs) -> Result<Model> {
    if let Some(t) = a.threads {
        // candle's CPU kernels read this once, on first use.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    let precision = match (a.quantized, a.dtype) {
        (Some(QuantArg::Exact), _) => Precision::Quantized(QuantKernel::Exact),
        (Some(QuantArg::Native), _) => Precision::Quantized(QuantKernel::Native),
        (None, DtypeArg::F32) => Precision::Dense(DType::F32),
        (None, DtypeArg::Bf16) => Precision::Dense(DType::BF16),
        (None, DtypeArg::F16) => Precision::Dense(DType::F16),
    };
    let opts = LoadOptions {
        precision,
        ..Default::default()
    };
    Ok(Model::load(
        &a.model,
        &models_dir(a.models_dir.as_deref()),
        &opts,
    )?)
}

#[derive(Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Do not add BOS (special tokens written in the text are still parsed as special ids).
    #[arg(long)]
    pub no_special: bool,
    /// Render the model's chat template around the text (one user turn + generation prompt).
    #[arg(long)]
    pub chat: bool,
    pub text: String,
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    let m = load_model(&a.m)?;
    let ids = if a.chat {
        m.encode_prompt(&a.text, true)?
    } else {
        m.tokenizer.encode(&a.text, !a.no_special)?
    };
    let tokens: Vec<String> = ids.iter().map(|&i| m.tokenizer.id_to_token(i)).collect();
    if a.m.json {
        println!("{}", json!({"ids": ids, "tokens": tokens}));
    } else {
        for (p, (i, t)) in ids.iter().zip(&tokens).enumerate() {
            println!("{p:>5}  {i:>7}  {t:?}");
        }
    }
    Ok(())
}

/// Sampling settings shared by every generating command (greedy unless --temperature).
#[derive(Args, Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingArgs {
    /// Sample with this temperature (default greedy).
    #[arg(long)]
    pub temperature: Option<f64>,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    /// Seeded sampling when a temperature is given (and `greedy` is not forced), else greedy.
    pub fn sampling(&self, greedy: bool) -> Sampling {
        match (greedy, self.temperature) {
            (false, Some(t)) => Sampling::Sample {
                temperature: t,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            },
            _ => Sampling::Greedy,
        }
    }
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    #[arg(long, required_unless_present = "ids", conflicts_with = "ids")]
    pub prompt: Option<String>,
    /// Pre-tokenized prompts instead of --prompt: a JSON list of token-id lists, used as given,
    /// generated as one batch (with --json, one line per prompt).
    #[arg(long, value_name = "FILE", conflicts_with = "chat")]
    pub ids: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// Greedy decoding (the default unless --temperature is given).
    #[arg(long)]
    pub greedy: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Do not stop at the model's end-of-sequence tokens.
    #[arg(long)]
    pub no_stop: bool,
    /// Recompute the whole sequence at every step instead of using the KV cache.
    #[arg(long)]
    pub no_kv_cache: bool,
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    let given_ids = a.ids.as_deref().map(read_token_ids).transpose()?;
    let m = load_model(&a.m)?;
    let prompts = match (given_ids, &a.prompt) {
        (Some(ids), _) => ids,
        (None, Some(p)) => vec![m.encode_prompt(p, a.chat)?],
        (None, None) => bail!("give --prompt TEXT or --ids FILE"),
    };
    let sampling = a.sampling.sampling(a.greedy);
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling,
        stop_tokens: if a.no_stop {
            vec![]
        } else {
            m.tokenizer.eos_ids.clone()
        },
        use_kv_cache: !a.no_kv_cache,
    };
    let t0 = Instant::now();
    let gens = gen(&m, &prompts, &opts, &mut Hooks::new())?;
    for g in &gens {
        let text = m.tokenizer.decode(&g.generated_ids, false)?;
        if a.m.json {
            println!(
                "{}",
                json!({"prompt_ids": g.prompt_ids, "generated_ids": g.generated_ids, "text": text})
            );
        } else {
            println!("{text}");
        }
    }
    if !a.m.json {
        eprintln!(
            "[{} prompt(s), {} prompt + {} generated tokens in {:.2} s, model {}]",
            gens.len(),
            gens.iter().map(|g| g.prompt_ids.len()).sum::<usize>(),
            gens.iter().map(|g| g.generated_ids.len()).sum::<usize>(),
            t0.elapsed().as_secs_f64(),
            m.info.name
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct CacheArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// A prompt (repeat for a batch).
    #[arg(long, required_unless_present = "ids", conflicts_with = "ids")]
    pub prompt: Vec<String>,
    /// Pre-tokenized input instead of --prompt: a JSON list of token-id lists, used as given (no
    /// BOS added); for checkpoints without a tokenizer.
    #[arg(long, value_name = "FILE", conflicts_with = "chat")]
    pub ids: Option<PathBuf>,
    #[arg(long)]
    pub chat: bool,
    /// Hook names or globs, comma separated (e.g. 'blocks.*.hook_resid_post,hook_embed').
    #[arg(long)]
    pub hooks: String,
    /// Output .safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Save logits at every position ([batch, pos, vocab]) instead of the last real one.
    #[arg(long)]
    pub all_logits: bool,
    /// Prompts per forward call.
    #[arg(long, default_value_t = 16, value_parser = crate::at_least_one)]
    pub batch_size: usize,
}

pub fn cache(a: CacheArgs) -> Result<()> {
    if a.out.extension().is_none_or(|e| e != "safetensors") {
        bail!(
            "--out must name a .safetensors file, got {}",
            a.out.display()
        );
    }
    // Read before the model loads: a bad file is a one-line error without the wait.
    let given_ids = a.ids.as_deref().map(read_token_ids).transpose()?;
    let m = load_model(&a.m)?;
    let names: Vec<HookName> = m.resolve_hooks(&a.hooks)?;
    let seqs: Vec<Vec<u32>> = match given_ids {
        Some(ids) => ids,
        None => a
            .prompt
            .iter()
            .map(|p| m.encode_prompt(p, a.chat))
            .collect::<persona_lens_engine::Result<_>>()?,
    };
    let lens: Vec<usize> = seqs.iter().map(Vec::len).collect();
    let pb = progress(seqs.len() as u64, a.m.json, "prompts");
    let logits_at = if a.all_logits {
        LogitsAt::All
    } else {
        LogitsAt::Last
    };
    let (logits, cache) = m.run_with_cache(
        &seqs,
        &names,
        CachePositions::All,
        logits_at,
        a.batch_size,
        |done| pb.set_position(done as u64),
    )?;
    pb.finish_and_clear();
    let logits = logits.context("no logits")?;
    let mut tensors: Vec<(String, Tensor)> = vec![];
    for h in &names {
        tensors.push((h.to_string(), cache.get(h)?));
    }
    tensors.push(("logits".into(), logits.contiguous()?));
    let mut meta = HashMap::new();
    meta.insert("model".into(), m.info.name.clone());
    meta.insert("model_path".into(), m.info.path.clone());
    meta.insert("precision".into(), m.info.precision.clone());
    meta.insert(
        "matmul".into(),
        persona_lens_engine::mkl::matmul_backend().label(),
    );
    meta.insert("prompt_lengths".into(), serde_json::to_string(&lens)?);
    meta.insert("prompt_ids".into(), serde_json::to_string(&seqs)?);
    meta.insert(
        "layout".into(),
        "[batch, pos, ...]: index p is prompt position p (BOS included), right padded with zeros past each prompt_lengths[b]; logits: last real position [batch, vocab] (or [batch, pos, vocab] with --all-logits)".into(),
    );
    meta.insert(
        "persona_lens_version".into(),
        env!("CARGO_PKG_VERSION").into(),
    );
    io::save_safetensors(&tensors, meta, &a.out)?;
    if a.m.json {
        let shapes: serde_json::Map<String, serde_json::Value> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), json!(t.dims())))
            .collect();
        println!(
            "{}",
            json!({"out": a.out, "tensors": shapes, "prompt_lengths": lens})
        );
    } else {
        for (n, t) in &tensors {
            println!("{n:<40} {:?}", t.dims());
        }
        println!("wrote {} tensors to {}", tensors.len(), a.out.display());
    }
    Ok(())
}

#[derive(Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub m: ModelArgs,
}

#[derive(Args)]
pub struct ModelsArgs {
    /// Where short names' local files are looked for [env: PERSONA_LENS_MODELS; default: ./models].
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// Machine-readable JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The model registry (`models.toml`) and where each model would load from here.
pub fn models(a: ModelsArgs) -> Result<()> {
    let dir = models_dir(a.models_dir.as_deref());
    let rows: Vec<serde_json::Value> = persona_lens_engine::registry()
        .iter()
        .map(|e| {
            let local = e.file.as_ref().map(|f| dir.join(f)).filter(|p| p.is_file());
            // Local file or hub cache only: listing never downloads.
            let cached = e
                .hub
                .as_deref()
                .and_then(persona_lens_engine::model::hub_cached);
            let available = match (&local, cached) {
                (Some(p), _) => format!("file {}", p.display()),
                (None, Some(p)) => format!("hf cache {}", p.display()),
                (None, None) => "not here".into(),
            };
            json!({"name": e.name, "hub": e.hub, "file": e.file, "arch": e.arch,
                   "params": e.params, "chat": e.chat, "role": e.role,
                   "local_file": local.map(|p| p.display().to_string()), "available": available})
        })
        .collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<38} {:<7} {:>5} {:<5} available",
        "name", "hub id", "arch", "size", "chat"
    );
    for r in &rows {
        println!(
            "{:<24} {:<38} {:<7} {:>5} {:<5} {}",
            r["name"].as_str().unwrap_or(""),
            r["hub"].as_str().unwrap_or("-"),
            r["arch"].as_str().unwrap_or(""),
            r["params"].as_str().unwrap_or(""),
            if r["chat"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                "no"
            },
            r["available"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

pub fn inspect(a: InspectArgs) -> Result<()> {
    let t0 = Instant::now();
    let m = load_model(&a.m)?;
    let load_s = t0.elapsed().as_secs_f64();
    let c = m.config();
    let tk = &m.tokenizer;
    let v = json!({
        "model": m.info.name,
        "path": m.info.path,
        "format": m.info.format,
        "general_name": m.info.general_name,
        "architecture": c.arch.name(),
        "config": c,
        "precision": m.info.precision,
        "matmul": persona_lens_engine::mkl::matmul_backend().label(),
        "weight_memory_bytes": m.info.weight_bytes,
        "tensor_types": m.info.tensor_types,
        "load_seconds": load_s,
        "peak_rss_bytes": peak_rss_kib().map(|k| k * 1024),
        "tokenizer": {
            "kind": tk.kind,
            "vocab_size": tk.vocab_size(),
            "bos": tk.bos_token, "bos_id": tk.bos_id, "adds_bos": tk.add_bos,
            "eos": tk.eos_token, "eos_ids": tk.eos_ids, "pad_id": tk.pad_id,
            "has_chat_template": tk.chat_template.is_some(),
        },
        "hooks_per_block": m.resolve_hooks("blocks.0.*")?.iter().map(|n| n.point.suffix()).collect::<Vec<_>>(),
        "global_hooks": if m.decoder.pos_embed.is_some() {
            vec!["hook_embed", "hook_pos_embed", "ln_final.hook_normalized"]
        } else {
            vec!["hook_embed", "ln_final.hook_normalized"]
        },
        "positions": if m.decoder.pos_embed.is_some() { "learned" } else { "rotary" },
    });
    if a.m.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("model        {} ({})", m.info.name, m.info.path);
        println!("architecture {} [{}]", c.arch.name(), m.info.format);
        println!(
            "sizes        {} layers, d_model {}, {} heads ({} kv), d_head {}, d_mlp {}, vocab {}, context {}",
            c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_mlp, c.vocab_size, c.max_position
        );
        if let Some(w) = c.sliding_window {
            let n_sliding = c.layer_is_sliding.iter().filter(|s| **s).count();
            println!("attention    {n_sliding} sliding-window layers (window {w}, rope base {}) + {} global (rope base {})", c.rope_local_theta, c.n_layers - n_sliding, c.rope_theta);
        } else if m.decoder.pos_embed.is_some() {
            println!("attention    all global, learned absolute positions");
        } else {
            println!("attention    all global, rope base {}", c.rope_theta);
        }
        if m.decoder.pos_embed.is_none() {
            let scaling = match &c.rope_scaling {
                None => "none".to_string(),
                Some(s) => serde_json::to_value(s)?["rope_type"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string(),
            };
            println!(
                "rotary       {} of {} dims per head, scaling {scaling}",
                c.rotary_dim, c.head_dim
            );
        }
        println!("precision    {}", m.info.precision);
        println!(
            "weights      {:.1} MiB in memory",
            m.info.weight_bytes as f64 / 1048576.0
        );
        let mut types: Vec<_> = m.info.tensor_types.iter().collect();
        types.sort();
        println!(
            "tensor types {}",
            types
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "tokenizer    {} vocab {}, BOS {:?} (added: {}), EOS {:?}, chat template: {}",
            tk.kind,
            tk.vocab_size(),
            tk.bos_token,
            tk.add_bos,
            tk.eos_token,
            if tk.chat_template.is_some() {
                "yes"
            } else {
                "no"
            }
        );
        if let Some(k) = peak_rss_kib() {
            println!(
                "peak RSS     {:.1} MiB after loading ({load_s:.2} s)",
                k as f64 / 1024.0
            );
        }
    }
    Ok(())
}

pub fn progress(n: u64, quiet: bool, what: &str) -> indicatif::ProgressBar {
    if quiet || n < 2 {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(n);
    pb.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:40}} {{pos}}/{{len}} {what} [{{elapsed}} < {{eta}}]"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    pb
}

#[derive(Args)]
pub struct BenchForwardArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// JSON file with {"prompts": [...]} (bench/prompts.json).
    #[arg(long, required_unless_present = "ids", conflicts_with = "ids")]
    pub prompts: Option<PathBuf>,
    /// Pre-tokenized input instead of --prompts: a JSON list of token-id lists (as --dump-ids
    /// writes them), used as given.
    #[arg(long, value_name = "FILE")]
    pub ids: Option<PathBuf>,
    #[arg(long, default_value_t = 1, value_parser = crate::at_least_one)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    /// Also write the prompts' token ids (JSON list of lists) here, for the peer's run.
    #[arg(long)]
    pub dump_ids: Option<PathBuf>,
    /// Query rows per attention block for calls longer than it (default 512); a value at least
    /// the prompt length computes the whole score matrix at once (the memory comparison).
    #[arg(long, value_parser = crate::at_least_one)]
    pub attention_block: Option<usize>,
    /// Rows per MLP chunk for calls of more rows (default 2048); a value at least the batch's
    /// rows runs the MLP whole (the memory comparison).
    #[arg(long, value_parser = crate::at_least_one)]
    pub mlp_chunk_rows: Option<usize>,
    /// Time the library's `Model::run_with_cache` (a position-aligned cache of all prompts, as
    /// the Python package returns it) instead of forwards whose captures are dropped.
    #[arg(long)]
    pub run_with_cache: bool,
    /// Capture nothing: the forward alone (the attention-memory figure without the residual
    /// cache's own memory).
    #[arg(long, conflicts_with = "run_with_cache")]
    pub no_capture: bool,
}

/// Multiply-adds x 2 per token in the blocks' projections (attention q/k/v/o, MLP), without the
/// unembedding and the attention scores: the work every implementation does per real token, for
/// the bench's GFLOP/s (gemma-3-270m: 0.20).
fn block_gflop_per_token(c: &persona_lens_engine::ModelConfig) -> f64 {
    let attn = c.d_model * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
        + c.n_heads * c.head_dim * c.d_model;
    let mlp_mats = if c.arch == persona_lens_engine::Architecture::Gpt2 {
        2
    } else {
        3
    };
    2.0 * (c.n_layers * (attn + mlp_mats * c.d_model * c.d_mlp)) as f64 / 1e9
}

/// The benchmark workload: forward over all prompts with the full residual stream captured
/// (`hook_embed` + every `hook_resid_post`, as HF's output_hidden_states), logits at the last
/// position. Prints tokens/s (best of `repeats` after one warm-up) and peak RSS.
pub fn bench_forward(a: BenchForwardArgs) -> Result<()> {
    let given_ids = a.ids.as_deref().map(read_token_ids).transpose()?;
    let prompts: Vec<String> = match &a.prompts {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)?;
            v["prompts"]
                .as_array()
                .context("prompts file needs a \"prompts\" array")?
                .iter()
                .filter_map(|p| p.as_str().map(String::from))
                .collect()
        }
        None => vec![],
    };
    let mut m = load_model(&a.m)?;
    if let Some(b) = a.attention_block {
        m.decoder.attention_block = b;
    }
    if let Some(r) = a.mlp_chunk_rows {
        m.decoder.mlp_chunk_rows = r;
    }
    let m = m;
    let seqs: Vec<Vec<u32>> = match given_ids {
        Some(ids) => ids,
        None => prompts
            .iter()
            .map(|p| m.encode_prompt(p, false))
            .collect::<persona_lens_engine::Result<_>>()?,
    };
    let n_tokens: usize = seqs.iter().map(Vec::len).sum();
    if let Some(p) = &a.dump_ids {
        io::write_atomic(p, serde_json::to_string(&seqs)?.as_bytes())?;
    }
    let mut names = vec![HookName::global(persona_lens_engine::HookPoint::Embed)];
    names.extend(
        (0..m.config().n_layers)
            .map(|l| HookName::block(l, persona_lens_engine::HookPoint::ResidPost)),
    );
    let run_once = || -> Result<()> {
        if a.run_with_cache {
            m.run_with_cache(
                &seqs,
                &names,
                persona_lens_engine::CachePositions::All,
                LogitsAt::Last,
                a.batch_size,
                |_| {},
            )?;
            return Ok(());
        }
        for chunk in seqs.chunks(a.batch_size.max(1)) {
            let batch = Batch::left_padded(chunk, m.pad_id(), m.device())?;
            let mut hooks = Hooks::new();
            if !a.no_capture {
                hooks.capture_all(&names);
            }
            m.forward(&batch, None, &mut hooks, LogitsAt::Last)?;
        }
        Ok(())
    };
    run_once()?;
    let mut best = f64::INFINITY;
    for _ in 0..a.repeats.max(1) {
        let t0 = Instant::now();
        run_once()?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    let v = json!({
        "impl": format!("persona-lens ({})", m.info.precision),
        "mode": if a.run_with_cache {
            "run_with_cache"
        } else if a.no_capture {
            "forward_no_capture"
        } else {
            "forward"
        },
        "batch_size": a.batch_size, "tokens": n_tokens, "seconds": best,
        "attention_block": m.decoder.attention_block,
        "mlp_chunk_rows": m.decoder.mlp_chunk_rows,
        "matmul": persona_lens_engine::mkl::matmul_backend().label(),
        "tokens_per_s": n_tokens as f64 / best,
        "peak_rss_mib": peak_rss_kib().map(|k| k as f64 / 1024.0),
        "block_gflop_per_token": block_gflop_per_token(m.config()),
    });
    if a.m.json {
        println!("{v}");
    } else {
        println!(
            "{n_tokens} tokens in {best:.3} s = {:.1} tokens/s (batch {}, matmul on {}), peak RSS {:.0} MiB",
            n_tokens as f64 / best,
            a.batch_size,
            persona_lens_engine::mkl::matmul_backend().label(),
            peak_rss_kib().unwrap_or(0) as f64 / 1024.0
        );
    }
    Ok(())
}
