#!/usr/bin/env bash
# Opens a study's report.html in headless Chromium (Debian's `chromium`), saves a screenshot and
# fails if the page logs anything to the console (errors, failed loads, uncaught exceptions).
# Usage: scripts/check-report.sh out/demo/report.html [screenshot.png]
set -euo pipefail
html="$(realpath "$1")"
shot="${2:-${html%.html}.png}"
command -v chromium >/dev/null || { echo "error: chromium not found (apt-get install chromium)" >&2; exit 1; }
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
timeout 120 chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
  --enable-logging=stderr --v=1 --window-size=1200,3200 \
  --screenshot="$shot" "file://$html" 2>"$log" >/dev/null || true
[ -s "$shot" ] || { echo "error: no screenshot written ($shot)" >&2; exit 1; }
if grep -q "CONSOLE" "$log"; then
  echo "error: console messages while rendering $html:" >&2
  grep "CONSOLE" "$log" >&2
  exit 1
fi
echo "ok: $html rendered with no console messages; screenshot $shot"
