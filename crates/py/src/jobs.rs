//! The study crate's jobs from Python: keyword arguments become the job's command-line flags and
//! are parsed by the same parser (same defaults, same checks, same messages); the job runs on
//! the Python model; its typed result comes back as JSON for the Python layer to wrap.

use crate::compute;
use crate::model::{clap_err, PyModel};
use clap::{Args, FromArgMatches};
use persona_lens_study::{
    analysis_jobs, diff_jobs, patch_jobs, spec, steer_jobs, study, ModelArgs,
};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyList, PyString, PyTuple};

/// Model options belong to `persona_lens.Model(...)`, not to a job.
const MODEL_KEYS: [&str; 6] = [
    "model",
    "models_dir",
    "dtype",
    "quantized",
    "threads",
    "json",
];

fn scalar(v: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(s.to_cow()?.into_owned());
    }
    Ok(v.str()?.to_cow()?.into_owned())
}

/// `key=value` pairs as flags: True -> `--key`; False -> left out, or `--no-key` where the spec
/// has that flag; None -> left out; lists -> comma separated; anything else -> str().
fn argv<T: Args + FromArgMatches>(
    kwargs: Option<&Bound<'_, PyDict>>,
    job: &str,
    refused: &[&str],
) -> PyResult<Vec<String>> {
    let cmd = T::augment_args(clap::Command::new("job"));
    let has_flag = |id: &str| cmd.get_arguments().any(|a| a.get_id() == id);
    let mut out = vec![];
    let Some(kwargs) = kwargs else {
        return Ok(out);
    };
    for (k, v) in kwargs.iter() {
        let key: String = k.extract()?;
        if refused.contains(&key.as_str()) {
            return Err(crate::PersonaLensError::new_err(format!(
                "{job}: '{key}' is a model option; pass it to persona_lens.Model(...)"
            )));
        }
        let flag = format!("--{}", key.replace('_', "-"));
        if v.is_none() {
            continue;
        }
        if v.is_instance_of::<PyBool>() {
            let on: bool = v.extract()?;
            // `chat=False` means "not chat" where the spec has `--no-chat` (the model's own
            // default otherwise), as `template_holdout=False` means `--no-template-holdout`.
            let has_no = has_flag(&format!("no_{key}"));
            match (on, has_no) {
                (true, _) => out.push(flag),
                (false, true) => out.push(format!("--no-{}", key.replace('_', "-"))),
                (false, false) => {}
            }
            continue;
        }
        if v.is_instance_of::<PyList>() || v.is_instance_of::<PyTuple>() {
            let items: Vec<String> = v
                .try_iter()?
                .map(|i| scalar(&i?))
                .collect::<PyResult<_>>()?;
            out.push(format!("{flag}={}", items.join(",")));
            continue;
        }
        out.push(format!("{flag}={}", scalar(&v)?));
    }
    Ok(out)
}

/// The job's spec from keyword arguments, on the model's own options.
fn spec_for<T: Args + FromArgMatches>(
    kwargs: Option<&Bound<'_, PyDict>>,
    job: &str,
) -> PyResult<T> {
    let args = argv::<T>(kwargs, job, &MODEL_KEYS)?;
    spec::parse::<T>(&args).map_err(clap_err)
}

fn json<T: serde::Serialize>(v: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string(v)?)
}

