#!/usr/bin/env bash
# Data-plane benchmark: fio's nbd engine against dmemu's NBD export of a linear device over a
# 1 GiB file in /dev/shm, and against qemu-nbd, nbdkit file and nbdkit null serving the same file,
# all in one run; then the cost of stacking linear devices (1, 2, 3 layers). Results go to stdout
# as markdown (docs/PERFORMANCE.md, "Data plane").
#
#   cargo build --release --workspace && scripts/bench-nbd.sh
#
# Environment: RUNTIME (seconds per fio run, default 10), REPS (runs per cell, median, default 1),
# ROWS (subset of row names, e.g. "randread-qd32 read-qd1"), LAYERS=0 to skip the stacking table,
# VARIANTS (extra dmemu servers, each with one environment setting, e.g. "DMEMU_NBD_WORKERS=0
# DMEMU_NBD_INLINE=0": the IO-mechanism comparison), PIN=1 to run fio on CPU 0 and every server
# on CPU 1 (qd1 figures otherwise depend on whether the scheduler puts client and server on one
# vCPU), KEEP=1 to keep the work directory, BEFORE=path/to/an/older/dmemu for a column of that
# build's daemon beside this one (the before/after comparison of a change, one run).
# Needs: fio nbdkit qemu-utils (apt-get install -y fio nbdkit qemu-utils), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DMEMU=${DMEMU:-$ROOT/target/release/dmemu}
RUNTIME=${RUNTIME:-10}
REPS=${REPS:-1}
LAYERS=${LAYERS:-1}
VARIANTS=${VARIANTS:-}
BEFORE=${BEFORE:-}
PIN=${PIN:-0}
ALL_ROWS="read-qd1 read-qd32 write-qd1 write-qd32 randread-qd1 randread-qd32 randwrite-qd1 randwrite-qd32"
ROWS=${ROWS:-$ALL_ROWS}

for t in fio nbdkit qemu-nbd python3; do
  command -v $t >/dev/null || { echo "missing $t (apt-get install -y fio nbdkit qemu-utils)" >&2; exit 1; }
done
[ -x "$DMEMU" ] || { echo "build first: cargo build --release --workspace" >&2; exit 1; }

W=$(mktemp -d /dev/shm/dmemu-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in "$W"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  [ "${KEEP:-0}" = 1 ] || rm -rf "$W"
}
trap cleanup EXIT

F=$W/disk.img
# A fully written file (no holes), as a real image would be.
dd if=/dev/zero of="$F" bs=1M count=1024 status=none

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

SERVER_CPU=() FIO_CPU=()
if [ "$PIN" = 1 ]; then SERVER_CPU=(taskset -c 1) FIO_CPU=(taskset -c 0); fi

# dmemu daemons: the default one (a), and one per variant.
start_dmemu() { # tag [VAR=value] [binary]
  local d=$W/dmemu-$1 bin=${3:-$DMEMU}
  mkdir -p "$d"
  env ${2:-} "${SERVER_CPU[@]}" "$bin" serve --socket "$d/control.sock" --run-dir "$d" --nbd "unix:$d/nbd.sock" --log warn &
  PIDS+=($!)
  wait_sock "$d/nbd.sock"
  wait_sock "$d/control.sock"
  local dm="$bin exec --socket $d/control.sock -- dmsetup"
  $dm create lin1 --table "0 2097152 linear $F 0"
  if [ "$1" = main ] && [ "$LAYERS" = 1 ]; then
    local l1 l2
    l1=$($dm info -c --noheadings -o major,minor lin1 | tr -d ' ')
    $dm create lin2 --table "0 2097152 linear $l1 0"
    l2=$($dm info -c --noheadings -o major,minor lin2 | tr -d ' ')
    $dm create lin3 --table "0 2097152 linear $l2 0"
    # One extra layer of a target that owns its IO, doing nothing: flakey never down, delay 0.
    $dm create flk --table "0 2097152 flakey $l1 0 1000000 0"
    $dm create dly --table "0 2097152 delay $l1 0 0"
  fi
}
start_dmemu main
n=0
for v in $VARIANTS; do n=$((n + 1)); start_dmemu "v$n" "$v"; done
[ -n "$BEFORE" ] && start_dmemu before "" "$BEFORE"

"${SERVER_CPU[@]}" qemu-nbd -f raw -t -x disk --shared=8 --socket="$W/qemu.sock" --fork --pid-file="$W/qemu.pid" "$F"
"${SERVER_CPU[@]}" nbdkit -U "$W/kfile.sock" -P "$W/kfile.pid" file file="$F"
"${SERVER_CPU[@]}" nbdkit -U "$W/knull.sock" -P "$W/knull.pid" null 1G
wait_sock "$W/qemu.sock"; wait_sock "$W/kfile.sock"; wait_sock "$W/knull.sock"

