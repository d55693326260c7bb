#!/usr/bin/env bash
# Runs metalgraph's whole test suite on a fresh Debian machine (as root): installs the real
# peers the end-to-end tests talk to (ipmi_sim, sushy-tools, DHCP/TFTP clients, ...), checks
# formatting and lints, then runs every test of every crate.
set -euo pipefail
cd "$(dirname "$0")/.."

export METALGRAPH_PEERS="${METALGRAPH_PEERS:-$HOME/.cache/metalgraph-peers}"
scripts/install-peers.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --no-fail-fast
