"""persona_lens.distributed on a local Ray cluster with two workers: the store equals the
single-process harvest bitwise, a worker killed mid-run loses nothing (its part is retried on a
fresh actor; no part doubled or missing), and a second run resumes by skipping every part.

The cluster runs in a child process inside a new network namespace that holds only the loopback
interface (`unshare --net`): Ray is started on 127.0.0.1 with usage reporting off, and the
namespace guarantees that nothing it starts can reach any other address."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import persona_lens as pl

MODEL = "smollm2-135m-instruct"

DRIVER = textwrap.dedent(
    """
    import json, os, signal, sys
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from persona_lens import distributed

    out, corpus, result = sys.argv[1], sys.argv[2], sys.argv[3]
    h = dict(base_model="{model}", chat_model="{model}", corpus=corpus, batch_size=2,
             shard_rows=16)
    events, pids, killed = [], {{}}, []

    def on_event(e):
        events.append(e)
        if e["event"] == "worker_started":
            pids[e["worker"]] = e["pid"]
        # At the first finished part, kill the other worker: it is inside a part (or about to
        # be given one), so its part must be retried and nothing may be lost.
        if e["event"] == "part_done" and not killed:
            other = 1 - e["worker"]
            os.kill(pids[other], signal.SIGKILL)
            killed.append(pids[other])

    first = distributed.harvest(out, workers=2, n_shards=6, on_event=on_event, **h)
    again = distributed.harvest(out, workers=2, n_shards=6, **h)
    with open(result, "w") as f:
        json.dump({{"first": first, "again": again, "events": events, "killed": killed}}, f)
    """
).format(model=MODEL)


def _loopback_namespace() -> list:
    """The command prefix that runs a child in a network namespace with only `lo` up."""
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    if probe.returncode != 0 or shutil.which("ip") is None:
        pytest.skip(f"no network namespaces here (unshare --net: {probe.stderr.decode().strip()})")
    return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]


def test_a_two_worker_ray_harvest_equals_one_process_and_survives_a_killed_worker(tmp_path):
    pytest.importorskip("ray")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(
        f"Question {i}: {'I am six.' if i % 2 else 'As an engineer,'} why do {t} happen?"
        for i, t in enumerate(["tides", "eclipses", "rainbows", "seasons", "earthquakes", "storms"] * 4)
    ) + "\n")
    h = dict(base_model=MODEL, chat_model=MODEL, corpus=str(corpus), batch_size=2, shard_rows=16,
             threads=1, quiet=True)
    ref = tmp_path / "single"
    pl.diff_harvest(out=str(ref), **h)

    out, result = tmp_path / "ray", tmp_path / "result.json"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    r = subprocess.run([*_loopback_namespace(), sys.executable, str(script), str(out), str(corpus),
                        str(result)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(result.read_text())
    first, again = res["first"], res["again"]

    # The killed worker's part was given to a fresh actor: at least one retry, six parts, each
    # once, together covering the corpus once.
    assert len(res["killed"]) == 1
    assert first["retries"] >= 1, res["events"]
    assert any(e["event"] == "worker_lost" for e in res["events"])
    parts = first["manifest"]["sharding"]["parts"]
    assert [p["index"] for p in parts] == list(range(6))
    assert first["manifest"]["sharding"]["missing"] == []
    covered = [i for p in parts for i in range(p["first_sample"], p["first_sample"] + p["n_samples"])]
    assert covered == list(range(24))
    files = [s["file"] for s in first["manifest"]["shards"]]
    assert len(files) == len(set(files))
    assert len({p["pid"] for p in first["parts"]}) >= 2, "both workers harvested"

    # Bitwise the single-process store, sample for sample.
    a, ma = pl.read_store(ref)
    b, mb = pl.read_store(out)
    assert a.shape == b.shape and a.shape[0] > 24
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert ma["samples"] == mb["samples"]

    # A second run finds every part finished and harvests nothing.
    assert all(p["skipped"] for p in again["parts"]), again["parts"]
    assert again["manifest"]["shards"] == first["manifest"]["shards"]


def test_distributed_refuses_flags_it_sets_itself(tmp_path):
    pytest.importorskip("ray")
    from persona_lens import distributed

    with pytest.raises(pl.PersonaLensError, match="sets 'shard' itself"):
        distributed.harvest(tmp_path / "x", shard="0/2")
    with pytest.raises(pl.PersonaLensError, match="workers must be at least 1"):
        distributed.harvest(tmp_path / "x", workers=0)
