"""Screenshot of the dashboard for the README (docs/dashboard.png): starts `persona-lens serve`,
asks one question in headless Chromium (Debian's, through selenium), moves the first slider to
STRENGTH and saves the page once the steered answer is done.

    .venv-py/bin/python scripts/dashboard-screenshot.py --probes out/dashboard-probes [--bin target/release/persona-lens]
"""

import argparse
import re
import select
import signal
import subprocess
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[1]
ap = argparse.ArgumentParser()
ap.add_argument("--probes", required=True)
ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "persona-lens"))
ap.add_argument("--model", default="smollm2-135m-instruct")
ap.add_argument("--question", default="I'm 6 years old and I love dinosaurs. Why is the sky blue?")
ap.add_argument("--strength", type=float, default=2.0)
ap.add_argument("--out", default=str(ROOT / "docs" / "dashboard.png"))
a = ap.parse_args()

srv = subprocess.Popen([a.bin, "serve", "--model", a.model, "--probes", a.probes, "--port", "0",
                        "--max-new-tokens", "48"], stdout=subprocess.PIPE, text=True)
try:
    select.select([srv.stdout], [], [], 300)
    url = "http://" + re.search(r"http://(127\.0\.0\.1:\d+)/", srv.stdout.readline()).group(1)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for f in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--no-first-run", "--window-size=1280,760", f"--user-data-dir={tempfile.mkdtemp()}"]:
        opts.add_argument(f)
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        wait = WebDriverWait(d, 600)
        d.get(url + "/")
        wait.until(lambda d: d.find_elements(By.ID, "steer-0"))
        d.find_element(By.ID, "msg").send_keys(a.question)
        d.find_element(By.ID, "send").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".answer-meta"))
        d.execute_script("const s = document.getElementById('steer-0'); s.value = arguments[0];"
                         "s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change'));",
                         a.strength)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".answer-meta details"))
        d.execute_script("document.querySelector('.answer-meta details').open = true")
        d.save_screenshot(a.out)
        print("wrote", a.out)
    finally:
        d.quit()
finally:
    srv.send_signal(signal.SIGINT)
    srv.wait(30)
