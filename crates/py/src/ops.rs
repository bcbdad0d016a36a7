//! Hook operations for `run_with_hooks`, `generate` and `Model.add_hook`: the engine's fast ops
//! (add, replace, zero, scale) with batch-row / position / head selectors, and Python callables
//! (the slow path: the activation crosses into numpy and back at every call).

use crate::stash_hook_error;
use candle_core::{DType, Device, Tensor};
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use persona_lens_engine::{HookCtx, HookName, Intervention, Op, Selector};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::sync::Arc;

/// A fast hook operation with its selector; made by `persona_lens.add`, `replace`, `zero`,
/// `scale`.
#[pyclass(frozen, name = "HookOp", module = "persona_lens")]
#[derive(Clone)]
pub struct PyHookOp {
    pub(crate) op: Op,
    pub(crate) sel: Selector,
    kind: &'static str,
}

#[pymethods]
impl PyHookOp {
    fn __repr__(&self) -> String {
        let f = |v: &Option<Vec<usize>>| match v {
            Some(v) => format!("{v:?}"),
            None => "all".into(),
        };
        format!(
            "HookOp({}, rows={}, positions={}, heads={})",
            self.kind,
            f(&self.sel.rows),
            f(&self.sel.positions),
            f(&self.sel.heads)
        )
    }
}

/// What a Python hook function receives beside the activation (TransformerLens's `hook`).
#[pyclass(frozen, name = "Hook", module = "persona_lens")]
pub struct PyHook {
    /// The hook's name, e.g. `blocks.3.hook_resid_post`.
    #[pyo3(get)]
    name: String,
    /// The block, or None for `hook_embed` / `ln_final.hook_normalized`.
    #[pyo3(get)]
    layer: Option<usize>,
    /// Left padding of each batch row: row r's prompt position p is index `pad[r] + p - start`.
    #[pyo3(get)]
    pad: Vec<usize>,
    /// Index (in the padded sequence) of this call's first position (> 0 in KV-cached steps).
    #[pyo3(get)]
    start: usize,
}

#[pymethods]
impl PyHook {
    fn __repr__(&self) -> String {
        format!("Hook({})", self.name)
    }
}

fn selector(
    rows: Option<Vec<usize>>,
    positions: Option<Vec<usize>>,
    heads: Option<Vec<usize>>,
) -> Selector {
    Selector {
        rows,
        positions,
        heads,
    }
}

/// Any array-like as an f32 tensor: one copy, no Python loop.
pub(crate) fn tensor_from(value: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    let np = value.py().import("numpy")?;
    let arr = np.call_method1("ascontiguousarray", (value, "float32"))?;
    let arr = arr.cast_into::<PyArrayDyn<f32>>()?;
    let ro = arr.readonly();
    let t = Tensor::from_slice(ro.as_slice()?, ro.shape(), &Device::Cpu)
        .map_err(|e| crate::py_err(e.into()))?;
    Ok(t)
}

/// A tensor as a numpy-owned f32 array: one copy out of the tensor, none into numpy.
pub(crate) fn to_numpy<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Bound<'py, PyAny>> {
    let dims = t.dims().to_vec();
    let data = t
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| crate::py_err(e.into()))?;
    Ok(PyArray1::from_vec(py, data).reshape(dims)?.into_any())
}

/// `x + value` (broadcast over the activation) where the selector applies.
#[pyfunction]
#[pyo3(signature = (value, *, rows=None, positions=None, heads=None))]
pub fn add(
    value: &Bound<'_, PyAny>,
    rows: Option<Vec<usize>>,
    positions: Option<Vec<usize>>,
    heads: Option<Vec<usize>>,
) -> PyResult<PyHookOp> {
    Ok(PyHookOp {
        op: Op::Add(tensor_from(value)?),
        sel: selector(rows, positions, heads),
        kind: "add",
    })
}

/// The activation replaced by `value` (broadcast) where the selector applies.
#[pyfunction]
#[pyo3(signature = (value, *, rows=None, positions=None, heads=None))]
pub fn replace(
    value: &Bound<'_, PyAny>,
    rows: Option<Vec<usize>>,
    positions: Option<Vec<usize>>,
    heads: Option<Vec<usize>>,
) -> PyResult<PyHookOp> {
    Ok(PyHookOp {
        op: Op::Replace(tensor_from(value)?),
        sel: selector(rows, positions, heads),
        kind: "replace",
    })
}

