#!/usr/bin/env bash
# The IO mechanism on its own: fio straight on a 1 GiB file in /dev/shm (the backing file of
# scripts/bench-nbd.sh), one thread, with positioned IO (`psync`: pread/pwrite, what dmemu's data
# plane does) and with io_uring (`io_uring`: batched submission and completion), at the rows of
# the NBD benchmark. Shows what each mechanism costs per request next to what one NBD request
# costs (docs/PERFORMANCE.md, "Data plane", "IO mechanism").
#
#   scripts/bench-io-mechanism.sh
#
# Environment: RUNTIME (seconds per fio run, default 5), REPS (median of, default 3).
# Needs: fio, python3.
set -euo pipefail
RUNTIME=${RUNTIME:-5}
REPS=${REPS:-3}
W=$(mktemp -d /dev/shm/dmemu-mech.XXXXXX)
trap 'rm -rf "$W"' EXIT
F=$W/disk.img
dd if=/dev/zero of="$F" bs=1M count=1024 status=none

one() { # engine row
  local rw=${2%-qd*} qd=${2#*-qd} bs=1M
  case $rw in rand*) bs=4k ;; esac
  fio --name=j --filename="$F" --ioengine="$1" --rw="$rw" --bs=$bs --iodepth="$qd" --runtime="$RUNTIME" \
      --time_based --output-format=json 2>/dev/null |
    python3 -c '
import json, sys
t = sys.stdin.read(); j = json.loads(t[t.index("{"):])["jobs"][0]
rw = "read" if j["read"]["io_bytes"] else "write"
print(j[rw]["iops"])'
}

echo "| figure | psync (pread/pwrite) | io_uring | psync µs per request | io_uring µs per request |"
echo "|---|---|---|---|---|"
for row in read-qd1 read-qd32 write-qd32 randread-qd1 randread-qd32 randwrite-qd1 randwrite-qd32; do
  declare -A v=()
  for e in psync io_uring; do
    xs=""
    for _ in $(seq "$REPS"); do xs="$xs $(one $e $row)"; done
    v[$e]=$(python3 -c 'import statistics,sys; print(statistics.median(map(float, sys.argv[1:])))' $xs)
  done
  python3 - "$row" "${v[psync]}" "${v[io_uring]}" <<'PY'
import sys
row, p, u = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
rw, qd = row.rsplit("-qd", 1)
names = {"read": "1 MiB seq read", "write": "1 MiB seq write", "randread": "4 KiB randread", "randwrite": "4 KiB randwrite"}
big = not rw.startswith("rand")
fmt = (lambda x: f"{x:.0f} MiB/s") if big else (lambda x: f"{x/1000:.0f}k IOPS")
print(f"| {names[rw]}, qd{qd} (psync: qd1) | {fmt(p)} | {fmt(u)} | {1e6/p:.2f} | {1e6/u:.2f} |")
PY
done
