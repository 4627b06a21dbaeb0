#!/usr/bin/env bash
# bench/callgrind.sh: instructions per CheckLimit (or ShouldRateLimit) of tollgate's own
# process, counted by valgrind's callgrind: a figure a shared, noisy machine
# cannot move, where requests/s and CPU time swing by tens of percent.
#
# For each store (the embedded memory store, then a redis-server it starts)
# it runs the release tollgate under `valgrind --tool=callgrind` on one
# worker thread, drives exactly N CheckLimit calls with tollgate-bench
# (rule api_log, 4 in flight, one client thread), stops tollgate with SIGTERM
# so callgrind writes its counts, and does so twice, with N_BIG and N_SMALL
# calls. Instructions per call = (big run - small run) / (N_BIG - N_SMALL):
# start-up, the first calls' one-off work and shutdown cancel out. It then
# lists the functions with the most instructions of their own (self, or
# inclusive with INCLUSIVE=1) in the big run, per call (divided by N_BIG,
# so start-up is still in them).
#
#   bench/callgrind.sh                   # both stores, a few minutes
#   STORES=memory bench/callgrind.sh     # one store
#
# Environment:
#   STORES="memory redis"        which stores, in that order
#   CALL=check-limit             or should-rate-limit: the Envoy door, one
#                                descriptor of rule api_log per call
#   MEMORY_N_BIG=22000 MEMORY_N_SMALL=2000   calls per run, memory store
#   REDIS_N_BIG=12000  REDIS_N_SMALL=2000    calls per run, Redis
#   TOP=15                       functions listed per store
#   INCLUSIVE=0                  1: list by inclusive instructions instead
#   SKIP_BUILD=0                 1: use the existing target/release binaries
#   MAX_SECONDS=2400             hard limit for the whole script
#   KEEP=0                       1: keep the work directory (callgrind.out.*)
#
# Only 127.0.0.1 is used; everything it starts is stopped on exit (a trap),
# and every process is bounded by `timeout`.
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
for tool in valgrind callgrind_annotate redis-server redis-cli python3 ss; do
    command -v "$tool" >/dev/null || { echo "bench/callgrind.sh: needs $tool" >&2; exit 1; }
done
STORES=${STORES:-memory redis}
CALL=${CALL:-check-limit}
case "$CALL" in check-limit | should-rate-limit) ;; *)
    echo "bench/callgrind.sh: CALL is check-limit or should-rate-limit" >&2
    exit 1
    ;;
esac
MEMORY_N_BIG=${MEMORY_N_BIG:-22000}
MEMORY_N_SMALL=${MEMORY_N_SMALL:-2000}
REDIS_N_BIG=${REDIS_N_BIG:-12000}
REDIS_N_SMALL=${REDIS_N_SMALL:-2000}
TOP=${TOP:-15}
INCLUSIVE=${INCLUSIVE:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
MAX_SECONDS=${MAX_SECONDS:-2400}
KEEP=${KEEP:-0}
CONFIG=bench/tollgate-bench.toml
TOLLGATE=target/release/tollgate
BENCH=target/release/tollgate-bench

case "$MEMORY_N_BIG$MEMORY_N_SMALL$REDIS_N_BIG$REDIS_N_SMALL$TOP$MAX_SECONDS" in *[!0-9]*)
    echo "bench/callgrind.sh: the N_*, TOP and MAX_SECONDS are whole numbers" >&2
    exit 1
    ;;
esac
for store in $STORES; do
    [[ $store == memory || $store == redis ]] ||
        { echo "bench/callgrind.sh: STORES holds memory and/or redis, not $store" >&2; exit 1; }
done
if ((MEMORY_N_BIG <= MEMORY_N_SMALL || REDIS_N_BIG <= REDIS_N_SMALL || MEMORY_N_BIG > 1000000 || REDIS_N_BIG > 1000000)); then
    echo "bench/callgrind.sh: each N_BIG must be above its N_SMALL, and at most 1,000,000" >&2
    exit 1
fi

if [[ $SKIP_BUILD != 1 ]]; then
    echo "building (cargo build --release) ..." >&2
    timeout 1800 cargo build --release --quiet --bin tollgate --bin tollgate-bench
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-callgrind.XXXXXX")
PIDS=()
install_cleanup

start_watchdog bench/callgrind.sh

