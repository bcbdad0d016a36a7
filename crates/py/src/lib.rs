//! `persona_lens` for Python: a thin layer over the engine (`Model`, `run_with_cache`,
//! `run_with_hooks`, generation) and the study crate's jobs (the same typed specs the command
//! line parses; a job's keyword arguments are its flags). Arrays leave as numpy arrays, copied
//! once out of the tensor; long calls run with the GIL released, and Ctrl-C stops the work at the
//! model's next block.

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

/// Runs `f` with the GIL released and turns its result into Python's: an engine error into
/// `PersonaLensError`, Ctrl-C into KeyboardInterrupt (the engine stops at the model's next
/// block: every model, since the study loads its own).
///
/// On Python's main thread (Linux) `f` runs right there, and a SIGINT handler of ours, chained
/// in front of Python's for the length of the call, interrupts the engine: work on the main
/// thread ran about 5 % faster at batch 16 than the same work on a worker thread
/// (`bench/python_overhead.py`). Elsewhere `f` runs on a worker thread while the caller wakes
/// every 50 ms to look for Ctrl-C (Python delivers signals to the main thread only).
pub(crate) fn compute<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> PyResult<T> {
    // PERSONA_LENS_PY_WORKER_THREAD=1 takes the worker path everywhere (the bench's A/B).
    #[cfg(target_os = "linux")]
    if main_thread::is_main_thread() && std::env::var_os("PERSONA_LENS_PY_WORKER_THREAD").is_none()
    {
        return main_thread::compute(py, f);
    }
    compute_on_worker(py, f)
}

/// The result of `f` as Python's, once the engine's interrupt was cleared (see [`compute`]).
fn finish<T>(result: std::thread::Result<anyhow::Result<T>>) -> PyResult<T> {
    match result {
        Ok(Ok(v)) => {
            take_hook_error();
            Ok(v)
        }
        Ok(Err(e)) => Err(take_hook_error().unwrap_or_else(|| py_err(e))),
        Err(_) => Err(PyRuntimeError::new_err(
            "persona_lens: internal error (a panic in the engine); please report it",
        )),
    }
}

#[cfg(target_os = "linux")]
mod main_thread {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// The SIGINT action that was in place when the call began (Python's handler): ours calls it
    /// so that Python still sees the signal and raises KeyboardInterrupt.
    static PREVIOUS_HANDLER: AtomicUsize = AtomicUsize::new(0);
    static PREVIOUS_FLAGS: AtomicUsize = AtomicUsize::new(0);
    static SIGINT_SEEN: AtomicBool = AtomicBool::new(false);

    pub(super) fn is_main_thread() -> bool {
        // The process's first thread has the process id as its thread id; Python's main thread
        // is that thread unless Python was embedded unusually (then the worker path is taken).
        unsafe { libc::gettid() == libc::getpid() }
    }

    /// Async-signal-safe: two atomic stores and a call of the previous C handler.
    extern "C" fn on_sigint(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        persona_lens_engine::interrupt_all(true);
        SIGINT_SEEN.store(true, Ordering::SeqCst);
        let prev = PREVIOUS_HANDLER.load(Ordering::SeqCst);
        if prev == libc::SIG_DFL || prev == libc::SIG_IGN {
            return;
        }
        unsafe {
            if PREVIOUS_FLAGS.load(Ordering::SeqCst) & libc::SA_SIGINFO as usize != 0 {
                let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(prev);
                handler(sig, info, ctx);
            } else {
                let handler: extern "C" fn(libc::c_int) = std::mem::transmute(prev);
                handler(sig);
            }
        }
    }

    pub(super) fn compute<T: Send>(
        py: Python<'_>,
        f: impl FnOnce() -> anyhow::Result<T> + Send,
    ) -> PyResult<T> {
        let run = || py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
        if unsafe { libc::sigaction(libc::SIGINT, std::ptr::null(), &mut previous) } != 0
            || previous.sa_sigaction == libc::SIG_DFL
            || previous.sa_sigaction == libc::SIG_IGN
        {
            // No Python handler to chain to: Ctrl-C keeps its default effect (or none).
            return finish(run());
        }
        PREVIOUS_HANDLER.store(previous.sa_sigaction, Ordering::SeqCst);
        PREVIOUS_FLAGS.store(previous.sa_flags as usize, Ordering::SeqCst);
        SIGINT_SEEN.store(false, Ordering::SeqCst);
        let mut ours: libc::sigaction = unsafe { std::mem::zeroed() };
        ours.sa_sigaction = on_sigint as *const () as usize;
        ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        ours.sa_mask = previous.sa_mask;
        unsafe { libc::sigaction(libc::SIGINT, &ours, std::ptr::null_mut()) };
        let result = run();
        unsafe { libc::sigaction(libc::SIGINT, &previous, std::ptr::null_mut()) };
        if SIGINT_SEEN.swap(false, Ordering::SeqCst) {
            persona_lens_engine::interrupt_all(false);
            take_hook_error();
            // Python's own handler ran too: this raises what it would (KeyboardInterrupt).
            return Err(py
                .check_signals()
                .err()
                .unwrap_or_else(|| PyKeyboardInterrupt::new_err("interrupted")));
        }
        finish(result)
    }
}

/// [`compute`] off Python's main thread: `f` on a worker thread, the caller watching for Ctrl-C.
fn compute_on_worker<T: Send>(
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
    finish(result)
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
