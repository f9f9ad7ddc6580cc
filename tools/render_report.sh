#!/usr/bin/env bash
# tools/render_report.sh: render an HTML file (e.g. a run's report.html) to a PNG with headless Chromium,
# to look at `mlm report` pages without a desktop. Usage: tools/render_report.sh REPORT.html [OUT.png] [WxH]
set -euo pipefail
if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
  echo "usage: $0 REPORT.html [OUT.png (default: REPORT.png)] [WIDTHxHEIGHT (default: 1200x2000)]" >&2
  exit 2
fi
html="$1"
out="${2:-${html%.html}.png}"
size="${3:-1200x2000}"
[ -f "$html" ] || { echo "render_report.sh: $html: no such file" >&2; exit 1; }
browser=""
for b in chromium chromium-browser google-chrome; do
  if command -v "$b" >/dev/null; then browser="$b"; break; fi
done
[ -n "$browser" ] || { echo "render_report.sh: no chromium; install it with: apt-get install -y chromium" >&2; exit 1; }
abs="$(cd "$(dirname "$html")" && pwd)/$(basename "$html")"
out_abs="$(cd "$(dirname "$out")" && pwd)/$(basename "$out")"
# --no-sandbox: containers run as root, where Chromium's sandbox refuses to start. A throwaway profile keeps
# runs independent; Chromium's chatter on stderr is dropped unless it fails.
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
if ! "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$profile" \
    --screenshot="$out_abs" --window-size="${size/x/,}" "file://$abs" >"$profile/log" 2>&1; then
  cat "$profile/log" >&2
  exit 1
fi
[ -s "$out_abs" ] || { cat "$profile/log" >&2; echo "render_report.sh: no screenshot written" >&2; exit 1; }
echo "$out_abs"
