#!/usr/bin/env bash
# Screenshot of the demo page (app.py) with headless Chromium, e.g. for the README.
#
#   bash scripts/screenshot_demo.sh                      # smoke weights -> docs/demo.png
#   bash scripts/screenshot_demo.sh out.png --ckpt weights/BiMaCoSR.pth   # other app.py flags
#
# Starts app.py with $PYTHON (default python3) on 127.0.0.1 (port $PORT, default 7870), waits until
# it answers (at most $WAIT_S seconds, default 300), takes the picture, stops the app. Needs
# Chromium: on Debian/Ubuntu
#   apt-get update && apt-get install -y chromium
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-docs/demo.png}"
shift || true
app_args=("$@")
[ ${#app_args[@]} -eq 0 ] && app_args=(--smoke)
port="${PORT:-7870}"
wait_s="${WAIT_S:-300}"

browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
if [ -z "$browser" ]; then
    echo "error: Chromium not found; install it with: apt-get update && apt-get install -y chromium" >&2
    exit 1
fi

log="$(mktemp)"
"${PYTHON:-python3}" app.py "${app_args[@]}" --host 127.0.0.1 --port "$port" >"$log" 2>&1 &
app=$!
trap 'kill "$app" 2>/dev/null; wait "$app" 2>/dev/null || true; rm -f "$log"' EXIT

url="http://127.0.0.1:$port/"
for ((i = 0; i < wait_s; i++)); do
    if ! kill -0 "$app" 2>/dev/null; then
        echo "error: app.py stopped:" >&2; cat "$log" >&2; exit 1
    fi
    curl -sf -o /dev/null "$url" && break
    sleep 1
done
curl -sf -o /dev/null "$url" || { echo "error: $url did not answer in ${wait_s} s" >&2; cat "$log" >&2; exit 1; }

mkdir -p "$(dirname "$out")"
profile="$(mktemp -d)"
# --no-sandbox: Chromium refuses to run as root otherwise; the page is our own, on loopback.
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run \
    --user-data-dir="$profile" --window-size=1280,1000 --virtual-time-budget=20000 \
    --screenshot="$out" "$url" >/dev/null 2>&1
rm -rf "$profile"
echo "$out"
