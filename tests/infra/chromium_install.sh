#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the browser tests, if it is missing.
#
# Usage: tests/infra/chromium_install.sh      prints the browser's path on success.
# Exit status: 0 = installed (or already there); 77 = cannot install (not root, no apt-get, apt
# failed): callers skip on 77.
set -euo pipefail

SKIP=77
log() { printf '[chromium_install %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
skip() { log "SKIP: $*"; exit "$SKIP"; }

for candidate in chromium chromium-browser google-chrome; do
    if path=$(command -v "$candidate"); then
        log "already installed: $path"
        echo "$path"
        exit 0
    fi
done

[[ $(id -u) -eq 0 ]] || skip "not root: cannot apt-get install chromium"
command -v apt-get >/dev/null || skip "apt-get not available to install chromium"

export DEBIAN_FRONTEND=noninteractive
LOG=$(mktemp -t chromium-apt.XXXXXX.log)
t0=$(date +%s)
install() {
    apt-get install -y -q -o DPkg::Lock::Timeout=300 chromium >>"$LOG" 2>&1
}
if ! install; then
    log "install failed; refreshing package lists once"
    apt-get update -q >>"$LOG" 2>&1 || skip "apt-get update failed (see $LOG)"
    install || skip "apt-get install chromium failed (see $LOG)"
fi
path=$(command -v chromium) || skip "chromium still missing after apt-get install (see $LOG)"
log "installed $($path --version 2>/dev/null) in $(( $(date +%s) - t0 )) s"
echo "$path"
