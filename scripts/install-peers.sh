#!/bin/sh
# Installs the real peers metalgraph's BMC tests run against, on a fresh Debian machine, as
# root. Idempotent: what is already installed is skipped, so CI can run it on every job.
#
#   - OpenIPMI's `ipmi_sim` (package openipmi) and `ipmitool`: the IPMI BMC and the client
#     the `ipmi-obm-service` driver runs (tasks/tests/bmc_ipmi.rs).
#   - tftpd-hpa, nginx-light and curl: the peers and client of the boot-file benchmark.
#   - Kea (kea-dhcp4) and perfdhcp (in kea-admin), from pxe/tests/PACKAGES: also the peer
#     and the client of the DHCP benchmark (benches/harness/dhcp.rs, `--only dhcp`).
#   - sushy-tools in a Python venv: the stateful Redfish BMC emulator
#     (tasks/tests/bmc_redfish.rs). Its dependency `bcrypt` also writes the htpasswd file
#     for the Basic-auth tests.
#   - PostgreSQL's server (initdb, postgres): each test binary that needs it starts a
#     throwaway cluster of its own (testkit `Postgres`; store/tests/conformance.rs).
#   - Debian's chromium and Playwright for Python in the same venv: the web view's
#     browser tests (tests/ui.rs) and its screenshots (scripts/ui-screenshots.sh).
#     Playwright drives /usr/bin/chromium; its own browser download is never used.
#   - genisoimage's `isoinfo`: reads the configuration media metalgraph writes back, with
#     a tool that shares no code with the writer (tests/e2e_config_media.rs and the unit
#     tests of tasks/src/config_media/).
#
# The venv lives under ${METALGRAPH_PEERS:-$HOME/.cache/metalgraph-peers}; the tests look
# there (or wherever METALGRAPH_PEERS points).
set -eu

PEERS="${METALGRAPH_PEERS:-$HOME/.cache/metalgraph-peers}"
VENV="$PEERS/venv"

# apt-get installs the packages listed in $1 (space-separated), if any; root only.
apt_install() {
    [ -n "$1" ] || return 0
    if [ "$(id -u)" != 0 ]; then
        echo "install-peers: need root to apt-get install:$1" >&2
        exit 1
    fi
    echo "install-peers: apt-get install$1"
    apt-get update -q
    # shellcheck disable=SC2086 # the list is meant to split into words
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $1
}

need_apt=""
# The build itself: jemalloc's sources (tikv-jemalloc-sys) are built with make; ring's with cc.
command -v make >/dev/null 2>&1 || need_apt="$need_apt make"
command -v cc >/dev/null 2>&1 || need_apt="$need_apt gcc"
command -v ipmi_sim >/dev/null 2>&1 || need_apt="$need_apt openipmi"
command -v ipmitool >/dev/null 2>&1 || need_apt="$need_apt ipmitool"
[ -x /usr/bin/chromium ] || need_apt="$need_apt chromium"
command -v isoinfo >/dev/null 2>&1 || need_apt="$need_apt genisoimage"
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt="$need_apt postgresql"
command -v python3 >/dev/null 2>&1 || need_apt="$need_apt python3"
# The venv module is a separate package on Debian; probe it rather than guess.
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    need_apt="$need_apt python3-venv"
fi

apt_install "$need_apt"

if [ -x "$VENV/bin/sushy-emulator" ] && "$VENV/bin/python" -c 'import sushy_tools, bcrypt' >/dev/null 2>&1; then
    echo "install-peers: sushy-tools already installed in $VENV"
else
    echo "install-peers: creating $VENV with sushy-tools"
    mkdir -p "$PEERS"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check sushy-tools
fi

echo "install-peers: done"
echo "  ipmi_sim        $(command -v ipmi_sim)"
echo "  ipmitool        $(command -v ipmitool) ($(ipmitool -V 2>&1 | head -n1))"
echo "  isoinfo         $(command -v isoinfo)"
echo "  sushy-emulator  $VENV/bin/sushy-emulator ($("$VENV/bin/pip" show sushy-tools 2>/dev/null | sed -n 's/^Version: //p'))"
echo "  peers dir       $PEERS (export METALGRAPH_PEERS to move it)"

# gRPC clients metalgraph did not write (tests/grpc.rs): Python grpcio with code generated
# from proto/metalgraph.proto by grpcio-tools, and `buf curl` (npm @bufbuild/buf) for
# reflection.
if "$VENV/bin/python" -c 'import grpc, grpc_tools' >/dev/null 2>&1; then
    echo "install-peers: grpcio already installed in $VENV"
else
    echo "install-peers: installing grpcio and grpcio-tools into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check grpcio grpcio-tools
fi
# The reference parser of Prometheus metrics (tests/metrics.rs).
if "$VENV/bin/python" -c 'import prometheus_client' >/dev/null 2>&1; then
    echo "install-peers: prometheus_client already installed in $VENV"
else
    echo "install-peers: installing prometheus_client into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check prometheus_client
fi
# The web view's browser tests: Playwright's Python package (its wheel carries the driver
# it runs), pointed at Debian's chromium by the tests, so no browser is downloaded.
if "$VENV/bin/python" -c 'import playwright.sync_api' >/dev/null 2>&1; then
    echo "install-peers: playwright already installed in $VENV"
