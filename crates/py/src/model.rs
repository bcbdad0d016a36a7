//! `persona_lens.Model`: a loaded model with TransformerLens's verbs.

use crate::cache::PyActivationCache;
use crate::ops::{interventions, to_numpy};
use crate::{compute, PersonaLensError};
use numpy::PyArrayMethods;
use persona_lens_engine::{
    generate, CachePositions, GenerateOptions, Hooks, LogitsAt, Model, DEFAULT_MODEL,
};
use persona_lens_study::{engine_jobs::load_model, spec, ModelArgs};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use std::path::PathBuf;

/// A model: a .gguf file, a Hugging Face directory, a registry short name or a hub id, as the
/// command line's `--model` takes. `dtype` f32 | bf16 | f16; `quantized` True / "exact" (GGUF
/// blocks kept, f32 activations) or "native" (candle's quantized kernels); `threads` for the
/// math kernels (default all cores; read once per process).
#[pyclass(frozen, name = "Model", module = "persona_lens")]
pub struct PyModel {
    pub(crate) model: Model,
    pub(crate) args: ModelArgs,
}

/// A bad argument list as the exception the command line's one line becomes.
pub(crate) fn clap_err(e: clap::Error) -> PyErr {
    let line = spec::error_line(&e);
    PersonaLensError::new_err(line.strip_prefix("error: ").unwrap_or(&line).to_string())
}

impl PyModel {
    /// Text prompts (encoded as the `cache` command does) or token-id lists (used as given).
    fn seqs(&self, input: &Bound<'_, PyAny>, chat: bool) -> PyResult<Vec<Vec<u32>>> {
        let encode = |s: &str| {
            self.model
                .encode_prompt(s, chat)
                .map_err(|e| crate::py_err(e.into()))
        };
        if let Ok(s) = input.cast::<PyString>() {
            return Ok(vec![encode(&s.to_cow()?)?]);
        }
        let items: Vec<Bound<'_, PyAny>> = input.try_iter()?.collect::<PyResult<_>>()?;
        if items.is_empty() {
            return Err(PersonaLensError::new_err(
                "no prompts: give a string, a list of strings or a list of token-id lists",
            ));
        }
        if items[0].is_instance_of::<PyString>() {
            return items
                .iter()
                .map(|i| encode(&i.extract::<String>()?))
                .collect();
        }
        if chat {
            return Err(PersonaLensError::new_err(
                "chat=True applies to text prompts; token ids are used as given",
            ));
        }
        let seqs: Vec<Vec<u32>> = items
            .iter()
            .map(|i| i.extract::<Vec<u32>>())
            .collect::<PyResult<_>>()
            .map_err(|_| {
                PersonaLensError::new_err(
                    "prompts must be a string, a list of strings or a list of token-id lists",
                )
            })?;
        let vocab = self.model.config().vocab_size;
        for s in &seqs {
            if s.is_empty() {
                return Err(PersonaLensError::new_err("a token-id list is empty"));
            }
            if let Some(&id) = s.iter().find(|&&i| i as usize >= vocab) {
                return Err(PersonaLensError::new_err(format!(
                    "token id {id} is outside the vocabulary (size {vocab})"
                )));
            }
        }
        Ok(seqs)
    }

