#!/usr/bin/env bash
# Multipath benchmark, in one run of one dmemu daemon over one 1 GiB file in /dev/shm, every path a
# `linear` device over that file: (1) throughput over NBD (fio's nbd engine) of 2-path multipath
# devices with the round-robin and service-time selectors, against a plain linear device over the
# same file (the peer), as ratios; (2) failover time: from a path's first error (the daemon's
# "Failing path" log line) to the next IO completed at a qd1 client, while the script swaps one
# path's table to `error`; (3) fail/reinstate cycles under a verifying fio write load. Results go
# to stdout as markdown (docs/PERFORMANCE.md, "multipath").
#
#   cargo build --release --workspace && scripts/bench-multipath.sh
#
# Environment: RUNTIME (seconds per fio run, default 10), REPS (runs per cell, median, default 1),
# ROWS (subset of "randread-qd32 read-qd1 read-qd32"), FAILOVERS (failovers per selector, default
# 10), CYCLES (fail/reinstate cycles, default 100), PIN=1 to run the clients on CPU 0 and the
# daemon on CPU 1, KEEP=1 to keep the work directory (daemon log, per-IO latencies).
# Needs: fio (apt-get install -y fio), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DMEMU=${DMEMU:-$ROOT/target/release/dmemu}
RUNTIME=${RUNTIME:-10}
REPS=${REPS:-1}
FAILOVERS=${FAILOVERS:-10}
CYCLES=${CYCLES:-100}
PIN=${PIN:-0}
ROWS=${ROWS:-randread-qd32 read-qd1 read-qd32}
SECTORS=2097152 # 1 GiB
[ "$FAILOVERS" -ge 1 ] && [ "$CYCLES" -ge 1 ] || { echo "FAILOVERS and CYCLES must be at least 1" >&2; exit 1; }

for t in fio python3; do
  command -v $t >/dev/null || { echo "missing $t (apt-get install -y fio)" >&2; exit 1; }
done
[ -x "$DMEMU" ] || { echo "build first: cargo build --release --workspace" >&2; exit 1; }

W=$(mktemp -d /dev/shm/dmemu-bench-mp.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ "${KEEP:-0}" = 1 ] && echo "kept $W" >&2 || rm -rf "$W"
}
trap cleanup EXIT
die() { echo "bench-multipath: $*" >&2; exit 1; }

F=$W/disk.img
# A fully written file (no holes), as a real image would be.
dd if=/dev/zero of="$F" bs=1M count=1024 status=none

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; die "no socket $1"; }

SERVER_CPU=() CLIENT_CPU=()
if [ "$PIN" = 1 ]; then SERVER_CPU=(taskset -c 1) CLIENT_CPU=(taskset -c 0); fi

# One daemon; warn level, so the log holds the target's "Failing path" / "Reinstating path" lines
# (with microsecond wall-clock timestamps) and anything that went wrong.
D=$W/dmemu
mkdir -p "$D"
"${SERVER_CPU[@]}" "$DMEMU" serve --socket "$D/control.sock" --run-dir "$D" --nbd "unix:$D/nbd.sock" --log warn \
  2>"$W/daemon.log" &
DAEMON=$!
PIDS+=($DAEMON)
wait_sock "$D/nbd.sock"
wait_sock "$D/control.sock"
dm() { "$DMEMU" exec --socket "$D/control.sock" -- dmsetup "$@"; }
devno() { dm info -c --noheadings -o major,minor "$1" | tr -d ' '; }
alive() { kill -0 "$DAEMON" 2>/dev/null || die "the daemon died (log: $W/daemon.log)"; }

# The peer, and two multipath devices over two linear paths each (paths of their own, so a
# failover test on one leaves the other alone).
LINEAR="0 $SECTORS linear $F 0"
for n in lin rr1 rr2 st1 st2 spare; do dm create $n --table "$LINEAR"; done
declare -A DEV
for n in rr1 rr2 st1 st2; do DEV[$n]=$(devno $n); done
dm create mprr --table "0 $SECTORS multipath 0 0 1 1 round-robin 0 2 1 ${DEV[rr1]} 1 ${DEV[rr2]} 1"
dm create mpst --table "0 $SECTORS multipath 0 0 1 1 service-time 0 2 2 ${DEV[st1]} 1 1 ${DEV[st2]} 1 1"
declare -A PATHS=([mprr]="rr1 rr2" [mpst]="st1 st2")
uri() { echo "nbd+unix:///$1?socket=$D/nbd.sock"; }