declare -A URI
URI[dmemu]="nbd+unix:///lin1?socket=$W/dmemu-main/nbd.sock"
URI[qemu-nbd]="nbd+unix:///disk?socket=$W/qemu.sock"
URI[nbdkit-file]="nbd+unix:///?socket=$W/kfile.sock"
URI[nbdkit-null]="nbd+unix:///?socket=$W/knull.sock"
URI[layer2]="nbd+unix:///lin2?socket=$W/dmemu-main/nbd.sock"
URI[layer3]="nbd+unix:///lin3?socket=$W/dmemu-main/nbd.sock"
URI[flakey]="nbd+unix:///flk?socket=$W/dmemu-main/nbd.sock"
URI[delay0]="nbd+unix:///dly?socket=$W/dmemu-main/nbd.sock"
URI[before]="nbd+unix:///lin1?socket=$W/dmemu-before/nbd.sock"
SERVERS="dmemu qemu-nbd nbdkit-file nbdkit-null"
n=0
for v in $VARIANTS; do n=$((n + 1)); URI[$v]="nbd+unix:///lin1?socket=$W/dmemu-v$n/nbd.sock"; SERVERS="$SERVERS $v"; done
[ -n "$BEFORE" ] && SERVERS="$SERVERS before"
[ "$LAYERS" = 1 ] && SERVERS="$SERVERS layer2 layer3 flakey delay0"

# One fio run: prints MiB/s (sequential rows) or IOPS (random rows).
fio_one() { # uri row
  local rw=${2%-qd*} qd=${2#*-qd} bs=1M
  case $rw in rand*) bs=4k ;; esac
  "${FIO_CPU[@]}" fio --name=j --ioengine=nbd --uri="$1" --runtime="$RUNTIME" --time_based --rw="$rw" --bs=$bs \
      --iodepth="$qd" --output-format=json 2>/dev/null |
    python3 -c '
import json, sys
t = sys.stdin.read(); j = json.loads(t[t.index("{"):])["jobs"][0]
rw = "read" if j["read"]["io_bytes"] else "write"
print(j[rw]["iops"] if sys.argv[1].startswith("rand") else j[rw]["bw_bytes"] / 2**20)' "$rw"
}
median() { python3 -c 'import statistics,sys; print(statistics.median(map(float, sys.argv[1:])))' "$@"; }

declare -A R
for row in $ROWS; do
  for s in $SERVERS; do R[$row,$s]=""; done
  for rep in $(seq "$REPS"); do
    # Servers interleaved within a row, so drift hits them alike; each repetition starts one
    # server later, so no server always runs first (or right after the null plugin).
    read -ra order <<<"$SERVERS"
    k=$(( (rep - 1) % ${#order[@]} ))
    for s in "${order[@]:k}" "${order[@]:0:k}"; do R[$row,$s]="${R[$row,$s]} $(fio_one "${URI[$s]}" "$row")"; done
  done
  for s in $SERVERS; do R[$row,$s]=$(median ${R[$row,$s]}); done
  echo "done $row" >&2
done

python3 - "$ROWS" "$SERVERS" "$(for k in "${!R[@]}"; do echo "$k=${R[$k]}"; done)" <<'EOF'
import sys
rows, servers, kv = sys.argv[1].split(), sys.argv[2].split(), sys.argv[3]
R = {}
for line in kv.splitlines():
    k, v = line.rsplit("=", 1)
    R[tuple(k.split(",", 1))] = float(v)
names = {"read": "1 MiB seq read", "write": "1 MiB seq write", "randread": "4 KiB randread", "randwrite": "4 KiB randwrite"}
def label(r):
    rw, qd = r.rsplit("-qd", 1)
    return f"{names[rw]}, qd{qd}"
def fmt(r, v):
    return f"{v/1000:.1f}k IOPS" if r.startswith("rand") else f"{v:.0f} MiB/s"
peers = ["dmemu", "qemu-nbd", "nbdkit-file", "nbdkit-null"]
var = [s for s in servers if "=" in s]
before = "before" in servers
print("| figure | dmemu | qemu-nbd | nbdkit file | nbdkit null | dmemu / best of qemu-nbd, nbdkit file |"
      + (" dmemu before | after / before |" if before else "")
      + "".join(f" dmemu {v.removeprefix('DMEMU_NBD_')} |" for v in var))
print("|---|---|---|---|---|---|" + ("---|---|" if before else "") + "---|" * len(var))
for r in rows:
    best = max(R[(r, "qemu-nbd")], R[(r, "nbdkit-file")])
    cells = " | ".join(fmt(r, R[(r, s)]) for s in peers)
    b = f" {fmt(r, R[(r, 'before')])} | **{R[(r, 'dmemu')] / R[(r, 'before')]:.2f}** |" if before else ""
    extra = "".join(f" {fmt(r, R[(r, v)])} ({R[(r, v)] / R[(r, 'dmemu')]:.2f}) |" for v in var)
    print(f"| {label(r)} | {cells} | **{R[(r, 'dmemu')] / best:.2f}** |{b}{extra}")
if "layer2" in servers:
    print()
    print("| figure | 1 layer | 2 layers | 3 layers | cost of layer 2 | cost of layer 3 | flakey over layer 1 | delay 0 over layer 1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b, c = R[(r, "dmemu")], R[(r, "layer2")], R[(r, "layer3")]
        f, d = R[(r, "flakey")], R[(r, "delay0")]
        print(f"| {label(r)} | {fmt(r, a)} | {fmt(r, b)} | {fmt(r, c)} | {(1 - b / a) * 100:+.1f} % | {(1 - c / b) * 100:+.1f} %"
              f" | {fmt(r, f)} ({(1 - f / a) * 100:+.1f} %) | {fmt(r, d)} ({(1 - d / a) * 100:+.1f} %) |")
EOF