/// Runs job `job` on `model` with `kwargs` (its flags as keyword arguments); returns its typed
/// result as JSON.
#[pyfunction]
#[pyo3(signature = (model, job, kwargs=None))]
pub fn run_job(
    py: Python<'_>,
    model: &PyModel,
    job: &str,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<String> {
    let m = &model.model;
    let margs: ModelArgs = model.args.clone();
    macro_rules! job {
        ($t:ty, |$a:ident| $body:expr) => {{
            let mut $a: $t = spec_for::<$t>(kwargs, job)?;
            $a.model = margs;
            compute(py, move || $body)
        }};
    }
    match job {
        "probe" => job!(analysis_jobs::ProbeArgs, |a| {
            let quiet = a.h.quiet;
            json(&analysis_jobs::run_probe(m, &a, quiet)?)
        }),
        "direction" => job!(analysis_jobs::DirectionArgs, |a| json(
            &analysis_jobs::direction_with(m, &a, false)?
        )),
        "lens" => job!(analysis_jobs::LensArgs, |a| {
            let quiet = a.quiet;
            json(&analysis_jobs::run_dataset_lens(m, &a, quiet)?)
        }),
        "patch" => job!(patch_jobs::PatchArgs, |a| {
            let (r, _files) = patch_jobs::patch_with(m, &a)?;
            if !a.no_files {
                persona_lens_analysis::write_json(&a.out.join("patching.json"), &r)?;
            }
            json(&r)
        }),
        "path_patch" => job!(patch_jobs::PathPatchArgs, |a| {
            let (r, _files) = patch_jobs::path_patch_with(m, &a)?;
            if !a.no_files {
                persona_lens_analysis::write_json(&a.out.join("path_patch.json"), &r)?;
            }
            json(&r)
        }),
        "attrib" => job!(patch_jobs::AttribArgs, |a| json(
            &patch_jobs::attrib_with(m, &a)?.0
        )),
        "heads" => job!(patch_jobs::HeadsArgs, |a| json(&patch_jobs::heads_with(
            m, &a, false
        )?)),
        "ablate" => job!(patch_jobs::AblateArgs, |a| json(&patch_jobs::ablate_with(
            m, &a, false
        )?)),
        "steer" => job!(steer_jobs::SteerArgs, |a| {
            let (records, run) = steer_jobs::steer_with(m, &a)?;
            json(&serde_json::json!({"records": records, "run": run}))
        }),
        "steer_sweep" => job!(steer_jobs::SteerSweepArgs, |a| json(
            &steer_jobs::steer_sweep_with(m, &a, false)?
        )),
        other => Err(crate::PersonaLensError::new_err(format!(
            "unknown job '{other}'; use probe, direction, lens, patch, path_patch, attrib, heads, ablate, steer or steer_sweep"
        ))),
    }
}

/// The whole study (`persona-lens run`): keyword arguments are its flags (`config`, `out`,
/// `experiment`, `model`, `resume`, ...); returns `summary.json` as JSON.
#[pyfunction]
#[pyo3(signature = (kwargs=None))]
pub fn run_study(py: Python<'_>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<String> {
    // The study loads its own model: its model flags are its own. `json` only changes what the
    // command prints; the summary comes back as the return value.
    let args = argv::<study::RunArgs>(kwargs, "run_study", &[])?;
    let mut a: study::RunArgs = spec::parse(&args).map_err(clap_err)?;
    a.json = false;
    compute(py, move || json(&study::run(a)?))
}

/// A command that loads its own model(s) (`rate`, `control-vector export|import`, the `diff`
/// commands): keyword arguments are its flags, model flags included; returns its typed result
/// as JSON.
#[pyfunction]
#[pyo3(signature = (command, kwargs=None))]
pub fn run_command(
    py: Python<'_>,
    command: &str,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<String> {
    macro_rules! cmd {
        ($t:ty, |$a:ident| $body:expr) => {{
            let args = argv::<$t>(kwargs, command, &[])?;
            #[allow(unused_mut)] // only some commands adjust their spec
            let mut $a: $t = spec::parse(&args).map_err(clap_err)?;
            compute(py, move || $body)
        }};
    }
    match command {
        "rate" => cmd!(steer_jobs::RateArgs, |a| {
            // the result is the return value: nothing to print
            a.json = true;
            json(&steer_jobs::rate_with(&a)?)
        }),
        "control_vector_export" => cmd!(steer_jobs::CvExportArgs, |a| json(
            &steer_jobs::cv_export_with(&a)?
        )),
        "control_vector_import" => cmd!(steer_jobs::CvImportArgs, |a| json(
            &steer_jobs::cv_import_with(&a)?
        )),
        "diff_harvest" => cmd!(diff_jobs::HarvestArgs, |a| json(&diff_jobs::harvest_with(
            &a
        )?)),
        "diff_train" => cmd!(diff_jobs::TrainArgs, |a| json(&diff_jobs::train_with(&a)?)),
        "diff_analyze" => cmd!(diff_jobs::AnalyzeArgs, |a| {
            a.json = true;
            json(&diff_jobs::analyze_with(&a)?)
        }),
        "diff_verify" => cmd!(diff_jobs::VerifyArgs, |a| json(&diff_jobs::verify_with(
            &a
        )?)),
        "diff_manifest" => cmd!(diff_jobs::ManifestArgs, |a| json(
            &diff_jobs::manifest_with(&a)?
        )),
        other => Err(crate::PersonaLensError::new_err(format!(
            "unknown command '{other}'; use rate, control_vector_export, control_vector_import, diff_harvest, diff_manifest, diff_train, diff_analyze or diff_verify"
        ))),
    }
}

/// `diff encode` on arrays: `x` is (batch, n_models, d) for a crosscoder, (batch, d) for an SAE;
/// returns (features, scaled_features, reconstruction) as numpy float32 arrays.
#[pyfunction]
#[pyo3(signature = (crosscoder, x, use_threshold=true))]
pub fn encode<'py>(
    py: Python<'py>,
    crosscoder: std::path::PathBuf,
    x: &Bound<'py, PyAny>,
    use_threshold: bool,
) -> PyResult<Bound<'py, PyTuple>> {
    let x = crate::ops::tensor_from(x)?;
    let e = compute(py, move || {
        let dict = persona_lens_diffing::load_dictionary(&crosscoder)?;
        diff_jobs::encode_tensor(&dict, &x, use_threshold, "x")
    })?;
    PyTuple::new(
        py,
        [
            crate::ops::to_numpy(py, &e.features)?,
            crate::ops::to_numpy(py, &e.scaled_features)?,
            crate::ops::to_numpy(py, &e.reconstruction)?,
        ],
    )
}

