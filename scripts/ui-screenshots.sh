#!/usr/bin/env bash
# Regenerates the web view's screenshots, docs/img/ui-nodes.png and docs/img/ui-workflow.png:
# builds metalgraph, starts `serve --demo` on loopback ports of its own with a fresh data
# directory, puts a few workflows in different states on the demo nodes, and photographs
# the pages in Debian's headless Chromium (tests/clients/ui_driver.py screenshots).
# Run scripts/install-peers.sh first (it installs chromium and Playwright).
set -euo pipefail
cd "$(dirname "$0")/.."

PEERS="${METALGRAPH_PEERS:-$HOME/.cache/metalgraph-peers}"
cargo build --quiet --bin metalgraph
target=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')

work=$(mktemp -d)
"$target/debug/metalgraph" serve --demo --listen 127.0.0.1:0 --node-listen 127.0.0.1:0 \
    --grpc-listen 127.0.0.1:0 --data-dir "$work/data" >"$work/serve.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT

base=""
for _ in $(seq 100); do
    base=$(sed -n 's/^metalgraph listening on //p' "$work/serve.log")
    [ -n "$base" ] && break
    sleep 0.1
done
if [ -z "$base" ]; then
    echo "ui-screenshots: metalgraph did not start:" >&2
    cat "$work/serve.log" >&2
    exit 1
fi

PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$PEERS/venv/bin/python" tests/clients/ui_driver.py \
    screenshots --base "$base" --token-file "$work/data/admin.token" --ca "$work/data/tls/ca.pem" \
    --out docs/img
