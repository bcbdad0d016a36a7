//! `ActivationCache`: numpy arrays by hook name, indexed like TransformerLens's
//! (`cache["blocks.3.hook_resid_post"]`, `cache["resid_post", 3]`, `cache["embed"]`).

use persona_lens_engine::HookPoint;
use pyo3::exceptions::PyKeyError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString, PyTuple};

/// Activations of a `run_with_cache` call: `[n_prompts, positions, ...]` float32 arrays, index p
/// = prompt position p (BOS included), zeros past each prompt's end (`prompt_lengths`); with
/// `positions="last"` the position axis has length 1.
#[pyclass(frozen, name = "ActivationCache", module = "persona_lens", mapping)]
pub struct PyActivationCache {
    /// In forward order.
    pub(crate) arrays: Vec<(String, Py<PyAny>)>,
    #[pyo3(get)]
    pub(crate) prompt_lengths: Vec<usize>,
    /// `all` or `last`.
    #[pyo3(get)]
    pub(crate) positions: String,
}

/// TransformerLens's short names: `("resid_post", 3)` -> `blocks.3.hook_resid_post`,
/// `("pattern", 0)` -> `blocks.0.attn.hook_pattern`, `"embed"` -> `hook_embed`.
fn long_name(short: &str, layer: Option<i64>) -> Option<String> {
    match layer {
        Some(l) => HookPoint::BLOCK
            .iter()
            .map(|p| p.suffix())
            .find(|s| *s == short || s.ends_with(&format!("hook_{short}")))
            .map(|s| format!("blocks.{l}.{s}")),
        None => [HookPoint::Embed, HookPoint::PosEmbed, HookPoint::LnFinal]
            .iter()
            .map(|p| p.suffix())
            .find(|s| *s == short || s.ends_with(&format!("hook_{short}")) || s.starts_with(short))
            .map(String::from),
    }
}

impl PyActivationCache {
    fn lookup(&self, name: &str) -> Option<&Py<PyAny>> {
        self.arrays.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }

    fn resolve(&self, key: &Bound<'_, PyAny>) -> PyResult<String> {
        if let Ok(s) = key.cast::<PyString>() {
            let s = s.to_cow()?.into_owned();
            if self.lookup(&s).is_some() {
                return Ok(s);
            }
            if let Some(l) = long_name(&s, None).filter(|l| self.lookup(l).is_some()) {
                return Ok(l);
            }
            return Err(self.missing(&s));
        }
        if let Ok(t) = key.cast::<PyTuple>() {
            if t.len() == 2 {
                let short: String = t.get_item(0)?.extract()?;
                let layer: i64 = t.get_item(1)?.extract()?;
                let n_layers = self
                    .arrays
                    .iter()
                    .filter_map(|(n, _)| {
                        n.strip_prefix("blocks.")?
                            .split('.')
                            .next()?
                            .parse::<i64>()
                            .ok()
                    })
                    .max()
                    .map_or(0, |m| m + 1);
                // Negative layers count from the end, as in Python.
                let layer = if layer < 0 { layer + n_layers } else { layer };
                let name = long_name(&short, Some(layer))
                    .ok_or_else(|| self.missing(&format!("{short}, {layer}")))?;
                return match self.lookup(&name) {
                    Some(_) => Ok(name),
                    None => Err(self.missing(&name)),
                };
            }
        }
        Err(PyKeyError::new_err(
            "index the cache by a hook name ('blocks.3.hook_resid_post') or (short name, layer) ('resid_post', 3)",
        ))
    }

    fn missing(&self, what: &str) -> PyErr {
        let have: Vec<&str> = self
            .arrays
            .iter()
            .take(4)
            .map(|(n, _)| n.as_str())
            .collect();
        PyKeyError::new_err(format!(
            "'{what}' was not cached ({} hooks cached: {}{}); pass it in names= to run_with_cache",
            self.arrays.len(),
            have.join(", "),
            if self.arrays.len() > 4 { ", ..." } else { "" }
        ))
    }
}

#[pymethods]
impl PyActivationCache {
    fn __getitem__(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let name = self.resolve(key)?;
        Ok(self.lookup(&name).expect("resolved").clone_ref(py))
    }

    fn __contains__(&self, key: &Bound<'_, PyAny>) -> bool {
        self.resolve(key).is_ok()
    }

    fn __len__(&self) -> usize {
        self.arrays.len()
    }

    fn __iter__(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let keys = pyo3::types::PyList::new(py, self.keys())?;
        Ok(keys.try_iter()?.into_any().unbind())
    }

    /// Hook names, in forward order.
    fn keys(&self) -> Vec<String> {
        self.arrays.iter().map(|(n, _)| n.clone()).collect()
    }

    fn items(&self, py: Python<'_>) -> Vec<(String, Py<PyAny>)> {
        self.arrays
            .iter()
            .map(|(n, a)| (n.clone(), a.clone_ref(py)))
            .collect()
    }

    /// `{hook name: array}` (the arrays, not copies).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (n, a) in &self.arrays {
            d.set_item(n, a.clone_ref(py))?;
        }
        Ok(d)
    }

    /// One point of every block stacked: `stack("resid_post")` is `[n_layers, n_prompts, pos, d]`
    /// (TransformerLens's `stack_activation`).
    fn stack<'py>(&self, py: Python<'py>, short: &str) -> PyResult<Bound<'py, PyAny>> {
        let arrays: Vec<Py<PyAny>> = (0..)
            .map_while(|l| long_name(short, Some(l)).and_then(|n| self.lookup(&n)))
            .map(|a| a.clone_ref(py))
            .collect();
        if arrays.is_empty() {
            return Err(self.missing(short));
        }
        py.import("numpy")?.call_method1("stack", (arrays,))
    }

    fn __repr__(&self) -> String {
        format!(
            "ActivationCache({} hooks, {} prompts, positions={})",
            self.arrays.len(),
            self.prompt_lengths.len(),
            self.positions
        )
    }
}
