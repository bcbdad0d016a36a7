"""The dashboard (`persona-lens serve`) end to end on the real chat model (SmolLM2-135M-Instruct),
with probes trained by `persona-lens probe` in the same run: malformed requests get a 4xx and a
message; the stream's read-outs equal the `conversation` command's; steering changes the answer
and the unsteered comparison equals a plain request's answer; headless Chromium drives the page
(send, streamed tokens and bars, a slider moves, the answer changes, a screenshot, no console
errors); 8 concurrent sessions on loopback run without errors with flat memory.

The server is the binary built from the same sources (`target/debug/persona-lens`, or
$PERSONA_LENS_BIN). The browser test needs Debian's chromium and chromium-driver; it skips
without them unless PERSONA_LENS_REQUIRE_BROWSER=1 (CI installs them and sets it)."""

import json
import os
import re
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[3]
BIN = os.environ.get("PERSONA_LENS_BIN", str(ROOT / "target" / "debug" / "persona-lens"))
MODEL = "smollm2-135m-instruct"
QUESTION = "I'm a physics professor. Why is the sky blue?"


def run(*args, ok=True):
    r = subprocess.run([BIN, *args], capture_output=True, text=True)
    if ok:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def probes(tmp_path_factory):
    if not Path(BIN).exists():
        pytest.fail(f"{BIN} not built: run `cargo build -p persona-lens` (make test does)")
    out = tmp_path_factory.mktemp("probe")
    # novice vs expert: 2 questions per topic x 4 persona paraphrases (128 prompts), every row
    run("probe", "--model", MODEL, "--n-questions-per-pair", "2", "--templates", "0,1,2,3", "--quiet", "--threads", "2",
        "--out", str(out))
    assert (out / "probe_weights.json").is_file()
    return out


def post(url, body, raw=False, content_type="application/json"):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": content_type})
    return urllib.request.urlopen(req, timeout=300)


