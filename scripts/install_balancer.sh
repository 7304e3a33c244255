#!/usr/bin/env bash
# Install the load balancer that deploy/haproxy.cfg and tests/test_replicas.py use (HAProxy,
# from the distribution's packages). Idempotent and quiet: does nothing when `haproxy` is
# already on the PATH; otherwise apt-get (as root, or through passwordless sudo).
# Exits non-zero with one clear message when it cannot install.
#
#   scripts/install_balancer.sh
set -euo pipefail

have() { command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; }
have && exit 0

fail() {
  echo "install_balancer.sh: $1" >&2
  echo "install_balancer.sh: install HAProxy (>= 2.2) yourself, e.g. 'apt-get install haproxy' (Debian/Ubuntu)," \
       "'dnf install haproxy' (Fedora/RHEL) or 'brew install haproxy' (macOS); tests/test_replicas.py needs it" >&2
  exit 1
}

command -v apt-get >/dev/null 2>&1 || fail "haproxy is not installed and apt-get is not available"
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  fail "haproxy is not installed, and installing it needs root (or passwordless sudo)"
fi

echo "== installing haproxy (apt-get)"
export DEBIAN_FRONTEND=noninteractive
# the package list may be missing (fresh containers) or stale: update once, then install;
# the package's own service is not needed (the test and deploy/ start haproxy themselves)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
${as_root[@]+"${as_root[@]}"} apt-get update -qq >"$log" 2>&1 || { cat "$log" >&2; fail "apt-get update failed"; }
${as_root[@]+"${as_root[@]}"} apt-get install -y -qq --no-install-recommends haproxy >"$log" 2>&1 \
  || { cat "$log" >&2; fail "apt-get install haproxy failed"; }
have || fail "apt-get installed haproxy but no haproxy binary was found"