    fn hook_names(
        &self,
        names: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Vec<persona_lens_engine::HookName>> {
        let pattern = match names {
            None => "*".to_string(),
            Some(n) if n.is_instance_of::<PyString>() => n.extract()?,
            Some(n) => n.extract::<Vec<String>>()?.join(","),
        };
        self.model
            .resolve_hooks(&pattern)
            .map_err(|e| crate::py_err(e.into()))
    }

    #[allow(clippy::too_many_arguments)]
    fn run<'py>(
        &self,
        py: Python<'py>,
        input: &Bound<'py, PyAny>,
        fwd_hooks: Option<&Bound<'py, PyAny>>,
        names: Option<&Bound<'py, PyAny>>,
        cache: bool,
        positions: &str,
        chat: bool,
        batch_size: usize,
        logits: Option<&str>,
    ) -> PyResult<(Py<PyAny>, Option<PyActivationCache>)> {
        let positions: CachePositions = positions
            .parse()
            .map_err(|e: persona_lens_engine::EngineError| crate::py_err(e.into()))?;
        let logits_at = match logits {
            Some("last") => LogitsAt::Last,
            Some("all") => LogitsAt::All,
            None => LogitsAt::None,
            Some(o) => {
                return Err(PersonaLensError::new_err(format!(
                    "unknown logits '{o}'; use 'last', 'all' or None"
                )))
            }
        };
        if batch_size == 0 {
            return Err(PersonaLensError::new_err(
                "batch_size 0: give at least 1 prompt per forward call",
            ));
        }
        let seqs = self.seqs(input, chat)?;
        let ivs = interventions(fwd_hooks, self.model.config().n_layers)?;
        let names = if cache {
            self.hook_names(names)?
        } else {
            vec![]
        };
        let m = &self.model;
        let (lg, owned) = compute(py, || {
            Ok(m.run_with_hooks_owned(
                &seqs,
                &ivs,
                &names,
                positions,
                logits_at,
                batch_size,
                |_| {},
            )?)
        })?;
        let lg = match lg {
            Some(t) => to_numpy(py, &t)?.unbind(),
            None => py.None(),
        };
        if !cache {
            return Ok((lg, None));
        }
        // The engine's buffers become numpy's: no copy beyond assembling the cache.
        let mut by_hook: std::collections::HashMap<_, _> =
            owned.into_iter().map(|a| (a.hook, a)).collect();
        let arrays = names
            .iter()
            .map(|h| {
                let a = by_hook.remove(h).ok_or_else(|| {
                    crate::PersonaLensError::new_err(format!("internal: no activations for {h}"))
                })?;
                let arr = numpy::PyArray1::from_vec(py, a.data).reshape(a.shape.as_slice())?;
                Ok((h.to_string(), arr.into_any().unbind()))
            })
            .collect::<PyResult<Vec<_>>>()?;
        let cache = PyActivationCache {
            arrays,
            prompt_lengths: seqs.iter().map(Vec::len).collect(),
            positions: match positions {
                CachePositions::All => "all",
                CachePositions::Last => "last",
            }
            .into(),
        };
        Ok((lg, Some(cache)))
    }
}

#[pymethods]
impl PyModel {
    #[new]
    #[pyo3(signature = (name_or_path=DEFAULT_MODEL.to_string(), *, dtype="f32".to_string(), quantized=None, threads=None, models_dir=None))]
    fn new(
        py: Python<'_>,
        name_or_path: String,
        dtype: String,
        quantized: Option<&Bound<'_, PyAny>>,
        threads: Option<i64>,
        models_dir: Option<PathBuf>,
    ) -> PyResult<Self> {
        // The command line's parser: the same checks and the same messages.
        let mut argv = vec!["--model".to_string(), name_or_path, "--dtype".into(), dtype];
        if let Some(q) = quantized {
            if !q.is_instance_of::<pyo3::types::PyBool>() {
                argv.push(format!("--quantized={}", q.str()?));
            } else if q.extract::<bool>()? {
                argv.push("--quantized".into());
            }
        }
        if let Some(t) = threads {
            argv.extend(["--threads".into(), t.to_string()]);
        }
        if let Some(d) = models_dir {
            argv.extend(["--models-dir".into(), d.display().to_string()]);
        }
        let args: ModelArgs = spec::parse(&argv).map_err(clap_err)?;
        let model = compute(py, || load_model(&args))?;
        Ok(PyModel { model, args })
    }

    /// The name it was loaded by.
    #[getter]
    fn name(&self) -> String {
        self.model.info.name.clone()
    }