# ---- 1. Throughput ----------------------------------------------------------------------------
# One fio run: prints MiB/s (sequential rows) or IOPS (random rows).
fio_one() { # device row
  local rw=${2%-qd*} qd=${2#*-qd} bs=1M
  case $rw in rand*) bs=4k ;; esac
  "${CLIENT_CPU[@]}" fio --name=j --ioengine=nbd --uri="$(uri "$1")" --runtime="$RUNTIME" --time_based --rw="$rw" \
      --bs=$bs --iodepth="$qd" --output-format=json 2>/dev/null |
    python3 -c '
import json, sys
t = sys.stdin.read(); j = json.loads(t[t.index("{"):])["jobs"][0]
if j["error"]: sys.exit("fio error %d" % j["error"])
print(j["read"]["iops"] if sys.argv[1].startswith("rand") else j["read"]["bw_bytes"] / 2**20)' "$rw"
}
median() { python3 -c 'import statistics,sys; print(statistics.median(map(float, sys.argv[1:])))' "$@"; }

SERVERS="lin mprr mpst"
declare -A R
for row in $ROWS; do
  for s in $SERVERS; do R[$row,$s]=""; done
  for rep in $(seq "$REPS"); do
    # Devices interleaved within a row, so drift hits them alike; each repetition starts one
    # device later, so none always runs first.
    read -ra order <<<"$SERVERS"
    k=$(( (rep - 1) % ${#order[@]} ))
    for s in "${order[@]:k}" "${order[@]:0:k}"; do R[$row,$s]="${R[$row,$s]} $(fio_one "$s" "$row")"; done
  done
  for s in $SERVERS; do R[$row,$s]=$(median ${R[$row,$s]}); done
  alive
  echo "done $row" >&2
done

# ---- 2. Failover time -------------------------------------------------------------------------
# A qd1 client (4 KiB reads at random offsets, one at a time) that stamps each request's send and
# its reply's arrival with the wall clock, the clock of the daemon's log timestamps.
cat >"$W/qd1.py" <<'EOF'
import os, random, socket, struct, sys, time
sock_path, export, stop_file, out = sys.argv[1:5]
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)  # an IO that never completes fails the run instead of hanging it
s.connect(sock_path)
def rd(n):
    b = bytearray()
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError("server closed the connection")
        b += c
    return bytes(b)
if rd(18)[:16] != b"NBDMAGICIHAVEOPT":
    sys.exit("not a fixed-newstyle NBD server")
s.sendall(struct.pack(">I", 3))  # NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
name = export.encode()
s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name)  # NBD_OPT_EXPORT_NAME
size, _ = struct.unpack(">QH", rd(10))
blocks, rng, log, h = size // 4096, random.Random(1), [], 0
open(out + ".ready", "w").close()
while not os.path.exists(stop_file):
    for _ in range(64):
        h += 1
        t0 = time.time_ns()
        s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, h, rng.randrange(blocks) * 4096, 4096))
        magic, err, handle = struct.unpack(">IIQ", rd(16))
        if magic != 0x67446698 or handle != h:
            sys.exit(f"bad reply: magic {magic:#x}, handle {handle} (expected {h})")
        if err == 0:
            rd(4096)
        log.append((t0, time.time_ns(), err))
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))  # NBD_CMD_DISC
with open(out, "w") as f:
    f.writelines(f"{a} {b} {e}\n" for a, b, e in log)
EOF

# Polls `dmsetup status` until the path's state is F or A (10 s at most).
wait_state() { # mp path-name F|A
  local want=" ${DEV[$2]} $3 "
  for _ in $(seq 1000); do
    [[ " $(dm status "$1") " == *"$want"* ]] && return 0
    sleep 0.01
  done
  die "$1: path $2 (${DEV[$2]}) never became $3: $(dm status "$1")"
}
swap() { dm load "$1" --table "$2"; dm resume "$1"; }
now() { date +%s%N; }

# The same client on the plain linear device first: the peer for the latencies without failure.
# Meanwhile the same table swaps run on a device nobody reads (`spare`), the control for what the
# swaps' processes and ioctls cost the client's IO on this 2-CPU machine.
for mp in lin mprr mpst; do
  rm -f "$W/stop"
  "${CLIENT_CPU[@]}" python3 "$W/qd1.py" "$D/nbd.sock" "$mp" "$W/stop" "$W/lat-$mp.txt" &
  client=$!
  PIDS+=($client)
  for _ in $(seq 200); do [ -e "$W/lat-$mp.txt.ready" ] && break; sleep 0.05; done
  [ -e "$W/lat-$mp.txt.ready" ] || die "qd1 client did not connect"
  sleep 2 # the baseline: no failure
  : >"$W/swaps-$mp.txt"
  [ $mp = lin ] || read -ra ps <<<"${PATHS[$mp]}"
  for i in $(seq "$FAILOVERS"); do
    if [ $mp = lin ]; then
      t0=$(now); swap spare "0 $SECTORS error"; t1=$(now)
      dm status spare >/dev/null
      sleep 0.2
      t2=$(now)
      swap spare "$LINEAR"
      dm status spare >/dev/null
      echo "$t0 $t1 $t2 $(now)" >>"$W/swaps-$mp.txt"
      sleep 0.2
      continue
    fi
    p=${ps[$(( (i - 1) % 2 ))]}
    t0=$(now); swap "$p" "0 $SECTORS error"; t1=$(now)
    wait_state "$mp" "$p" F
    sleep 0.2
    t2=$(now)
    swap "$p" "$LINEAR"
    dm message "$mp" 0 reinstate_path "${DEV[$p]}"
    wait_state "$mp" "$p" A
    echo "$t0 $t1 $t2 $(now)" >>"$W/swaps-$mp.txt"
    sleep 0.2
  done
  touch "$W/stop"
  wait "$client" || die "qd1 client failed on $mp"
  alive
  echo "done qd1 client on $mp" >&2