REDIS_PORT=
start_redis() {
    REDIS_PORT=$(free_port)
    timeout "$MAX_SECONDS" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$WORK" --logfile "$WORK/redis.log" &
    PIDS+=($!)
    for _ in $(seq 50); do
        [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" PING 2>/dev/null) == PONG ]] && return 0
        sleep 0.1
    done
    echo "bench/callgrind.sh: redis-server did not start" >&2
    exit 1
}

# Whether something listens on 127.0.0.1:port. Read from the kernel, not by
# asking tollgate: a health check would add instructions to the count, and
# a different number of them to each run.
listening() { # port
    [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]
}

# One run: tollgate under callgrind, N calls, SIGTERM; sets IR to the total
# instructions (the callgrind.out file's summary) and keeps the file. Run
# in this shell, not in a $(...), so that its processes join PIDS.
IR=
counted_run() { # store n out
    local store=$1 n=$2 out=$3 url port pid json
    url=memory://
    if [[ $store == redis ]]; then
        redis-cli -h 127.0.0.1 -p "$REDIS_PORT" FLUSHALL >/dev/null
        url="redis://127.0.0.1:$REDIS_PORT/0"
    fi
    port=$(free_port)
    # The store's 250 ms deadline is too short for a process 50 times
    # slower: its first connect would fail. Any deadline costs the same
    # instructions.
    TOLLGATE_LOG__LEVEL=warn TOLLGATE_SERVER__WORKER_THREADS=1 TOLLGATE_STORE__TIMEOUT=10s timeout 1200 \
        valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$TOLLGATE" serve --config "$CONFIG" --listen "127.0.0.1:$port" --store "$url" \
        >"$out.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    # Start-up under callgrind takes seconds to tens of seconds.
    for _ in $(seq 600); do
        listening "$port" && break
        kill -0 "$pid" 2>/dev/null || { cat "$out.log" >&2; exit 1; }
        sleep 0.2
    done
    listening "$port" || { echo "tollgate under callgrind did not listen; its log:" >&2; cat "$out.log" >&2; exit 1; }
    json=$(timeout 900 "$BENCH" --addr "http://127.0.0.1:$port" --json --threads 1 -c 4 \
        --call "$CALL" --rule api_log -n "$n" -d 10m)
    kill -TERM "$pid"
    wait "$pid" || { echo "tollgate under callgrind did not stop cleanly; its log:" >&2; cat "$out.log" >&2; exit 1; }
    IR=$(python3 - "$json" "$n" "$out" <<'EOF'
import json, re, sys
j, n, out = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if j["count"] != n or j["errors"] != 0 or j["degraded"] != 0:
    sys.exit(f"bench/callgrind.sh: wanted {n} answered calls, got {j['count']} "
             f"({j['errors']} errors, {j['degraded']} degraded)")
total = None
for line in open(out, errors="replace"):
    m = re.match(r"(summary|totals):\s+(\d+)", line)
    if m:
        total = int(m.group(2))
if total is None:
    sys.exit(f"bench/callgrind.sh: no summary or totals line in {out}")
print(total)
EOF
    )
}

# The TOP functions of a callgrind.out file, per call.
top_functions() { # out n
    local inclusive=no
    [[ $INCLUSIVE == 1 ]] && inclusive=yes
    # shellcheck disable=SC2016 # Python, not shell, in the quotes.
    timeout 300 callgrind_annotate --inclusive="$inclusive" --threshold=100 "$1" 2>/dev/null |
        python3 -c '
import re, sys
top, n = int(sys.argv[1]), int(sys.argv[2])
rows = []
started = False
for line in sys.stdin:
    if not started:
        started = "file:function" in line
        continue
    m = re.match(r"\s*([0-9,]+)\s+(?:\(\s*[0-9.]+%\)\s+)?(\S.*)$", line)
    if not m or "PROGRAM TOTALS" in line:
        continue
    # "file:function [object]": the function alone. Paths hold no colon.
    name = re.sub(r"\s+\[[^\]]*\]$", "", m.group(2))
    name = re.sub(r"^[^:\s]*:(?!:)", "", name)
    # Read to the end all the same: callgrind_annotate must not get SIGPIPE.
    if len(rows) < top:
        rows.append((int(m.group(1).replace(",", "")), name))
print("| instructions per call | function |")
print("|---:|---|")
for ir, name in rows:
    name = name if len(name) <= 120 else name[:117] + "..."
    print(f"| {ir / n:,.0f} | `{name}` |")
' "$TOP" "$2"
}

REPORT="$WORK/report.md"
: >"$REPORT"
for store in $STORES; do
    if [[ $store == redis ]]; then
        [[ -n $REDIS_PORT ]] || start_redis
        big=$REDIS_N_BIG small=$REDIS_N_SMALL
    else
        big=$MEMORY_N_BIG small=$MEMORY_N_SMALL
    fi
    echo "$store: $small calls under callgrind ..." >&2
    counted_run "$store" "$small" "$WORK/callgrind.out.$store.small"
    ir_small=$IR
    echo "$store: $big calls under callgrind ..." >&2
    counted_run "$store" "$big" "$WORK/callgrind.out.$store.big"
    ir_big=$IR
    {
        python3 -c '
import sys
store, call, big, small, ir_big, ir_small = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
name = {"check-limit": "CheckLimit", "should-rate-limit": "ShouldRateLimit"}[call]
print(f"{store} store: {(ir_big - ir_small) / (big - small):,.0f} instructions per {name} "
      f"((runs of {big:,} and {small:,} calls: {ir_big:,} - {ir_small:,}) / {big - small:,})")
' "$store" "$CALL" "$big" "$small" "$ir_big" "$ir_small"
        echo
        if [[ $INCLUSIVE == 1 ]]; then kind=inclusive; else kind=self; fi
        echo "Top $TOP functions by $kind instructions, run of $big calls, divided by $big:"
        echo
        top_functions "$WORK/callgrind.out.$store.big" "$big"
        echo
    } >>"$REPORT"
done

echo "tollgate bench/callgrind.sh: $(git rev-parse --short HEAD 2>/dev/null || echo '?'), valgrind $(valgrind --version | sed 's/^valgrind-//'), rule api_log, 4 in flight, 1 worker thread"
echo
cat "$REPORT"
