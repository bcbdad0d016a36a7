"""persona_lens: how chat models model their user, from Python.

The engine (real GGUF / Hugging Face weights, TransformerLens hook names) and every analysis of
the ``persona-lens`` command line, over the same Rust library calls:

>>> import persona_lens as pl
>>> model = pl.Model("smollm2-135m-instruct")
>>> logits, cache = model.run_with_cache(["Explain gravity."], names="blocks.*.hook_resid_post", chat=True)
>>> cache["resid_post", 3].shape            # (1, n_positions, d_model), numpy float32
>>> probe = pl.probe(model, n_questions_per_pair=4, out="out/probe")   # the `probe` command's flags
>>> probe.to_dict()["layers"][0]

Analyses take their command's flags as keyword arguments (``--batch-size 8`` is
``batch_size=8``; defaults are the command line's), write the same files and return a
:class:`Result`. Errors raise :class:`PersonaLensError` with the command line's one-line
message. Long calls release the GIL; Ctrl-C stops them at the model's next block.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Tuple

import numpy as np

from ._native import (  # noqa: F401
    DEFAULT_MODEL,
    ActivationCache,
    Hook,
    HookOp,
    Model,
    PairHarvester,
    PersonaLensError,
    __version__,
    add,
    replace,
    scale,
    zero,
)
from . import _native

__all__ = [
    "DEFAULT_MODEL", "ActivationCache", "Hook", "HookOp", "Model", "PersonaLensError", "Result",
    "add", "replace", "scale", "zero", "probe", "direction", "lens", "patch", "path_patch", "attrib",
    "heads", "ablate",
    "steer", "steer_sweep", "rate", "control_vector_export", "control_vector_import",
    "diff_harvest", "diff_manifest", "read_store", "PairHarvester", "diff_train", "diff_analyze", "diff_verify", "diff_encode", "run_study",
    "__version__",
]


def _as_array(v: Any) -> Any:
    """Nested lists of numbers as a float64 array; anything else unchanged."""
    if isinstance(v, list) and v:
        try:
            a = np.asarray(v, dtype=np.float64)
        except (TypeError, ValueError):
            return v
        if a.dtype == np.float64 and a.ndim >= 1:
            return a
    return v


class Result:
    """A job's typed result: the fields of its JSON file as attributes, lists of numbers as
    numpy arrays (``r.layers``, ``r.sweeps["resid_pre_clean"]["values"]`` via ``to_dict()``).
    ``to_dict()`` gives the plain JSON value, equal to the file the command writes."""

    def __init__(self, kind: str, data: Dict[str, Any]):
        self._kind = kind
        self._data = data

    def to_dict(self) -> Dict[str, Any]:
        return json.loads(json.dumps(self._data))

    def keys(self):
        return self._data.keys()

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __getattr__(self, name: str) -> Any:
        data = self.__dict__.get("_data", {})
        if name in data:
            v = data[name]
            if isinstance(v, dict):
                return Result(f"{self._kind}.{name}", v)
            return _as_array(v)
        raise AttributeError(f"{self._kind} result has no field '{name}' (fields: {', '.join(data)})")

    def __dir__(self):
        return list(self._data) + ["to_dict", "keys"]

    def __repr__(self) -> str:
        return f"Result({self._kind}: {', '.join(self._data)})"


def _job(kind: str, model: Model, kwargs: Dict[str, Any]) -> Result:
    return Result(kind, json.loads(_native.run_job(model, kind, kwargs)))


def probe(model: Model, **kwargs: Any) -> Result:
    """Linear probes for the persona at every residual row, beside a bag-of-tokens probe
    (``persona-lens probe``; flags as keyword arguments: ``folds``, ``l2``, ``classes``,
    ``n_questions_per_pair``, ``out``, ...). Writes probe.json under ``out``."""
    return _job("probe", model, kwargs)


def direction(model: Model, **kwargs: Any) -> Result:
    """Persona directions per layer (``persona-lens direction``)."""
    return _job("direction", model, kwargs)


def lens(model: Model, **kwargs: Any) -> Result:
    """Logit lens over the dataset (``persona-lens lens``)."""
    return _job("lens", model, kwargs)


def patch(model: Model, **kwargs: Any) -> Result:
    """Activation patching sweeps between a clean and a corrupted prompt (``persona-lens
    patch``: ``clean``, ``corrupted``, ``sweep``, ``direction``, ...)."""
    return _job("patch", model, kwargs)


def path_patch(model: Model, **kwargs: Any) -> Result:
    """Path patching from sender heads to receivers (``persona-lens path-patch``: ``receivers``,
    ``senders``, ...). Writes path_patch.json under ``out``."""
    return _job("path_patch", model, kwargs)


def attrib(model: Model, **kwargs: Any) -> Result:
    """Attribution patching (one forward + backward) against the real sweep (``persona-lens
    attrib``). Writes attribution.json under ``out``."""
    return _job("attrib", model, kwargs)


def heads(model: Model, **kwargs: Any) -> Result:
    """Heads ranked by how much of the persona gap patching each restores (``persona-lens heads``)."""
    return _job("heads", model, kwargs)


def ablate(model: Model, **kwargs: Any) -> Result:
    """Ablation of chosen heads beside random head sets (``persona-lens ablate``)."""
    return _job("ablate", model, kwargs)


def steer(model: Model, **kwargs: Any) -> Result:
    """Steered generations over a layer x alpha grid (``persona-lens steer``): ``records`` (the
    lines of patched_outputs.jsonl) and ``run`` (steer.json)."""
    return _job("steer", model, kwargs)


def steer_sweep(model: Model, **kwargs: Any) -> Result:
    """Steering dose-response with fluency and grade scores (``persona-lens steer-sweep``)."""
    return _job("steer_sweep", model, kwargs)


def run_study(config: Any = None, **kwargs: Any) -> Result:
    """The whole study (``persona-lens run``): ``config`` is a TOML file; keyword arguments are
    the command's flags (``out``, ``experiment``, ``model``, ``resume``, ...). Returns the
    summary (summary.json); report.md / report.html are written beside it."""
    if config is not None:
        kwargs["config"] = config
    return Result("study", json.loads(_native.run_study(kwargs)))


def _command(kind: str, kwargs: Dict[str, Any]) -> Any:
    return json.loads(_native.run_command(kind, kwargs))


def rate(**kwargs: Any) -> Result:
    """Scores steered answers (``persona-lens rate``: ``input`` is a patched_outputs.jsonl;
    readability grades, fluency under the unsteered model, an optional judge): ``scores`` (one
    per record, as scores.jsonl) and ``cells`` (per layer and alpha with bootstrap intervals)."""
    return Result("rate", _command("rate", kwargs))


def control_vector_export(**kwargs: Any) -> Result:
    """Directions as a llama.cpp control vector (``persona-lens control-vector export``; it
    loads ``model``). Returns ``model_hint`` and ``layers`` (block -> scaled direction)."""
    return Result("control_vector", _command("control_vector_export", kwargs))


def control_vector_import(**kwargs: Any) -> Result:
    """Reads a llama.cpp control vector (``persona-lens control-vector import``); with
    ``layer=L`` also writes that layer as .npy. Returns ``model_hint`` and ``layers``."""
    return Result("control_vector", _command("control_vector_import", kwargs))


def diff_harvest(**kwargs: Any) -> Result:
    """Paired activations of a base and a chat model (``persona-lens diff harvest``); returns
    the store's manifest. With ``shard="I/N"`` it harvests part I of N only and returns
    ``{"part": ..., "skipped": ..., "manifest": ...}`` (the manifest once every part is
    finished); :mod:`persona_lens.distributed` hands the parts to Ray workers."""
    r = _command("diff_harvest", kwargs)
    if "store" in r:
        return Result("diff_harvest", r["store"])
    return Result("diff_harvest_part", r["part"])


def diff_manifest(**kwargs: Any) -> Result:
    """Joins the finished parts of a harvest in parts into ``paired.json``
    (``persona-lens diff manifest``; ``store=DIR``); a partial store lists its missing parts."""
    return Result("diff_manifest", _command("diff_manifest", kwargs))


def read_store(store: Any) -> Tuple[np.ndarray, Dict[str, Any]]:
    """A paired store's rows as one float32 array ``(rows, n_models, d)``, in manifest order
    (whatever files or parts hold them), and its manifest (``paired.json``) as a dict."""
    acts, meta = _native.read_store(str(store))
    return acts, json.loads(meta)


def diff_train(**kwargs: Any) -> Result:
    """Trains a crosscoder on a paired store (``persona-lens diff train``); returns
    train_log.json (``config``, ``log`` per step, ``rows_per_second``). On MKL, training runs
    about 1.1x faster with ``OMP_WAIT_POLICY=passive`` in the environment before the first
    model or product loads MKL (the CLI sets it for ``diff train``; a library cannot)."""
    return Result("diff_train", _command("diff_train", kwargs))


def diff_analyze(**kwargs: Any) -> Result:
    """Delta_norm classes, Latent Scaling, persona latents and their verification
    (``persona-lens diff analyze``); returns summary.json."""
    return Result("diff_analyze", _command("diff_analyze", kwargs))


def diff_verify(**kwargs: Any) -> Result:
    """Verification prompts for chosen latents (``persona-lens diff verify``): ``latents``, one
    entry per latent as in verification.json."""
    return Result("diff_verify", {"latents": _command("diff_verify", kwargs)})


def diff_encode(crosscoder: Any, x: Any, use_threshold: bool = True) -> Dict[str, Any]:
    """A crosscoder's (or SAE's) codes for activations ``x`` ((batch, n_models, d), or
    (batch, d) for an SAE), as ``persona-lens diff encode`` computes them: ``features``,
    ``scaled_features`` and ``reconstruction`` as float32 arrays."""
    f, s, r = _native.encode(str(crosscoder), x, use_threshold)
    return {"features": f, "scaled_features": s, "reconstruction": r}