def chat(base, messages, steer=(), max_new_tokens=None, on_token=None):
    """POSTs /api/chat and returns the stream's events, in order."""
    body = {"messages": messages, "steer": list(steer)}
    if max_new_tokens:
        body["max_new_tokens"] = max_new_tokens
    events = []
    with post(base + "/api/chat", body) as r:
        assert r.headers["Content-Type"] == "application/x-ndjson"
        for line in r:
            ev = json.loads(line)
            if on_token and ev["event"] == "token":
                on_token(ev)
            events.append(ev)
    return events


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(probes):
    p = subprocess.Popen(
        [BIN, "serve", "--model", MODEL, "--probes", str(probes), "--port", "0", "--max-new-tokens", "24",
         "--threads", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([p.stdout], [], [], 300)
    line = p.stdout.readline() if ready else ""
    m = re.search(r"http://(127\.0\.0\.1:\d+)/", line)
    if not m:
        p.kill()
        pytest.fail(f"the server did not start: {line!r} {p.stderr.read()}")
    yield SimpleNamespace(base="http://" + m.group(1), proc=p, probes=probes)
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=30) == 0, "Ctrl-C should stop the server cleanly"


def error_of(fn):
    with pytest.raises(urllib.error.HTTPError) as e:
        fn()
    body = json.loads(e.value.read())
    return e.value.code, body["error"]


def test_malformed_requests_get_4xx_with_a_message(server):
    b = server.base
    info = json.loads(urllib.request.urlopen(b + "/api/info").read())
    assert info["attributes"][0]["attribute"] == "novice/expert"
    assert info["attributes"][0]["hook"] in info["attributes"][0]["rows"]
    user = [{"role": "user", "content": "hi"}]
    cases = [
        (lambda: post(b + "/api/chat", b"{not json", raw=True), 400, "parse the request body as JSON"),
        (lambda: post(b + "/api/chat", b"{}", raw=True, content_type="text/plain"), 415, "Content-Type"),
        (lambda: post(b + "/api/chat", {"messages": []}), 400, "no turns"),
        (lambda: post(b + "/api/chat", {"messages": [{"role": "robot", "content": "x"}]}), 400, "role 'robot'"),
        (lambda: post(b + "/api/chat", {"messages": user + [{"role": "assistant", "content": "x"}]}), 400,
         "last message"),
        (lambda: post(b + "/api/chat", {"messages": user, "steer": [{"attribute": "mood", "strength": 1}]}), 400,
         "no attribute 'mood'"),
        (lambda: post(b + "/api/chat", {"messages": user, "steer": [{"attribute": "novice/expert",
                                                                      "strength": 1e9}]}), 400, "strength"),
        (lambda: post(b + "/api/chat", {"messages": user, "steer": [{"attribute": "novice/expert",
                                                                      "hook": "blocks.99.hook_resid_pre",
                                                                      "strength": 1}]}), 400, "no persona direction"),
        (lambda: post(b + "/api/chat", {"messages": user, "max_new_tokens": 100000}), 400, "max_new_tokens"),
        (lambda: post(b + "/api/chat", {"messages": user, "extra": 1}), 422, "unknown field"),
        (lambda: urllib.request.urlopen(b + "/nope"), 404, "no such page"),
    ]
    for fn, code, words in cases:
        got, msg = error_of(fn)
        assert got == code, (code, got, msg)
        assert words in msg, (words, msg)
        assert "\n" not in msg.strip()


def test_stream_reads_like_the_conversation_command_and_steering_changes_the_answer(server, tmp_path):
    b = server.base
    msgs = [{"role": "user", "content": QUESTION}]
    plain = chat(b, msgs)
    kinds = [e["event"] for e in plain]
    assert kinds[0] == "prompt" and kinds[-1] == "done" and kinds.count("token") >= 3, kinds
    prompt, tokens, done = plain[0], [e for e in plain if e["event"] == "token"], plain[-1]
    n = len(prompt["tokens"])
    assert len(prompt["proba"]) == len(prompt["turn_of"]) == n
    for p in prompt["proba"] + [t["proba"] for t in tokens]:
        assert len(p) == 1 and len(p[0]) == 2 and abs(sum(p[0]) - 1) < 1e-9
    assert done["text"] == "".join(t["text"] for t in tokens)
    assert done["grade"] is not None and done["perplexity"] > 1
    assert done["unsteered"] is None

    # The same conversation through the `conversation` command (no generation prompt): the
    # read-outs at the common positions are the server's.
    ds = tmp_path / "c.json"
    ds.write_text(json.dumps({"conversations": [{"id": "q", "turns": msgs}]}))
    run("conversation", "--model", MODEL, "--probes", str(server.probes), "--dataset", str(ds),
        "--out", str(tmp_path / "out"), "--quiet")
    traj = json.loads((tmp_path / "out" / "trajectories.json").read_text())[0]
    m = len(traj["proba"])
    assert 0 < m < n
    for i in range(m):
        assert abs(traj["proba"][i][0][1] - prompt["proba"][i][0][1]) < 1e-9, i

    steer = [{"attribute": "novice/expert", "strength": -4.0}]
    steered = chat(b, msgs, steer=steer)
    sdone = steered[-1]
    assert sdone["event"] == "done"
    assert sdone["text"] != done["text"], "steering at 4x the mean residual norm left the answer unchanged"
    # The comparison is the plain answer, generated again.
    assert sdone["unsteered"]["text"] == done["text"]
    assert sdone["unsteered"]["grade"] == done["grade"]
    # Steering acts on the prompt too: the read-outs move.
    assert steered[0]["proba"] != prompt["proba"]

    # The export reproduces the session: its command regenerates the steered answer and the
    # unsteered comparison with the same read-outs.
    session = msgs + [{"role": "assistant", "content": sdone["text"]}]
    with post(b + "/api/export", {"messages": session, "steer": steer}) as r:
        exp = json.loads(r.read())
    assert [c["id"] for c in exp["dataset"]["conversations"]] == ["session", "session-last-answer"]
    (tmp_path / "session.json").write_text(json.dumps(exp["dataset"]))
    argv = shlex.split(exp["command"])
    assert argv[0] == "persona-lens" and "--steer" in argv, argv
    r = subprocess.run([BIN, *argv[1:], "--out", str(tmp_path / "re"), "--quiet"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (again,) = json.loads((tmp_path / "re" / "answers.json").read_text())
    assert again["id"] == "session-last-answer"
    assert again["answer"]["text"] == sdone["text"]
    assert again["unsteered"]["text"] == done["text"]
    streamed = [e["proba"] for e in steered if e["event"] == "token"]
    assert len(again["proba"]) == len(streamed)
    for x, y in zip(again["proba"], streamed):
        assert abs(x[0][1] - y[0][1]) < 1e-9


def browser_or_skip():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium and driver:
        try:
            import selenium  # noqa: F401
            return chromium, driver
        except ImportError:
            pass
    if os.environ.get("PERSONA_LENS_REQUIRE_BROWSER") == "1":
        pytest.fail("chromium, chromium-driver (Debian) and selenium (pip) are needed for the browser test")
    pytest.skip("no chromium / chromedriver / selenium here (apt-get install chromium chromium-driver)")


def test_headless_chromium_drives_the_page(server, tmp_path):
    chromium, driver_path = browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    try:
        wait = WebDriverWait(d, 300)
        d.get(server.base + "/")
        wait.until(lambda d: d.find_elements(By.ID, "steer-0"))
        d.find_element(By.ID, "msg").send_keys(QUESTION)
        d.find_element(By.ID, "send").click()
        # Tokens arrive while the answer streams: the bubble has text before the answer is done.
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".bubble.assistant .text")
                   and d.find_element(By.CSS_SELECTOR, ".bubble.assistant .text").text.strip())
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".answer-meta"))
        first = d.find_element(By.CSS_SELECTOR, ".bubble.assistant .text").text
        widths = [d.execute_script("return parseFloat(arguments[0].style.width)", e)
                  for e in d.find_elements(By.CSS_SELECTOR, ".fill")]
        assert len(widths) == 2 and abs(sum(widths) - 100) < 0.5, widths
        assert d.find_element(By.ID, "line-0").find_elements(By.TAG_NAME, "polyline")
        # Move the slider with the keyboard (as a user would): Home = the most negative strength.
        slider = d.find_element(By.ID, "steer-0")
        slider.send_keys(Keys.HOME)
        assert float(slider.get_attribute("value")) < 0
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".answer-meta details"))
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".bubble.assistant").get_attribute(
            "data-streaming") == "0")
        second = d.find_element(By.CSS_SELECTOR, ".bubble.assistant .text").text
        assert second != first, "moving the slider did not change the answer"
        shot = ROOT / "target" / "dashboard_screenshot.png"
        shot.parent.mkdir(exist_ok=True)
        d.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        logs = [e for e in d.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert not logs, logs
        assert d.find_element(By.ID, "status").text == ""
    finally:
        d.quit()


def test_eight_concurrent_sessions_flat_memory(server):
    """8 sessions at once, two turns each, two rounds. The server answers one request at a
    time (the rest queue), so the wait for the first token grows with the queue while the gap
    between a stream's tokens is the model's own step time."""
    b = server.base
    n_sessions, rounds, new_tokens = 8, 2, 6
    rss, gaps, first, errors, per_round_s = [], [], [], [], []
    lock = threading.Lock()

    def session(k):
        try:
            msgs = [{"role": "user", "content": f"I'm {5 + k} years old. What is a star?"}]
            for _turn in range(2):
                sent = time.perf_counter()
                last = [None]

                def tick(_ev):
                    now = time.perf_counter()
                    with lock:
                        if last[0] is None:
                            first.append(now - sent)
                        else:
                            gaps.append(now - last[0])
                    last[0] = now

                ev = chat(b, msgs, max_new_tokens=new_tokens, on_token=tick)
                if ev[-1]["event"] != "done":
                    raise AssertionError(ev[-1])
                msgs += [{"role": "assistant", "content": ev[-1]["text"] or "ok"},
                         {"role": "user", "content": "Tell me more."}]
        except Exception as e:  # noqa: BLE001 - reported below
            with lock:
                errors.append(repr(e))

    for _ in range(rounds):
        t0 = time.perf_counter()
        threads = [threading.Thread(target=session, args=(k,)) for k in range(n_sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        per_round_s.append(time.perf_counter() - t0)
        rss.append(rss_kib(server.proc.pid))
    assert not errors, errors
    gaps_ms, first_ms = sorted(1e3 * g for g in gaps), sorted(1e3 * g for g in first)

    def pct(v, q):
        return round(v[int(q * (len(v) - 1))], 1)

    report = {
        "sessions": n_sessions, "rounds": rounds, "turns_per_session": 2, "new_tokens": new_tokens,
        "answers": len(first_ms), "round_seconds": [round(s, 2) for s in per_round_s],
        "rss_mib_after_each_round": [round(r / 1024, 1) for r in rss],
        "ms_between_tokens_median": pct(gaps_ms, 0.5), "ms_between_tokens_p95": pct(gaps_ms, 0.95),
        "ms_to_first_token_median": pct(first_ms, 0.5), "ms_to_first_token_p95": pct(first_ms, 0.95),
    }
    print("dashboard load:", json.dumps(report))
    (ROOT / "target").mkdir(exist_ok=True)
    (ROOT / "target" / "dashboard_load.json").write_text(json.dumps(report, indent=1))
    assert len(first_ms) == n_sessions * rounds * 2
    # Flat: after the first round (allocator warm), later rounds add under 64 MiB.
    assert rss[-1] - rss[0] < 64 * 1024, report
