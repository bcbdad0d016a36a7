"""persona_lens from Python against the command line on the same inputs, on real weights
(SmolLM2-135M-Instruct, Q4_1 GGUF, computed as f32)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import persona_lens as pl
from conftest import MODEL, ROOT, cli, read_safetensors

PROMPTS = ["I am a child. Why is the sky blue?", "I have a PhD in physics. Why is the sky blue?"]
SMALL = {"n_questions_per_pair": 1, "templates": [0], "pair_id": ["physics", "biology"]}
SMALL_FLAGS = ["--n-questions-per-pair", "1", "--templates", "0", "--pair-id", "physics,biology"]


def test_cache_arrays_are_bitwise_the_cache_commands(model, tmp_path):
    hooks = "blocks.*.hook_resid_post,blocks.2.attn.hook_pattern,hook_embed"
    out = tmp_path / "c.safetensors"
    args = ["cache", "--model", MODEL, "--chat", "--hooks", hooks, "--out", str(out)]
    for p in PROMPTS:
        args += ["--prompt", p]
    cli(*args)
    want = read_safetensors(out)
    logits, cache = model.run_with_cache(PROMPTS, names=hooks, chat=True)
    assert set(cache.keys()) | {"logits"} == set(want)
    assert len(cache) == 32
    for name in cache:
        got = cache[name]
        assert got.dtype == np.float32 and got.shape == want[name].shape, name
        np.testing.assert_array_equal(got, want[name], err_msg=name)
    np.testing.assert_array_equal(logits, want["logits"])
    # TransformerLens's indexing: (short name, layer), negative layers, globals by short name.
    assert cache["resid_post", 3] is cache["blocks.3.hook_resid_post"]
    assert cache["resid_post", -1] is cache["blocks.29.hook_resid_post"]
    assert cache["pattern", 2] is cache["blocks.2.attn.hook_pattern"]
    assert cache["embed"] is cache["hook_embed"]
    assert cache.stack("resid_post").shape == (30, *want["blocks.0.hook_resid_post"].shape)
    assert ("resid_post", 3) in cache and ("mlp_out", 3) not in cache
    with pytest.raises(KeyError, match="not cached"):
        cache["mlp_out", 3]
    assert cache.prompt_lengths == [len(model.tokenize(p, chat=True)) for p in PROMPTS]
    # positions="last" is each prompt's last row of the full cache.
    _, last = model.run_with_cache(PROMPTS, names="blocks.5.hook_resid_post", chat=True, positions="last")
    full = cache["resid_post", 5]
    for r, n in enumerate(cache.prompt_lengths):
        np.testing.assert_array_equal(last["resid_post", 5][r, 0], full[r, n - 1])


def test_a_python_hook_that_adds_a_vector_equals_the_builtin_add(model):
    v = np.random.default_rng(0).standard_normal(model.cfg["d_model"]).astype(np.float32)
    hook = "blocks.4.hook_resid_post"
    clean = model.run_with_hooks(PROMPTS, chat=True)
    fast = model.run_with_hooks(PROMPTS, chat=True, fwd_hooks=[(hook, pl.add(v))])
    seen = []

    def add_v(x, h):
        seen.append((h.name, x.shape))
        return x + v

    slow = model.run_with_hooks(PROMPTS, chat=True, fwd_hooks=[(hook, add_v)])
    assert np.abs(fast - clean).max() > 0.1, "the vector must move the logits"
    np.testing.assert_array_equal(slow, fast)
    assert [n for n, _ in seen] == [hook]
    # Editing in place and returning None is the same edit.
    def add_in_place(x, h):
        x += v

    np.testing.assert_array_equal(model.run_with_hooks(PROMPTS, chat=True, fwd_hooks=[(hook, add_in_place)]), fast)
    # Row selectors index the prompts given, across batches.
    one = model.run_with_hooks(PROMPTS, chat=True, batch_size=1, fwd_hooks=[(hook, pl.add(v, rows=[1]))])
    np.testing.assert_array_equal(one[0], model.run_with_hooks(PROMPTS[:1], chat=True)[0])
    np.testing.assert_allclose(one[1], fast[1], atol=1e-4)
    # A Python exception inside a hook comes back as itself.
    def boom(x, h):
        raise ZeroDivisionError("inside the hook")

    with pytest.raises(ZeroDivisionError, match="inside the hook"):
        model.run_with_hooks(PROMPTS, fwd_hooks=[(hook, boom)])


def test_a_probe_equals_the_probe_command(model, tmp_path):
    flags = ["--max-layers", "4", "--folds", "2", "--quiet", *SMALL_FLAGS]
    cli("probe", "--model", MODEL, "--out", str(tmp_path / "cli"), *flags)
    want = json.loads((tmp_path / "cli" / "probe.json").read_text())
    r = pl.probe(model, max_layers=4, folds=2, quiet=True, out=str(tmp_path / "py"), **SMALL)
    got = r.to_dict()
    for d in (got, want):
        d.pop("seconds", None)
    assert got == want
    assert r.n_prompts == want["n_prompts"] and len(r.layers) == 5


def test_a_patch_sweep_equals_the_patch_command(model, tmp_path):
    pair = ["--clean", "I am a child. Explain the sun", "--corrupted", "I am a physicist. Explain the sun",
            "--answer-a", "simple", "--answer-b", "physics", "--sweep", "resid_pre", "--no-chat"]
    cli("patch", "--model", MODEL, "--out", str(tmp_path / "cli"), "--quiet", *pair)
    want = json.loads((tmp_path / "cli" / "patching.json").read_text())
    r = pl.patch(model, clean="I am a child. Explain the sun", corrupted="I am a physicist. Explain the sun",
                 answer_a="simple", answer_b="physics", sweep=["resid_pre"], chat=False, quiet=True,
                 out=str(tmp_path / "py"))
    got = r.to_dict()
    for d in [got, want, *got["sweeps"].values(), *want["sweeps"].values()]:
        d.pop("seconds", None)
    assert got == want
    values = np.asarray(got["sweeps"]["resid_pre_denoise"]["values"])
    assert values.shape == (30, len(got["clean"]["ids"]))


def _drop_seconds(v):
    """Timings differ run to run: every key ending in 'seconds' removed, recursively."""
    if isinstance(v, dict):
        return {k: _drop_seconds(x) for k, x in v.items() if not k.endswith("seconds")}
    if isinstance(v, list):
        return [_drop_seconds(x) for x in v]
    return v


def test_path_patching_and_attribution_equal_their_commands(model, tmp_path):
    pair = dict(clean="I am a child. Explain the sun", corrupted="I am a physicist. Explain the sun",
                answer_a="simple", answer_b="physics", chat=False, quiet=True)
    flags = ["--clean", pair["clean"], "--corrupted", pair["corrupted"], "--answer-a", "simple",
             "--answer-b", "physics", "--no-chat", "--quiet"]
    cli("path-patch", "--model", MODEL, "--senders", "L10H0,L12H3,L20H8", "--out", str(tmp_path / "cli"), *flags)
    want = json.loads((tmp_path / "cli" / "path_patch.json").read_text())
    got = pl.path_patch(model, senders=["L10H0", "L12H3", "L20H8"], out=str(tmp_path / "py"), **pair).to_dict()
    assert _drop_seconds(got) == _drop_seconds(want)
    assert len(got["runs"]["denoise"]["values"]) == 3
    cli("attrib", "--model", MODEL, "--sweep", "resid_pre", "--out", str(tmp_path / "cli"), *flags)
    want = json.loads((tmp_path / "cli" / "attribution.json").read_text())
    got = pl.attrib(model, sweep=["resid_pre"], out=str(tmp_path / "py"), **pair).to_dict()
    assert _drop_seconds(got) == _drop_seconds(want)
    assert "agreement" in got["sweeps"]["resid_pre"]


def test_a_steered_generation_equals_the_steer_command(model, tmp_path):
    cli("direction", "--model", MODEL, "--out", str(tmp_path / "dir"), "--quiet", *SMALL_FLAGS)
    d = str(tmp_path / "dir" / "directions.safetensors")
    common = ["--direction", d, "--layer", "9", "--alpha", "0,6", "--max-new-tokens", "10", "--n-prompts", "2"]
    cli("steer", "--model", MODEL, "--out", str(tmp_path / "cli"), "--quiet", *common, *SMALL_FLAGS)
    want = [json.loads(l) for l in (tmp_path / "cli" / "patched_outputs.jsonl").read_text().splitlines()]
    r = pl.steer(model, direction=d, layer=[9], alpha=[0, 6], max_new_tokens=10, n_prompts=2, quiet=True,
                 out=str(tmp_path / "py"), **SMALL)
    assert r.to_dict()["records"] == want
    texts = {rec["alpha"]: rec["text"] for rec in want if rec["prompt_id"] == want[0]["prompt_id"]}
    assert texts[0] != texts[6], "alpha 6 must change the generation"
    # The same edit by hand: `generate` with an add op of alpha x the stored difference of
    # means at the record's hook (block 9's output = residual row 10), at every position.
    rec = next(x for x in want if x["alpha"] == 6)
    assert rec["hook"] == "blocks.10.hook_resid_pre" and rec["norm"] == "raw"
    dom = read_safetensors(tmp_path / "dir" / "directions.safetensors")["diff_of_means"][10]
    by_hand = model.generate(rec["prompt"], chat=True, max_new_tokens=10,
                             fwd_hooks=[(rec["hook"], pl.add(6 * dom))])
    unsteered = model.generate(rec["prompt"], chat=True, max_new_tokens=10)
    assert by_hand == rec["text"]
    assert unsteered == next(x["text"] for x in want if x["alpha"] == 0 and x["prompt_id"] == rec["prompt_id"])
    # rate: the same scores and cell summaries as the command on the same records.
    patched = str(tmp_path / "cli" / "patched_outputs.jsonl")
    cli("rate", "--input", patched, "--out", str(tmp_path / "rate_cli"), "--quiet")
    rated = pl.rate(input=patched, out=str(tmp_path / "rate_py"))
    want_scores = [json.loads(l) for l in (tmp_path / "rate_cli" / "scores.jsonl").read_text().splitlines()]
    assert rated.to_dict()["scores"] == want_scores and len(want_scores) == len(want)
    assert all(s["perplexity"] > 1 for s in want_scores), "fluency was scored"
    assert rated.to_dict()["cells"] == json.loads((tmp_path / "rate_cli" / "rating_summary.json").read_text())["cells"]
    # control vectors: Python's export writes the command's bytes; import reads them back.
    cv_flags = ["--direction", d, "--layer", "9,10", "--alpha", "2", "--norm", "unit"]
    cli("control-vector", "export", "--model", MODEL, "--out", str(tmp_path / "cv_cli.gguf"), *cv_flags)
    cv = pl.control_vector_export(model=MODEL, direction=d, layer=[9, 10], alpha=2, norm="unit",
                                  out=str(tmp_path / "cv_py.gguf"))
    assert (tmp_path / "cv_py.gguf").read_bytes() == (tmp_path / "cv_cli.gguf").read_bytes()
    back = pl.control_vector_import(input=str(tmp_path / "cv_cli.gguf"))
    assert back.to_dict() == cv.to_dict() and sorted(back.to_dict()["layers"]) == ["10", "9"]
    v9 = np.asarray(back.to_dict()["layers"]["9"])
    assert abs(np.linalg.norm(v9) - 2.0) < 1e-5, "unit norm times alpha 2"


def test_bad_inputs_raise_the_command_lines_message(model, tmp_path):
    r = cli("tokenize", "--model", "no-such-model", "hi", ok=False)
    with pytest.raises(pl.PersonaLensError) as e:
        pl.Model("no-such-model")
    assert r.stderr.strip() == f"error: {e.value}"
    r = cli("probe", "--model", MODEL, "--batch-size", "0", ok=False)
    with pytest.raises(pl.PersonaLensError) as e:
        pl.probe(model, batch_size=0)
    assert r.stderr.strip() == f"error: {e.value} (see --help)"
    r = cli("patch", "--model", MODEL, "--clean", "I am a child. Hi", "--corrupted",
            "I am a theoretical physicist. Hi", "--answer-a", "simple", "--answer-b", "physics", "--no-files", ok=False)
    with pytest.raises(pl.PersonaLensError) as e:
        pl.patch(model, clean="I am a child. Hi", corrupted="I am a theoretical physicist. Hi",
                 answer_a="simple", answer_b="physics", no_files=True)
    assert r.stderr.strip() == f"error: {e.value}"
    with pytest.raises(pl.PersonaLensError, match="out of range"):
        model.run_with_cache("hi", names="blocks.30.hook_resid_post")
    with pytest.raises(pl.PersonaLensError, match="model option"):
        pl.probe(model, dtype="bf16")
    with pytest.raises(pl.PersonaLensError, match="outside the vocabulary"):
        model.run_with_cache([[1, 10**6]])


def test_ctrl_c_interrupts_a_long_call_and_the_model_still_works(model):
    before = model.run_with_hooks(PROMPTS[:1])
    many = [f"Question {i}: why is the sky blue? " * 4 for i in range(2000)]
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    t0 = time.time()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        model.run_with_cache(many, names="blocks.0.hook_resid_post", batch_size=1)
    elapsed = time.time() - t0
    assert elapsed < 10, f"took {elapsed:.1f} s to stop"
    np.testing.assert_array_equal(model.run_with_hooks(PROMPTS[:1]), before)


def test_the_gil_is_released_during_compute(model):
    ticks = []
    stop = threading.Event()

    def tick():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.001)

    th = threading.Thread(target=tick)
    th.start()
    t0 = time.time()
    model.run_with_cache([p * 8 for p in PROMPTS] * 8, names="blocks.*.hook_resid_post")
    took = time.time() - t0
    stop.set()
    th.join()
    # A thread starved of the GIL would tick about once per switch interval (5 ms) at best.
    assert took > 0.2 and len(ticks) > took * 100, (len(ticks), took)


def small_pairs_file(path):
    """32 novice/expert prompt pairs (4 topics x 4 questions): a study's probe step in seconds."""
    topics = {
        "physics": ["Why is the sky blue?", "How does gravity work?", "What is energy?", "Why do magnets attract?"],
        "biology": ["How do cells divide?", "What is DNA?", "How do vaccines work?", "Why do we sleep?"],
        "economics": ["What is inflation?", "Why do prices rise?", "What is a bank for?", "How do taxes work?"],
        "computing": ["What is a computer program?", "How does the internet work?", "What is memory in a computer?",
                      "How do passwords stay safe?"],
    }
    pairs = [{"id": f"{t}-{i}", "topic": t, "novice": {"prompt": f"I am a child. {q}"},
              "expert": {"prompt": f"I have a PhD in {t}. {q}"}}
             for t, qs in topics.items() for i, q in enumerate(qs)]
    path.write_text(json.dumps({"prompt_pairs": {"expertise_level": pairs}}))
    return str(path)


