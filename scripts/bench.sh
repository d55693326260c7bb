#!/usr/bin/env bash
# Runs metalgraph's benchmark harness (BENCHMARKS.md) on a fresh Debian machine: installs
# what the benchmarks drive (wrk, curl, tftpd-hpa and nginx-light, Kea's kea-dhcp4 and
# perfdhcp, dnsmasq, ipxe's undionly.kpxe, iproute2 from apt, a Python venv with OpenStack
# TaskFlow and SQLAlchemy for the peer), then `cargo bench --bench harness`, which builds in
# release, prints the report on stdout and writes it under target/tmp/. The DHCP and rack
# scenarios need root (they create network namespaces); without it the harness skips them
# with a note.
#
#   scripts/bench.sh                  # the published figures (about 13 minutes after the
#                                     # build, 9 of them the DHCP scenario's searches)
#   scripts/bench.sh --quick          # smaller sizes, under a minute after the build
#   scripts/bench.sh --backends file --only chain,fanout
#   scripts/bench.sh --install-only   # only install wrk and the venv (for CI, so that the
#                                     # smoke test tests/bench_smoke.rs covers them too)
#
# Arguments go to the harness (see `cargo bench --bench harness -- --help`). The venv lives
# under ${METALGRAPH_PEERS:-$HOME/.cache/metalgraph-peers}/bench-venv; set
# METALGRAPH_BENCH_NO_INSTALL=1 to skip the installation steps (missing pieces are then
# skipped by the harness with a note).
set -euo pipefail
cd "$(dirname "$0")/.."

PEERS="${METALGRAPH_PEERS:-$HOME/.cache/metalgraph-peers}"
VENV="$PEERS/bench-venv"
export METALGRAPH_PEERS="$PEERS"

if [ "${METALGRAPH_BENCH_NO_INSTALL:-0}" != 1 ]; then
    need_apt=""
    command -v wrk >/dev/null 2>&1 || need_apt="$need_apt wrk"
    # The boot-file scenario's client and peers: curl, tftpd-hpa's in.tftpd, nginx.
    command -v curl >/dev/null 2>&1 || need_apt="$need_apt curl"
    command -v in.tftpd >/dev/null 2>&1 || need_apt="$need_apt tftpd-hpa"
    command -v nginx >/dev/null 2>&1 || need_apt="$need_apt nginx-light"
    # The DHCP scenario's peer and client: kea-dhcp4 (kea-dhcp4-server) and perfdhcp (which
    # Debian ships in kea-admin), and `ip` for the network namespaces. On a machine with
    # systemd, installing Kea also starts its stock service; the harness does not need it.
    command -v kea-dhcp4 >/dev/null 2>&1 || [ -x /usr/sbin/kea-dhcp4 ] || need_apt="$need_apt kea-dhcp4-server"
    command -v perfdhcp >/dev/null 2>&1 || [ -x /usr/sbin/perfdhcp ] || need_apt="$need_apt kea-admin"
    command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || need_apt="$need_apt iproute2"
    # The rack scenario's DHCP peer (dnsmasq, DHCP only) and the boot file its machines
    # fetch over TFTP (Debian's undionly.kpxe; without it the harness writes a stand-in).
    command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need_apt="$need_apt dnsmasq-base"
    [ -f /usr/lib/ipxe/undionly.kpxe ] || need_apt="$need_apt ipxe"
    command -v python3 >/dev/null 2>&1 || need_apt="$need_apt python3"
    # The venv module is a separate package on Debian; probe it rather than guess.
    if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        need_apt="$need_apt python3-venv"
    fi
    if [ -n "$need_apt" ]; then
        if [ "$(id -u)" = 0 ]; then
            sudo=""
        elif command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            echo "bench.sh: need root to apt-get install:$need_apt" >&2
            exit 1
        fi
        echo "bench.sh: apt-get install$need_apt"
        $sudo apt-get update -q
        # shellcheck disable=SC2086 # the list is meant to split into words
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends $need_apt
    fi

    # The peer's packages are pinned (scripts/bench/requirements.txt): taskflow, SQLAlchemy
    # and alembic, which TaskFlow's SQLAlchemy backend creates its tables with (the
    # `taskflow[database]` extra would also pull drivers for MySQL and PostgreSQL).
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import taskflow, sqlalchemy, alembic' >/dev/null 2>&1; then
        echo "bench.sh: TaskFlow already installed in $VENV"
    else
        echo "bench.sh: creating $VENV with TaskFlow (scripts/bench/requirements.txt)"
        mkdir -p "$PEERS"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q --disable-pip-version-check -r scripts/bench/requirements.txt
    fi
    echo "bench.sh: wrk $(wrk --version 2>&1 | head -n1 | awk '{print $2}'), TaskFlow $("$VENV/bin/pip" show taskflow 2>/dev/null | sed -n 's/^Version: //p'), Kea $(PATH="$PATH:/usr/sbin" kea-dhcp4 -V 2>/dev/null | head -n1)"
fi

if [ "${1:-}" = --install-only ]; then
    exit 0
fi
exec cargo bench --bench harness -- "$@"