done

# ---- 3. Fail/reinstate cycles under a verifying load -----------------------------------------
# fio writes 4 KiB blocks at random offsets through mprr at qd16 and reads each back and checks
# it (crc32c, header with offset) once 1,024 are written, for as long as the cycles run; then it
# is stopped with SIGINT (fio's exit status 128 means exactly that). Each cycle fails one path
# (alternating) by swapping its table to `error`, waits until the target has marked it failed
# (which takes an IO to meet the error), swaps it back and reinstates it.
"${CLIENT_CPU[@]}" fio --name=v --ioengine=nbd --uri="$(uri mprr)" --rw=randwrite --bs=4k --iodepth=16 \
  --verify=crc32c --verify_backlog=1024 --verify_fatal=1 --verify_state_save=0 --time_based --runtime=3600 \
  --output-format=json >"$W/verify.json" 2>"$W/verify.err" &
FIO=$!
PIDS+=($FIO)
sleep 1
read -ra ps <<<"${PATHS[mprr]}"
cstart=$(now)
: >"$W/cycles.txt"
for i in $(seq "$CYCLES"); do
  kill -0 $FIO 2>/dev/null || die "fio stopped during cycle $i: $(cat "$W/verify.err")"
  p=${ps[$(( (i - 1) % 2 ))]}
  t0=$(now)
  swap "$p" "0 $SECTORS error"
  wait_state mprr "$p" F
  swap "$p" "$LINEAR"
  dm message mprr 0 reinstate_path "${DEV[$p]}"
  wait_state mprr "$p" A
  echo "$t0 $(now)" >>"$W/cycles.txt"
done
cend=$(now)
sleep 1
kill -INT $FIO
rc=0; wait $FIO || rc=$?
[ $rc = 0 ] || [ $rc = 128 ] || die "fio exit status $rc: $(cat "$W/verify.err")"
alive
FINAL_STATUS=$(dm status mprr)
echo "done cycles" >&2

# ---- Report ---------------------------------------------------------------------------------
python3 - "$W" "$ROWS" "$(for k in "${!R[@]}"; do echo "$k=${R[$k]}"; done)" "$cstart" "$cend" "$FINAL_STATUS" \
  "$CYCLES" <<'EOF'
import datetime, json, re, statistics, sys
w, rows, kv, cstart, cend, final_status, cycles = sys.argv[1:8]
cstart, cend = int(cstart), int(cend)
R = {}
for line in kv.splitlines():
    k, v = line.rsplit("=", 1)
    R[tuple(k.split(",", 1))] = float(v)
names = {"read": "1 MiB seq read", "randread": "4 KiB randread"}
def label(r):
    rw, qd = r.rsplit("-qd", 1)
    return f"{names[rw]}, qd{qd}"
def fmt(r, v):
    return f"{v/1000:.1f}k IOPS" if r.startswith("rand") else f"{v:.0f} MiB/s"
print("| figure | linear | multipath round-robin | multipath service-time | round-robin / linear | service-time / linear |")
print("|---|---|---|---|---|---|")
for r in rows.split():
    a, b, c = R[(r, "lin")], R[(r, "mprr")], R[(r, "mpst")]
    print(f"| {label(r)} | {fmt(r, a)} | {fmt(r, b)} | {fmt(r, c)} | **{b / a:.2f}** | **{c / a:.2f}** |")

# The daemon log: the target's path events, and anything else it said.
events, other = [], []
for line in open(f"{w}/daemon.log"):
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{6})Z\s+WARN\s.*multipath: (Failing|Reinstating) path (\S+)\.$", line)
    if m:
        t = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc)
        events.append((int(t.timestamp()) * 10**9 + int(m.group(2)) * 1000, m.group(3), m.group(4)))
    elif line.strip():
        other.append(line.rstrip())