/// Zero ablation where the selector applies.
#[pyfunction]
#[pyo3(signature = (*, rows=None, positions=None, heads=None))]
pub fn zero(
    rows: Option<Vec<usize>>,
    positions: Option<Vec<usize>>,
    heads: Option<Vec<usize>>,
) -> PyHookOp {
    PyHookOp {
        op: Op::Zero,
        sel: selector(rows, positions, heads),
        kind: "zero",
    }
}

/// `x * factor` where the selector applies.
#[pyfunction]
#[pyo3(signature = (factor, *, rows=None, positions=None, heads=None))]
pub fn scale(
    factor: f64,
    rows: Option<Vec<usize>>,
    positions: Option<Vec<usize>>,
    heads: Option<Vec<usize>>,
) -> PyHookOp {
    PyHookOp {
        op: Op::Scale(factor),
        sel: selector(rows, positions, heads),
        kind: "scale",
    }
}

/// A Python callable `fn(activation, hook) -> array | None` as an engine hook function. The
/// activation is a float32 copy in the batch's padded layout; returning None keeps the array
/// the function was given (edited in place or not).
fn python_hook(f: Py<PyAny>, name: HookName) -> Op {
    let func = move |x: &Tensor, ctx: &HookCtx| -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let dims = x.dims().to_vec();
        let data = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let out: PyResult<Tensor> = Python::attach(|py| {
            let arr = PyArray1::from_vec(py, data).reshape(dims.clone())?;
            let hook = PyHook {
                name: name.to_string(),
                layer: name.layer,
                pad: ctx.pad.clone(),
                start: ctx.start,
            };
            let ret = f.call1(py, (arr.clone(), hook))?;
            let ret = ret.bind(py);
            let y = if ret.is_none() {
                tensor_from(arr.as_any())?
            } else {
                tensor_from(ret)?
            };
            Ok(y)
        });
        match out {
            Ok(y) => y.to_dtype(dtype),
            Err(e) => {
                stash_hook_error(e);
                Err(candle_core::Error::Msg(format!(
                    "the Python hook on {name} raised an exception"
                )))
            }
        }
    };
    Op::Func(Arc::new(func))
}

/// `fwd_hooks=[(name_or_glob, op_or_callable), ...]` as interventions on `n_layers` blocks.
pub(crate) fn interventions(
    fwd_hooks: Option<&Bound<'_, PyAny>>,
    n_layers: usize,
) -> PyResult<Vec<Intervention>> {
    let mut out = vec![];
    let Some(list) = fwd_hooks else {
        return Ok(out);
    };
    for item in list.try_iter()? {
        let item = item?;
        let pair = item.cast::<PyTuple>().map_err(|_| {
            crate::PersonaLensError::new_err(
                "fwd_hooks takes (hook name, op) pairs, e.g. [('blocks.3.hook_resid_post', persona_lens.add(v))]",
            )
        })?;
        if pair.len() != 2 {
            return Err(crate::PersonaLensError::new_err(
                "fwd_hooks takes (hook name, op) pairs, e.g. [('blocks.3.hook_resid_post', persona_lens.add(v))]",
            ));
        }
        let name: String = pair.get_item(0)?.extract()?;
        let op = pair.get_item(1)?;
        let hooks = persona_lens_engine::resolve_hooks(&name, n_layers)
            .map_err(|e| crate::py_err(e.into()))?;
        for h in hooks {
            let (op, sel) = if let Ok(fast) = op.cast::<PyHookOp>() {
                let fast = fast.get();
                (fast.op.clone(), fast.sel.clone())
            } else if op.is_callable() {
                (python_hook(op.clone().unbind(), h), Selector::all())
            } else {
                return Err(crate::PersonaLensError::new_err(format!(
                    "the op for '{name}' must be persona_lens.add/replace/zero/scale(...) or a callable fn(activation, hook)"
                )));
            };
            out.push(Intervention { hook: h, op, sel });
        }
    }
    Ok(out)
}