def test_the_study_returns_the_summary_the_command_writes(tmp_path):
    pairs = small_pairs_file(tmp_path / "pairs.json")
    flags = dict(experiment="probe", model=MODEL, dataset=pairs, max_layers=3, quiet=True)
    cli("run", "--experiment", "probe", "--model", MODEL, "--dataset", pairs, "--max-layers", "3",
        "--quiet", "--out", str(tmp_path / "cli"))
    s = pl.run_study(out=str(tmp_path / "py"), **flags)
    want = (tmp_path / "cli" / "summary.json").read_bytes()
    assert (tmp_path / "py" / "summary.json").read_bytes() == want
    assert s.to_dict() == json.loads(want)


def test_ctrl_c_interrupts_the_study_and_leaves_no_half_written_file(tmp_path):
    """The study loads its own model; Ctrl-C (a real SIGINT) still stops it at that model's next
    block, raises KeyboardInterrupt, and leaves no temp file and no summary behind."""
    timer = threading.Timer(3.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    t0 = time.time()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        pl.run_study(out=str(tmp_path / "study"), experiment="probe", model=MODEL, quiet=True)
    elapsed = time.time() - t0
    timer.cancel()
    assert elapsed < 15, f"took {elapsed:.1f} s to stop"
    left = [p.name for p in (tmp_path / "study").rglob("*")] if (tmp_path / "study").exists() else []
    assert not [n for n in left if n.endswith(".tmp")], left
    assert "summary.json" not in left, left


def test_the_notebook_example_runs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "notebook.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "probe: best held-out row" in r.stdout
    assert (tmp_path / "resid_norms.png").exists() or "matplotlib not installed" in r.stdout


FIXTURES = ROOT / "tests" / "fixtures" / "crosscoders"


def test_diff_commands_equal_the_command_line(tmp_path):
    """harvest -> train -> verify -> encode through Python and through the command line on the
    same small corpus: the same store bytes, loss curve, verification and codes."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([
        "I am five years old. Why is the sky blue?", "As a physicist, explain why the sky is blue.",
        "My grandmother asked me how rainbows form.", "Explain entropy to a graduate student.",
        "What is photosynthesis?", "I'm a nurse. How do vaccines work?",
    ]) + "\n")
    h = {"corpus": str(corpus), "shard_rows": 4}
    hflags = ["--corpus", str(corpus), "--shard-rows", "4", "--quiet"]
    cli("diff", "harvest", "--out", str(tmp_path / "store_cli"), *hflags)
    meta = pl.diff_harvest(out=str(tmp_path / "store_py"), quiet=True, **h).to_dict()
    files = sorted(p.name for p in (tmp_path / "store_cli").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "store_py").iterdir()) and len(meta["shards"]) == 2
    for f in files:
        if f.endswith(".safetensors"):
            assert (tmp_path / "store_cli" / f).read_bytes() == (tmp_path / "store_py" / f).read_bytes(), f
    assert meta["rows"] == 6 and meta["dims"] == [640, 576]
    t = {"dict_size": 16, "k": 4, "steps": 12, "batch_size": 4, "warmup_steps": 2, "checkpoint_every": 6}
    tflags = [x for k, v in t.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    cli("diff", "train", "--store", str(tmp_path / "store_cli"), "--out", str(tmp_path / "cc_cli"), "--quiet", *tflags)
    tr = pl.diff_train(store=str(tmp_path / "store_cli"), out=str(tmp_path / "cc_py"), quiet=True, **t).to_dict()
    want_log = json.loads((tmp_path / "cc_cli" / "train_log.json").read_text())
    assert tr["log"] == want_log["log"] and len(tr["log"]) == 12 and tr["config"] == want_log["config"]
    w_cli, w_py = (read_safetensors(tmp_path / d / "model.safetensors") for d in ("cc_cli", "cc_py"))
    assert set(w_cli) == set(w_py)
    for k in w_cli:
        np.testing.assert_array_equal(w_py[k], w_cli[k], err_msg=k)
    cli("diff", "verify", "--crosscoder", str(tmp_path / "cc_cli"), "--latent", "0,3", "--out", str(tmp_path / "v_cli"))
    v = pl.diff_verify(crosscoder=str(tmp_path / "cc_cli"), latent=[0, 3], out=str(tmp_path / "v_py"))
    assert v.to_dict()["latents"] == json.loads((tmp_path / "v_cli" / "verification.json").read_text())
    with pytest.raises(pl.PersonaLensError, match="out of range"):
        pl.diff_verify(crosscoder=str(tmp_path / "cc_cli"), latent=[16], out=str(tmp_path / "v_bad"))
    # encode: numpy in, numpy out, equal to the command's file and to dictionary_learning's
    # saved outputs for the same input (the fixture the CLI test checks to 1e-5).
    cc = FIXTURES / "batchtopk" / "model.safetensors"
    io = read_safetensors(FIXTURES / "io.safetensors")
    cli("diff", "encode", "--crosscoder", str(cc), "--input", str(FIXTURES / "io.safetensors"),
        "--out", str(tmp_path / "enc.safetensors"))
    got = pl.diff_encode(cc, io["x"])
    want_enc = read_safetensors(tmp_path / "enc.safetensors")
    for k in ("features", "scaled_features", "reconstruction"):
        np.testing.assert_array_equal(got[k], want_enc[k], err_msg=k)
    assert np.abs(got["features"] - io["batchtopk.encode_threshold"]).max() <= 1e-5
    with pytest.raises(pl.PersonaLensError, match="out of range"):
        pl.diff_encode(cc, np.full_like(io["x"], np.nan))
