#!/usr/bin/env bash
# `make test` from a clean clone of HEAD while stress-ng keeps every core busy: the suite's verdict must
# not depend on how much of the machine it gets. Prints the wall time. Usage: scripts/test-beside-hog.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
command -v stress-ng >/dev/null || apt-get install -y stress-ng || (apt-get update && apt-get install -y stress-ng)
work="$(mktemp -d)"
git clone --quiet "$root" "$work/fnserve"
stress-ng --cpu "$(nproc)" --timeout 0 --quiet &
hog=$!
trap 'kill "$hog" 2>/dev/null; wait "$hog" 2>/dev/null; rm -rf "$work"' EXIT
start=$(date +%s)
status=0
(cd "$work/fnserve" && make test) || status=$?
echo "make test beside stress-ng --cpu $(nproc): exit $status after $(( $(date +%s) - start )) s (set-up included)"
exit "$status"