else
    echo "install-peers: installing playwright into $VENV"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$VENV/bin/pip" install -q --disable-pip-version-check playwright
fi
echo "  chromium        /usr/bin/chromium ($(/usr/bin/chromium --version 2>/dev/null | head -n1))"
echo "  playwright      $VENV ($("$VENV/bin/pip" show playwright 2>/dev/null | sed -n 's/^Version: //p'))"
# The OpenAPI tests (tests/openapi.rs): openapi-spec-validator checks the documents,
# schemathesis fuzzes both HTTP APIs against them.
if "$VENV/bin/python" -c 'import openapi_spec_validator' >/dev/null 2>&1 && [ -x "$VENV/bin/schemathesis" ]; then
    echo "install-peers: schemathesis and openapi-spec-validator already installed in $VENV"
else
    echo "install-peers: installing schemathesis and openapi-spec-validator into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check schemathesis openapi-spec-validator
fi
if [ -x "$PEERS/npm-tools/node_modules/.bin/buf" ]; then
    echo "install-peers: buf already installed"
elif command -v npm >/dev/null 2>&1; then
    echo "install-peers: installing @bufbuild/buf with npm"
    mkdir -p "$PEERS/npm-tools"
    (cd "$PEERS/npm-tools" && npm install --no-audit --no-fund --silent @bufbuild/buf >/dev/null)
else
    echo "install-peers: npm is missing; the buf reflection test will fail" >&2
fi
echo "  buf             $PEERS/npm-tools/node_modules/.bin/buf"

# DHCP and TFTP clients and servers the pxe crate's tests run against (busybox udhcpc,
# dhclient, nmap, Kea and perfdhcp, tftp-hpa, curl): the list lives in pxe/tests/PACKAGES,
# beside the tests that need it. QEMU is handled below, since it may need backports.
here=$(cd "$(dirname "$0")/.." && pwd)
need_clients=""
for pkg in $(grep -v '^#' "$here/pxe/tests/PACKAGES" | grep -v '^qemu-system-x86$'); do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || need_clients="$need_clients $pkg"
done
apt_install "$need_clients"

# The boot-file benchmark (benches/harness/boot.rs, `--only boot-files`) times metalgraph's
# TFTP and /files/ beside tftpd-hpa (`in.tftpd`) and nginx (with sendfile), with curl as the
# client. The harness runs both daemons itself, on free loopback ports with generated
# configurations. On a machine with systemd, installing them also starts their stock
# services (TFTP on port 69, HTTP on port 80); the harness does not need those.
need_bench=""
command -v in.tftpd >/dev/null 2>&1 || need_bench="$need_bench tftpd-hpa"
command -v nginx >/dev/null 2>&1 || need_bench="$need_bench nginx-light"
command -v curl >/dev/null 2>&1 || need_bench="$need_bench curl"
apt_install "$need_bench"
echo "  in.tftpd        $(command -v in.tftpd) ($(in.tftpd -V 2>&1 | head -n1))"
echo "  nginx           $(command -v nginx) ($(nginx -v 2>&1 | head -n1))"

# Network boot (pxe/tests, tests/pxe_boot.rs): QEMU boots real PXE firmware (SeaBIOS with
# the iPXE NIC ROM, and OVMF with EDK2's own PXE) against metalgraph's DHCP, TFTP and HTTP
# inside a network namespace. `ipxe` provides undionly.kpxe and snponly.efi in
# /usr/lib/ipxe; dnsmasq is used only as an IPv6 router-advertisement source (no DHCP, no
# TFTP), which saves iPXE ~13 s of IPv6 autoconfiguration per boot. The rack benchmark
# (benches/harness/rack.rs, `--only rack`) runs dnsmasq as its peer DHCP server and serves
# ipxe's undionly.kpxe.
# Debian 12 images that carry qemu-utils from bookworm-backports cannot install bookworm's
# qemu-system-x86 (qemu-utils Breaks qemu-system-common < 1:8.0), so QEMU comes from
# bookworm-backports too, whose source is added when missing.
need_pxe=""
for pkg in ipxe ovmf iproute2 ethtool dnsmasq-base; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || need_pxe="$need_pxe $pkg"
done
if [ -n "$need_pxe" ] || ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        echo "install-peers: need root to install QEMU and:$need_pxe" >&2
        exit 1
    fi
    backports=""
    if grep -q 'VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then
        backports=/etc/apt/sources.list.d/bookworm-backports.sources
        if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
            echo "install-peers: adding the bookworm-backports source"
            cat > "$backports" <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
        fi
    fi
    apt-get update -q
    if [ -n "$need_pxe" ]; then
        # shellcheck disable=SC2086 # the list is meant to split into words
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $need_pxe
    fi
    if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
        if [ -n "$backports" ]; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                -t bookworm-backports qemu-system-x86
        else
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86
        fi
    fi
fi
echo "  qemu            $(command -v qemu-system-x86_64) ($(qemu-system-x86_64 --version | head -n1))"
echo "  ipxe            $(ls /usr/lib/ipxe/undionly.kpxe /usr/lib/ipxe/snponly.efi 2>/dev/null | tr '\n' ' ')"
