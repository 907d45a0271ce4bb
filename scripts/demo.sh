#!/usr/bin/env bash
# A real dmsetup session against dmemu: start a daemon, create a linear device over a file,
# show its table, status and info, remove it, stop the daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${DMEMU_BIN:-target/release/dmemu}
[ -x "$BIN" ] || cargo build --release --workspace
work=$(mktemp -d /tmp/dmemu-demo.XXXXXX)
sock=$work/control.sock
"$BIN" serve --socket "$sock" 2>"$work/daemon.log" &
daemon=$!
trap 'kill $daemon 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
truncate -s 64M "$work/disk.img"

run() { echo "\$ dmsetup $*"; "$BIN" exec --socket "$sock" -- dmsetup "$@"; }
run version
run create demo --table "0 131072 linear $work/disk.img 0"
run ls
run table demo
run status demo
run info demo
run remove demo
run ls
