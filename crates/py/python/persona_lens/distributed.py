"""Sharded, resumable harvesting of paired activations on a Ray cluster.

One actor per worker loads the model pair and builds the corpus once (``PairHarvester``), then
harvests the parts of the store it is given (``diff harvest --shard I/N``: part I of N is a
fixed run of samples on harvest-batch boundaries, so the parts together equal the unsharded
store bitwise). Each part's files and its ``part-IIIII-of-NNNNN.json`` are written atomically,
the JSON last; a worker that dies mid-part leaves no finished part behind, and the driver gives
the part to a fresh actor. The driver writes ``paired.json`` when every part is finished.

>>> from persona_lens import distributed
>>> distributed.harvest("out/diff/store", workers=8, address="auto",
...                     base_model="gemma-3-270m", chat_model="smollm2-135m-instruct")

Ray is imported here only (``pip install 'ray>=2.40'``). With ``address=None`` a local Ray
instance is started on 127.0.0.1 for the call and stopped after it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, List, Optional

from . import _native

__all__ = ["harvest"]


def _ray() -> Any:
    try:
        import ray  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise _native.PersonaLensError(
            "persona_lens.distributed needs Ray; install it with `pip install 'ray>=2.40'`"
        ) from e
    return ray


class _Worker:
    """The actor: one model pair per process, many parts."""

    def __init__(self, harvest_kwargs: Dict[str, Any]) -> None:
        self.harvester = _native.PairHarvester(harvest_kwargs)

    def pid(self) -> int:
        return os.getpid()

    def n_samples(self) -> int:
        return self.harvester.n_samples

    def part(self, shard: str, out: str, resume: bool) -> Dict[str, Any]:
        t0 = time.time()
        r = json.loads(self.harvester.part(shard, out, resume))["part"]
        return {
            "part": r["part"]["part"],
            "skipped": r["skipped"],
            "seconds": time.time() - t0,
            "pid": os.getpid(),
        }


def harvest(
    out: Any,
    workers: int = 2,
    n_shards: Optional[int] = None,
    address: Optional[str] = None,
    resume: bool = True,
    max_retries: int = 3,
    threads_per_worker: int = 1,
    on_event: Optional[Callable[[Dict[str, Any]], None]] = None,
    **harvest_kwargs: Any,
) -> Dict[str, Any]:
    """Harvests ``diff harvest``'s store into ``out`` with ``workers`` Ray actors.

    ``harvest_kwargs`` are ``diff harvest``'s flags (``base_model``, ``chat_model``,
    ``corpus``, ``batch_size``, ...). ``n_shards`` parts (default ``4 * workers``) are handed to
    the actors as they become free; with ``resume`` finished parts are skipped. A part whose
    actor dies is retried on a fresh actor, at most ``max_retries`` times; an error in the
    harvest itself (a bad flag, a missing model) is raised at once. ``on_event`` receives
    ``{"event": "worker_started" | "part_done" | "worker_lost", ...}`` as they happen.

    Returns ``{"manifest": <paired.json>, "parts": [per-part results], "retries": n,
    "workers": workers, "seconds": wall time}``.
    """
    ray = _ray()
    if workers < 1:
        raise _native.PersonaLensError("workers must be at least 1")
    n_shards = n_shards or 4 * workers
    if n_shards < 1:
        raise _native.PersonaLensError("n_shards must be at least 1")
    for key in ("shard", "out", "resume"):
        if key in harvest_kwargs:
            raise _native.PersonaLensError(
                f"distributed.harvest sets '{key}' itself; pass out= / resume= / n_shards="
            )
    out = os.path.abspath(str(out))
    os.makedirs(out, exist_ok=True)
    kwargs = dict(harvest_kwargs)
    kwargs.setdefault("threads", threads_per_worker)
    kwargs.setdefault("quiet", True)
    emit = on_event or (lambda _e: None)

    started_here = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if address is None:
            ray.init(
                _node_ip_address="127.0.0.1",
                num_cpus=max(workers, 1) * threads_per_worker,
                include_dashboard=False,
                log_to_driver=False,
            )
        else:
            ray.init(address=address, log_to_driver=False)
        started_here = True
    t0 = time.time()
    try:
        actor_cls = ray.remote(num_cpus=threads_per_worker, max_restarts=0)(_Worker)

        def start(slot: int) -> Any:
            a = actor_cls.remote(kwargs)
            pid = ray.get(a.pid.remote())
            emit({"event": "worker_started", "worker": slot, "pid": pid})
            return a

        actors: List[Any] = [start(i) for i in range(workers)]
        pending = [f"{i}/{n_shards}" for i in range(n_shards)]
        pending.reverse()
        attempts: Dict[str, int] = {}
        in_flight: Dict[Any, Any] = {}  # future -> (slot, shard)
        results: List[Dict[str, Any]] = []
        retries = 0
        free = list(range(workers))
        while pending or in_flight:
            while pending and free:
                slot = free.pop()
                shard = pending.pop()
                attempts[shard] = attempts.get(shard, 0) + 1
                fut = actors[slot].part.remote(shard, out, resume)
                in_flight[fut] = (slot, shard)
            done, _ = ray.wait(list(in_flight), num_returns=1)
            fut = done[0]
            slot, shard = in_flight.pop(fut)
            try:
                r = ray.get(fut)
            except ray.exceptions.RayActorError as e:
                # The worker process died (killed, out of memory, node lost): nothing of the
                # part counts until its JSON is written, so a fresh actor does it again.
                if attempts[shard] > max_retries:
                    raise _native.PersonaLensError(
                        f"part {shard} failed {attempts[shard]} times (its worker died each time); "
                        "see the Ray logs, then rerun with resume=True"
                    ) from e
                retries += 1
                emit({"event": "worker_lost", "worker": slot, "shard": shard})
                pending.append(shard)
                actors[slot] = start(slot)
                free.append(slot)
                continue
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                msg = str(cause) if cause is not None else str(e).splitlines()[-1]
                raise _native.PersonaLensError(f"part {shard}: {msg}") from e
            results.append({"shard": shard, **r})
            emit({"event": "part_done", "worker": slot, "shard": shard, "pid": r["pid"]})
            free.append(slot)
        manifest = json.loads(_native.run_command("diff_manifest", {"store": out}))
        for a in actors:
            ray.kill(a)
    finally:
        if started_here:
            ray.shutdown()
    results.sort(key=lambda r: int(r["shard"].split("/")[0]))
    return {
        "manifest": manifest,
        "parts": results,
        "retries": retries,
        "workers": workers,
        "n_shards": n_shards,
        "seconds": time.time() - t0,
    }