    /// Architecture and sizes: n_layers, d_model, n_heads, n_kv_heads, d_head, d_mlp, d_vocab,
    /// n_ctx, architecture, precision, path, chat (whether it has a chat template).
    #[getter]
    fn cfg<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.model.config();
        let d = PyDict::new(py);
        d.set_item("n_layers", c.n_layers)?;
        d.set_item("d_model", c.d_model)?;
        d.set_item("n_heads", c.n_heads)?;
        d.set_item("n_kv_heads", c.n_kv_heads)?;
        d.set_item("d_head", c.head_dim)?;
        d.set_item("d_mlp", c.d_mlp)?;
        d.set_item("d_vocab", c.vocab_size)?;
        d.set_item("n_ctx", c.max_position)?;
        d.set_item("architecture", format!("{:?}", c.arch))?;
        d.set_item("precision", &self.model.info.precision)?;
        d.set_item("path", &self.model.info.path)?;
        d.set_item("chat", self.model.is_chat_model())?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let c = self.model.config();
        format!(
            "Model('{}', {} layers, d_model {}, {})",
            self.model.info.name, c.n_layers, c.d_model, self.model.info.precision
        )
    }

    /// Token ids: raw text with BOS (unless `prepend_bos=False`), or, with `chat=True`, the chat
    /// template around one user turn plus the generation prompt (as the `tokenize` command).
    #[pyo3(signature = (text, *, chat=false, prepend_bos=true))]
    fn tokenize(&self, text: &str, chat: bool, prepend_bos: bool) -> PyResult<Vec<u32>> {
        let r = if chat {
            self.model.encode_prompt(text, true)
        } else {
            self.model.tokenizer.encode(text, prepend_bos)
        };
        r.map_err(|e| crate::py_err(e.into()))
    }

    /// Each id's token string.
    fn to_str_tokens(&self, ids: Vec<u32>) -> Vec<String> {
        ids.iter()
            .map(|&i| self.model.tokenizer.id_to_token(i))
            .collect()
    }

    /// Text of token ids (special tokens skipped unless `skip_special=False`).
    #[pyo3(signature = (ids, *, skip_special=true))]
    fn decode(&self, ids: Vec<u32>, skip_special: bool) -> PyResult<String> {
        self.model
            .tokenizer
            .decode(&ids, skip_special)
            .map_err(|e| crate::py_err(e.into()))
    }

    /// Hook names matching a glob or comma-separated list (`"blocks.*.hook_resid_post"`).
    #[pyo3(signature = (pattern="*"))]
    fn hook_names_matching(&self, pattern: &str) -> PyResult<Vec<String>> {
        Ok(self
            .model
            .resolve_hooks(pattern)
            .map_err(|e| crate::py_err(e.into()))?
            .iter()
            .map(|h| h.to_string())
            .collect())
    }

    /// Runs prompts (a string, strings, or token-id lists) in left-padded batches and returns
    /// `(logits, cache)`. `names`: hook names or globs (str or list; default every hook);
    /// `positions`: "all" (`[n, max_len, ...]`, index p = prompt position p, zeros past each
    /// prompt) or "last" (`[n, 1, ...]`); `logits`: "last" (`[n, vocab]`, each prompt's last
    /// token), "all" (`[n, max_len, vocab]`) or None. Same numbers as the `cache` command.
    #[pyo3(signature = (input, *, names=None, positions="all", chat=false, batch_size=16, logits=Some("last")))]
    #[allow(clippy::too_many_arguments)]
    fn run_with_cache<'py>(
        &self,
        py: Python<'py>,
        input: &Bound<'py, PyAny>,
        names: Option<&Bound<'py, PyAny>>,
        positions: &str,
        chat: bool,
        batch_size: usize,
        logits: Option<&str>,
    ) -> PyResult<(Py<PyAny>, PyActivationCache)> {
        let (lg, c) = self.run(
            py, input, None, names, true, positions, chat, batch_size, logits,
        )?;
        Ok((lg, c.expect("cache asked for")))
    }

    /// `run_with_cache` with interventions: `fwd_hooks=[(name_or_glob, op)]`, op one of
    /// `persona_lens.add(v)`, `replace(v)`, `zero()`, `scale(f)` (fast, in the engine; `rows`
    /// index the prompts given) or a callable `fn(activation, hook) -> array | None` (slow path:
    /// a float32 copy of the activation in the batch's left-padded layout, see `Hook.pad`).
    /// Returns the logits, or `(logits, cache)` with `return_cache=True`.
    #[pyo3(signature = (input, *, fwd_hooks=None, names=None, return_cache=false, positions="all", chat=false, batch_size=16, logits=Some("last")))]
    #[allow(clippy::too_many_arguments)]
    fn run_with_hooks<'py>(
        &self,
        py: Python<'py>,
        input: &Bound<'py, PyAny>,
        fwd_hooks: Option<&Bound<'py, PyAny>>,
        names: Option<&Bound<'py, PyAny>>,
        return_cache: bool,
        positions: &str,
        chat: bool,
        batch_size: usize,
        logits: Option<&str>,
    ) -> PyResult<Py<PyAny>> {
        let (lg, c) = self.run(
            py,
            input,
            fwd_hooks,
            names,
            return_cache,
            positions,
            chat,
            batch_size,
            logits,
        )?;
        match c {
            Some(c) => Ok((lg, c).into_pyobject(py)?.into_any().unbind()),
            None => Ok(lg),
        }
    }

    /// Generates from a prompt (text, or a list of texts / token-id lists for a batch):
    /// greedy unless `temperature` is given (then seeded sampling, with `top_k` / `top_p`);
    /// stops at the model's end-of-sequence tokens unless `stop_at_eos=False`; `fwd_hooks` act
    /// at every step (steering: `[("blocks.6.hook_resid_post", persona_lens.add(alpha * v))]`).
    /// Returns the generated text (a list for a batch), as the `generate` command prints it.
    #[pyo3(signature = (input, *, max_new_tokens=32, chat=false, temperature=None, top_k=None, top_p=None, seed=0, stop_at_eos=true, use_kv_cache=true, fwd_hooks=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        input: &Bound<'py, PyAny>,
        max_new_tokens: usize,
        chat: bool,
        temperature: Option<f64>,
        top_k: Option<usize>,
        top_p: Option<f64>,
        seed: u64,
        stop_at_eos: bool,
        use_kv_cache: bool,
        fwd_hooks: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let single = input.is_instance_of::<PyString>();
        let seqs = self.seqs(input, chat)?;
        let ivs = interventions(fwd_hooks, self.model.config().n_layers)?;
        let sampling = persona_lens_study::engine_jobs::SamplingArgs {
            temperature,
            top_k,
            top_p,
            seed,
        }
        .sampling(false);
        let opts = GenerateOptions {
            max_new_tokens,
            sampling,
            stop_tokens: if stop_at_eos {
                self.model.tokenizer.eos_ids.clone()
            } else {
                vec![]
            },
            use_kv_cache,
        };
        let m = &self.model;
        let texts = compute(py, || {
            let mut hooks = Hooks::new();
            for iv in &ivs {
                hooks.intervene(iv.hook, iv.op.clone(), iv.sel.clone());
            }
            let gens = generate(m, &seqs, &opts, &mut hooks)?;
            gens.iter()
                .map(|g| Ok(m.tokenizer.decode(&g.generated_ids, false)?))
                .collect::<anyhow::Result<Vec<String>>>()
        })?;
        if single && texts.len() == 1 {
            return Ok(PyString::new(py, &texts[0]).into_any().unbind());
        }
        Ok(PyList::new(py, texts)?.into_any().unbind())
    }

    /// Keeps an op on every later forward of this model (TransformerLens's permanent hooks),
    /// in every call and every analysis, until `reset_hooks()`.
    fn add_hook(&self, name: &str, op: &Bound<'_, PyAny>) -> PyResult<()> {
        let pair = pyo3::types::PyTuple::new(
            op.py(),
            [name.into_pyobject(op.py())?.into_any(), op.clone()],
        )?;
        let list = PyList::new(op.py(), [pair])?;
        for iv in interventions(Some(list.as_any()), self.model.config().n_layers)? {
            self.model.add_hook(iv.hook, iv.op, iv.sel);
        }
        Ok(())
    }

    /// Removes every op added by `add_hook`.
    fn reset_hooks(&self) {
        self.model.reset_hooks();
    }
}