/// A worker's harvester (`diff harvest`'s flags as keyword arguments): loads the model pair and
/// builds the corpus once, then harvests the parts it is given (`part("I/N", out, resume)`).
#[pyclass(module = "persona_lens._native", name = "PairHarvester", frozen)]
pub struct PyPairHarvester {
    inner: std::sync::Arc<diff_jobs::PairHarvester>,
}

#[pymethods]
impl PyPairHarvester {
    #[new]
    #[pyo3(signature = (kwargs=None))]
    fn new(py: Python<'_>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
        let args = argv::<diff_jobs::HarvestArgs>(kwargs, "PairHarvester", &[])?;
        let a: diff_jobs::HarvestArgs = spec::parse(&args).map_err(clap_err)?;
        let h = compute(py, move || diff_jobs::PairHarvester::new(&a))?;
        Ok(Self {
            inner: std::sync::Arc::new(h),
        })
    }

    /// Samples in the corpus.
    #[getter]
    fn n_samples(&self) -> usize {
        self.inner.n_samples()
    }

    /// Harvests part `shard` ("I/N") into `out`; with `resume`, a finished part is skipped.
    /// Returns what was written as JSON (the part, and the store's manifest once complete).
    #[pyo3(signature = (shard, out, resume=true))]
    fn part(
        &self,
        py: Python<'_>,
        shard: &str,
        out: std::path::PathBuf,
        resume: bool,
    ) -> PyResult<String> {
        let shard: persona_lens_diffing::shards::ShardSpec = shard
            .parse()
            .map_err(|e: String| crate::PersonaLensError::new_err(e))?;
        let h = self.inner.clone();
        compute(py, move || json(&h.part(shard, &out, resume)?))
    }
}

/// A paired store's rows, (rows, n_models, d) float32, and its manifest as JSON.
#[pyfunction]
pub fn read_store<'py>(
    py: Python<'py>,
    store: std::path::PathBuf,
) -> PyResult<Bound<'py, PyTuple>> {
    let (acts, meta) = compute(py, move || {
        let s = persona_lens_diffing::paired::PairedStore::open(&store)?;
        Ok((s.all()?, json(&s.meta)?))
    })?;
    PyTuple::new(
        py,
        [
            crate::ops::to_numpy(py, &acts)?.into_any(),
            PyString::new(py, &meta).into_any(),
        ],
    )
}
