//! `persona_lens` for Python: a thin layer over the engine (`Model`, `run_with_cache`,
//! `run_with_hooks`, generation) and the study crate's jobs (the same typed specs the command
//! line parses; a job's keyword arguments are its flags). Arrays leave as numpy arrays, copied
//! once out of the tensor; long calls run with the GIL released on a worker thread while the
//! calling thread watches for Ctrl-C, which stops the work at the model's next block.

mod cache;
mod jobs;
mod model;
mod ops;

use persona_lens_engine::EngineError;
use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError};
use pyo3::prelude::*;
use std::sync::Mutex;
use std::time::Duration;

pyo3::create_exception!(
    persona_lens,
    PersonaLensError,
    pyo3::exceptions::PyValueError,
    "A bad input or a failed run; the message is the command line's one-line error."
);

/// An exception a Python hook raised on the worker thread, re-raised by the call that ran it.
static HOOK_ERROR: Mutex<Option<PyErr>> = Mutex::new(None);

pub(crate) fn stash_hook_error(e: PyErr) {
    let mut slot = HOOK_ERROR.lock().unwrap_or_else(|e| e.into_inner());
    slot.get_or_insert(e);
}

fn take_hook_error() -> Option<PyErr> {
    HOOK_ERROR.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// A library error as the Python exception carrying the command line's one-line message.
pub(crate) fn py_err(e: anyhow::Error) -> PyErr {
    let interrupted = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<EngineError>(),
            Some(EngineError::Interrupted)
        )
    });
    if interrupted {
        return PyKeyboardInterrupt::new_err("interrupted");
    }
    PersonaLensError::new_err(persona_lens_study::one_line(&e))
}

/// Runs `f` on a worker thread with the GIL released. The calling thread wakes when `f` ends,
/// and every 50 ms to look for Ctrl-C (Python delivers signals to the main thread only); on
/// Ctrl-C it interrupts the engine (every model: the study loads its own) and waits for the
/// worker to stop at its next block, then raises KeyboardInterrupt.
pub(crate) fn compute<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> PyResult<T> {
    let caller = std::thread::current();
    let (result, interrupted) = std::thread::scope(|s| {
        let worker = s.spawn(move || {
            let r = f();
            caller.unpark();
            r
        });
        let mut interrupted: Option<PyErr> = None;
        while !worker.is_finished() {
            py.detach(|| std::thread::park_timeout(Duration::from_millis(50)));
            if interrupted.is_none() {
                if let Err(e) = py.check_signals() {
                    persona_lens_engine::interrupt_all(true);
                    interrupted = Some(e);
                }
            }
        }
        (py.detach(|| worker.join()), interrupted)
    });
    if let Some(e) = interrupted {
        persona_lens_engine::interrupt_all(false);
        take_hook_error();
        return Err(e);
    }
    match result {
        Ok(Ok(v)) => {
            take_hook_error();
            Ok(v)
        }
        Ok(Err(e)) => Err(take_hook_error().unwrap_or_else(|| py_err(e))),
        Err(_) => Err(PyRuntimeError::new_err(
            "persona_lens: internal error (a panic on the worker thread); please report it",
        )),
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PersonaLensError", m.py().get_type::<PersonaLensError>())?;
    m.add("DEFAULT_MODEL", persona_lens_engine::DEFAULT_MODEL)?;
    m.add_class::<model::PyModel>()?;
    m.add_class::<cache::PyActivationCache>()?;
    m.add_class::<ops::PyHookOp>()?;
    m.add_class::<ops::PyHook>()?;
    m.add_function(wrap_pyfunction!(ops::add, m)?)?;
    m.add_function(wrap_pyfunction!(ops::replace, m)?)?;
    m.add_function(wrap_pyfunction!(ops::zero, m)?)?;
    m.add_function(wrap_pyfunction!(ops::scale, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::run_job, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::run_study, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::run_command, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::encode, m)?)?;
    m.add_function(wrap_pyfunction!(jobs::read_store, m)?)?;
    m.add_class::<jobs::PyPairHarvester>()?;
    Ok(())
}