us = lambda ns: f"{ns / 1000:.0f} µs"
def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))]
print()
# IOs slower than 1 ms, by when they ran: overlapping a swap of a path to `error` (load +
# resume), overlapping a restore (load + resume of the linear table, reinstate_path, until
# status shows A), or neither.
def slow(ios, swaps):
    out = [[], [], []]
    for a, b, e in ios:
        if b - a <= 10**6:
            continue
        k = 2
        for t0, t1, t2, t3 in swaps:
            if a <= t1 and b >= t0:
                k = 0
            elif a <= t3 and b >= t2:
                k = 1
        out[k].append(b - a)
    return [f"{len(v)}" + (f" (max {max(v) / 1e6:.1f} ms)" if v else "") for v in out]
print("| selector | failovers | first error → next completed IO: median / max | latency of the IO that met the error: median / max"
      " | qd1 4 KiB read latency before any failure: median / p99 / max"
      " | IOs over 1 ms: at a swap to error / at a restore / elsewhere | IO errors at the client |")
print("|---|---|---|---|---|---|---|")
for mp, sel in (("lin", "linear (the peer: no multipath, no failure)"), ("mprr", "round-robin"), ("mpst", "service-time")):
    ios = [tuple(map(int, l.split())) for l in open(f"{w}/lat-{mp}.txt")]
    swaps = [tuple(map(int, l.split())) for l in open(f"{w}/swaps-{mp}.txt")]
    first, last = ios[0][0], ios[-1][1]
    errs = sum(1 for io in ios if io[2])
    if mp == "lin":
        base = [b - a for a, b, e in ios if b < swaps[0][0]]
        print(f"| {sel}; swaps of an unrelated device | — | — | — | {us(statistics.median(base))} / {us(pct(base, 0.99))} / {us(max(base))} ({len(base)} IOs)"
              f" | {' / '.join(slow(ios, swaps))} | {errs} of {len(ios)} |")
        continue
    fails = [t for t, kind, _ in events if kind == "Failing" and first <= t <= last]
    if len(fails) != len(swaps):
        sys.exit(f"{mp}: {len(swaps)} swaps to error but {len(fails)} 'Failing path' lines")
    fo, hit = [], []
    for t in fails:
        nxt = min((b for a, b, e in ios if b >= t), default=None)
        if nxt is None:
            sys.exit(f"{mp}: no IO completed after the failure at {t}")
        fo.append(nxt - t)
        hit += [b - a for a, b, e in ios if a <= t <= b]
    base = [b - a for a, b, e in ios if b < swaps[0][0]]
    print(f"| {sel} | {len(fails)} | **{us(statistics.median(fo))} / {us(max(fo))}** | {us(statistics.median(hit))} / {us(max(hit))}"
          f" | {us(statistics.median(base))} / {us(pct(base, 0.99))} / {us(max(base))} ({len(base)} IOs)"
          f" | {' / '.join(slow(ios, swaps))} | {errs} of {len(ios)} |")
    for t, f in zip(fails, fo):
        print(f"failover {mp} at {t}: {f / 1000:.1f} µs", file=sys.stderr)

t = open(f"{w}/verify.json").read()
j = json.loads(t[t.index("{"):])["jobs"][0]
err = open(f"{w}/verify.err").read()
verify_bad = [l for l in err.splitlines() if "verify" in l.lower() or "bad" in l.lower()]
cyc = [tuple(map(int, l.split())) for l in open(f"{w}/cycles.txt")]
cfail = [(t, d) for t, kind, d in events if kind == "Failing" and cstart <= t <= cend]
crein = [(t, d) for t, kind, d in events if kind == "Reinstating" and cstart <= t <= cend]
fail_counts = re.findall(r"(\d+:\d+) ([AF]) (\d+)", final_status)
print()
print("| cycles | failures / reinstatements logged | IO completed: writes + verify reads | fio error | verify failures"
      " | cycle time: median / max | final path states (fail counts) |")
print("|---|---|---|---|---|---|---|")
print(f"| {len(cyc)} of {cycles} | {len(cfail)} / {len(crein)} | {j['write']['total_ios']:,} + {j['read']['total_ios']:,}"
      f" in {j['job_runtime'] / 1000:.1f} s | {j['error']} | {len(verify_bad)}"
      f" | {statistics.median(b - a for a, b in cyc) / 1e6:.0f} / {max(b - a for a, b in cyc) / 1e6:.0f} ms"
      f" | {', '.join(f'{d} {s} ({n})' for d, s, n in fail_counts)} |")
for l in verify_bad:
    print("fio:", l, file=sys.stderr)
print(f"\nother daemon log lines: {len(other)}", file=sys.stderr)
for l in other[:20]:
    print("  " + l, file=sys.stderr)
if j["error"] or verify_bad:
    sys.exit("the verifying load saw errors")
EOF
