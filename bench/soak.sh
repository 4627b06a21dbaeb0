#!/usr/bin/env bash
# bench/soak.sh: tollgate under a steady load while its Redis fails.
#
# Starts a redis-server and `tollgate serve` on it (bench/soak.toml) on free
# loopback ports, and drives a fixed 5,000 requests/s for SOAK_S seconds:
# two tollgate-bench processes, 2,500 CheckLimit/s (rule soak) and 2,500
# IncrementUsage/s (kind text, premium: unlimited, still counted), each over
# 10,000 subjects. During the run Redis
#   at 20 % is paused for 2 s (SIGSTOP, then SIGCONT),
#   at 40 % is killed (SIGKILL), left down for 1 s and restarted on the same
#          port with the same settings (no persistence: its data is gone),
#   at 60 % has its scripts flushed (SCRIPT FLUSH).
# tollgate must get through by itself. Afterwards, with Redis healthy, it
# checks that counting is exact for a fresh subject, and prints one table:
# requests sent and answered, gRPC errors, degraded answers (per fault, from
# tollgate's metrics), tollgate's RSS after the warm-up and at the end, and
# the goals. The exit status is 0 when every goal is met, 1 otherwise.
#
# What README.md ("When the store fails") promises, and so what passes:
# CheckLimit and IncrementUsage never fail because the store does; a store
# failure is answered by `on_store_error` (here "allow", the default),
# marked degraded. So every request must get an answer, none may be a gRPC
# error of any code, and none may be denied (the rule has room, the tier is
# unlimited, and a degraded answer here is an allow).
#
# Why SIGSTOP for the pause: it makes Redis unresponsive the way a hung
# process or a frozen VM is. Nothing runs, not even its event loop, so
# nothing is answered (PING included: the script checks), while the kernel
# still accepts connections and buffers commands, so tollgate sees timeouts
# rather than refused connections, the slower failure for a client. CLIENT
# PAUSE is Redis choosing to hold commands while it keeps running; DEBUG
# SLEEP needs enable-debug-command. tests/lifecycle.rs pauses the same way.
#
#   bench/soak.sh                  # 10 minutes
#   SOAK_S=60 bench/soak.sh        # a short run
#
# Environment:
#   SOAK_S=600      seconds of load (30-7200), faults at 20, 40, 60 %
#   WARMUP_S=30     seconds of the same load first (5-120), with a 2 s pause
#                   of Redis in its middle, before RSS is read
#   TOLLGATE_THREADS  tollgate's worker threads (server.worker_threads);
#                   default: one less than the cores, at least 1
#   SKIP_BUILD=0    1: use the existing target/release binaries
#   MAX_SECONDS     hard limit for the whole script after the build
#                   (default SOAK_S + WARMUP_S + 300)
#   KEEP=0          1: keep the work directory (logs, raw results)
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
for tool in redis-server redis-cli python3 curl nproc awk; do
    command -v "$tool" >/dev/null || { echo "bench/soak.sh: needs $tool" >&2; exit 1; }
done
SOAK_S=${SOAK_S:-600}
WARMUP_S=${WARMUP_S:-30}
CORES=$(nproc)
TOLLGATE_THREADS=${TOLLGATE_THREADS:-$((CORES > 1 ? CORES - 1 : 1))}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP=${KEEP:-0}
case "$SOAK_S$WARMUP_S$TOLLGATE_THREADS" in *[!0-9]*)
    echo "bench/soak.sh: SOAK_S, WARMUP_S and TOLLGATE_THREADS are whole numbers" >&2
    exit 1
    ;;
esac
if ((SOAK_S < 30 || SOAK_S > 7200 || WARMUP_S < 5 || WARMUP_S > 120 || TOLLGATE_THREADS < 1)); then
    echo "bench/soak.sh: SOAK_S must be 30-7200 and WARMUP_S 5-120 (seconds)" >&2
    exit 1
fi
MAX_SECONDS=${MAX_SECONDS:-$((SOAK_S + WARMUP_S + 300))}
# Requests/s of each of the two calls: 5,000 in all.
RATE=2500
SUBJECTS=10000
# Requests in flight per generator: enough that a 250 ms store timeout
# before the breaker opens (625 arrivals at 2,500/s) only queues briefly.
CONCURRENCY=200
# tollgate-bench runs at most 10 minutes at a time; longer soaks chain runs.
CHUNK_S=600
# Calls for the exact count check; bench/soak.toml's soak_exact limit and
# exact quota are EXACT_N + 1.
EXACT_N=2000
CONFIG=bench/soak.toml
TOLLGATE=target/release/tollgate
BENCH=target/release/tollgate-bench

if [[ $SKIP_BUILD != 1 ]]; then
    echo "building (cargo build --release) ..." >&2
    timeout 1800 cargo build --release --quiet --bin tollgate --bin tollgate-bench
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-soak.XXXXXX")
PIDS=()
REDIS_PID=
# A stopped Redis acts on SIGTERM only once continued; cleanup runs this
# first.
before_cleanup() {
    if [[ -n $REDIS_PID ]]; then
        kill -CONT "$REDIS_PID" 2>/dev/null || true
        kill "$REDIS_PID" 2>/dev/null || true
        wait "$REDIS_PID" 2>/dev/null || true
    fi
}
install_cleanup

start_watchdog bench/soak.sh

# Seconds since the epoch, with microseconds.
now() { echo "$EPOCHREALTIME"; }

# Sleeps until the epoch time $1 (at once if it has passed).
sleep_until() {
    local left
    left=$(awk -v t="$1" -v n="$EPOCHREALTIME" 'BEGIN { d = t - n; printf "%.3f", (d > 0 ? d : 0) }')
    sleep "$left"
}

# Sleeps until the share $1 (0 to 1) of the soak, counted from T0, has passed.
sleep_until_share() {
    sleep_until "$(awk -v t0="$T0" -v s="$SOAK_S" -v share="$1" 'BEGIN { printf "%.6f", t0 + s * share }')"
}

REDIS_PORT=$(free_port)
rcli() { timeout 5 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }

# Starts redis-server on REDIS_PORT (again, after a kill: the same
# settings) and waits until it answers. -> REDIS_PID
start_redis() {
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$WORK" --logfile "$WORK/redis.log" &
    REDIS_PID=$!
    for _ in $(seq 100); do
        [[ $(rcli PING 2>/dev/null) == PONG ]] && return 0
        sleep 0.05
    done
    echo "bench/soak.sh: redis-server did not start on port $REDIS_PORT" >&2
    exit 1
}
start_redis

TG_PORT=$(free_port)
METRICS_PORT=$(free_port)
TG_ADDR="http://127.0.0.1:$TG_PORT"
TOLLGATE_SERVER__METRICS_LISTEN="127.0.0.1:$METRICS_PORT" \
    TOLLGATE_SERVER__WORKER_THREADS=$TOLLGATE_THREADS \
    "$TOLLGATE" serve --config "$CONFIG" --listen "127.0.0.1:$TG_PORT" \
    --store "redis://127.0.0.1:$REDIS_PORT/0" >"$WORK/tollgate.log" 2>&1 &
TG_PID=$!
PIDS+=("$TG_PID")
await_serving "$TG_PID" "$TG_ADDR" "$WORK/tollgate.log"

rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$TG_PID/status"; }

# Answers tollgate gave degraded so far, both calls (from its metrics).
degraded_total() {
    curl -sf --max-time 2 "http://127.0.0.1:$METRICS_PORT/metrics" |
        awk '/^tollgate_(decisions|quota_increments)_total\{.*outcome="degraded"/ { t += $NF } END { print t + 0 }'
}
metrics_snapshot() { # file
    curl -sf --max-time 2 "http://127.0.0.1:$METRICS_PORT/metrics" >"$1" || : >"$1"
}

# One tollgate-bench at RATE requests/s: its JSON line(s) go to
# $WORK/<name>.jsonl. Chained runs of at most CHUNK_S cover `seconds`.
drive() { # name seconds args...
    local name=$1 seconds=$2 chunk child=
    shift 2
    trap '[[ -n $child ]] && kill "$child" 2>/dev/null; exit 143' TERM
    while ((seconds > 0)); do
        chunk=$((seconds < CHUNK_S ? seconds : CHUNK_S))
        timeout $((chunk + 60)) "$BENCH" --json --threads 1 --addr "$TG_ADDR" --rps "$RATE" \
            -c "$CONCURRENCY" --subjects "$SUBJECTS" -d "${chunk}s" "$@" \
            >>"$WORK/$name.jsonl" 2>>"$WORK/$name.err" &
        child=$!
        wait "$child" || echo "{\"failed\":$?}" >>"$WORK/$name.jsonl"
        seconds=$((seconds - chunk))
    done
}
CHECK_ARGS=(--call check-limit --rule soak)
USAGE_ARGS=(--call increment-usage --kind text --tier premium)

# ---- Warm-up: the same load, then the first RSS ------------------------------
# With a 2 s pause of Redis in the middle. tollgate's RSS moves in steps of
# 3-5 MiB with the load's peaks, when every generator's 200 requests are in
# flight at once (a store stall, or the machine's): without a stall in the
# warm-up, the reading after it came 11-17 % below the level RSS then kept,
# flat between short spikes, from the soak's first stall to its end. The
# goal is about growth during the soak, so the first reading is taken right
# after such a peak too.
echo "warm-up: ${WARMUP_S} s at $((2 * RATE)) req/s, Redis paused 2 s in it ..." >&2
WARMUP_T0=$(now)
drive warmup_check "$WARMUP_S" "${CHECK_ARGS[@]}" &
W1=$!
drive warmup_usage "$WARMUP_S" "${USAGE_ARGS[@]}" &
W2=$!
PIDS+=("$W1" "$W2")
sleep_until "$(awk -v t0="$WARMUP_T0" -v s="$WARMUP_S" 'BEGIN { printf "%.6f", t0 + s / 2 - 1 }')"
kill -STOP "$REDIS_PID"
sleep 2
kill -CONT "$REDIS_PID"
wait "$W1" "$W2"
sleep 1
RSS_START=$(rss_kb)

# ---- The soak ----------------------------------------------------------------
echo "soak: ${SOAK_S} s at $((2 * RATE)) req/s; faults at $((SOAK_S / 5)), $((SOAK_S * 2 / 5)) and $((SOAK_S * 3 / 5)) s ..." >&2
metrics_snapshot "$WORK/metrics-start.txt"
T0=$(now)
drive check "$SOAK_S" "${CHECK_ARGS[@]}" &
L1=$!
drive usage "$SOAK_S" "${USAGE_ARGS[@]}" &
L2=$!
PIDS+=("$L1" "$L2")

# tollgate's RSS every 5 s, for the peak and the trend.
(
    trap 'exit 0' TERM
    while kill -0 "$TG_PID" 2>/dev/null; do
        printf '%s\t%s\n' "$(awk -v t0="$T0" -v n="$EPOCHREALTIME" 'BEGIN { printf "%.0f", n - t0 }')" "$(rss_kb)" >>"$WORK/rss.tsv"
        sleep 5
    done
) &
PIDS+=($!)

FAULTS="$WORK/faults.tsv"
# After a fault ends (Redis answers again) at $1: samples the degraded
# count every 0.2 s until it has not moved for 3 s (at most 30 s), and
# prints how long after $1 the last degraded answer came (0 if none did).
watch_recovery() { # end_time -> seconds
    local end=$1 last seen count stable_since deadline
    seen=$(degraded_total)
    last=$end
    stable_since=$(now)
    deadline=$(awk -v e="$end" 'BEGIN { printf "%.6f", e + 30 }')
    while awk -v n="$EPOCHREALTIME" -v d="$deadline" 'BEGIN { exit !(n < d) }'; do
        sleep 0.2
        count=$(degraded_total)
        if [[ $count != "$seen" ]]; then
            seen=$count
            last=$(now)
            stable_since=$last
        elif awk -v n="$EPOCHREALTIME" -v s="$stable_since" 'BEGIN { exit !(n - s >= 3) }'; then
            break
        fi
    done
    awk -v l="$last" -v e="$end" 'BEGIN { printf "%.1f", l - e }'
}

# Records one fault: name, start (s into the soak), how long Redis was out,
# when degraded answers last came after it, and metrics around it.
fault() { # id label start_time end_time
    local id=$1 label=$2 start=$3 end=$4 tail
    tail=$(watch_recovery "$end")
    metrics_snapshot "$WORK/metrics-$id-after.txt"
    printf '%s\t%s\t%s\t%s\t%s\n' "$id" "$label" \
        "$(awk -v s="$start" -v t0="$T0" 'BEGIN { printf "%.1f", s - t0 }')" \
        "$(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.2f", e - s }')" "$tail" >>"$FAULTS"
}

# 1. Pause: SIGSTOP for 2 s; a PING meanwhile must get no answer.
sleep_until_share 0.2
metrics_snapshot "$WORK/metrics-pause-before.txt"
START=$(now)
kill -STOP "$REDIS_PID"
if timeout 1 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" PING >/dev/null 2>&1; then
    PAUSE_PING="answered (the pause did not hold)"
else
    PAUSE_PING="no answer"
fi
sleep_until "$(awk -v s="$START" 'BEGIN { printf "%.6f", s + 2 }')"
kill -CONT "$REDIS_PID"
END=$(now)
fault pause "pause 2 s (SIGSTOP)" "$START" "$END"
echo "  pause: done (PING during it: $PAUSE_PING)" >&2

# 2. Kill -9, 1 s down, restart on the same port.
sleep_until_share 0.4
metrics_snapshot "$WORK/metrics-kill-before.txt"
START=$(now)
kill -KILL "$REDIS_PID"
# (Braces: bash reports a killed job on the shell's stderr, not wait's.)
{ wait "$REDIS_PID"; } 2>/dev/null || true
REDIS_PID=
sleep 1
start_redis
END=$(now)
fault kill "kill -9, restart" "$START" "$END"
echo "  kill and restart: done" >&2

# 3. SCRIPT FLUSH: tollgate's next EVALSHA gets NOSCRIPT and re-sends EVAL.
sleep_until_share 0.6
metrics_snapshot "$WORK/metrics-flush-before.txt"
START=$(now)
rcli SCRIPT FLUSH >/dev/null
END=$(now)
fault flush "SCRIPT FLUSH" "$START" "$END"
echo "  script flush: done" >&2

wait "$L1" "$L2"
T1=$(now)
sleep 1
RSS_END=$(rss_kb)
TG_ALIVE=yes
kill -0 "$TG_PID" 2>/dev/null || TG_ALIVE=no
metrics_snapshot "$WORK/metrics-end.txt"

# ---- Exact counts after the faults ---------------------------------------------
# Redis is healthy again; its scripts are flushed once more, so the check's
# first calls also go through NOSCRIPT and EVAL. One fresh subject (bench-0
# under soak_exact; user bench-0 with character soak-exact for the quota)
# gets exactly EXACT_N calls, 50 in flight; with the limit EXACT_N + 1, a
# call of cost 2 is then denied exactly when the count is >= EXACT_N and
# one of cost 1 allowed exactly when it is <= EXACT_N.
echo "exact counts: $EXACT_N calls, then cost 2 and cost 1 ..." >&2
exact() { # name args...
    local name=$1
    shift
    timeout 60 "$BENCH" --json --threads 1 --addr "$TG_ADDR" --subjects 1 "$@" \
        >>"$WORK/$name.jsonl" 2>>"$WORK/$name.err" || echo '{"failed":1}' >>"$WORK/$name.jsonl"
}
rcli SCRIPT FLUSH >/dev/null
EXACT_CHECK=(--call check-limit --rule soak_exact)
EXACT_USAGE=(--call increment-usage --kind exact --character soak-exact)
exact exact_check "${EXACT_CHECK[@]}" -n "$EXACT_N" -c 50
exact exact_check "${EXACT_CHECK[@]}" -n 1 -c 1 --cost 2
exact exact_check "${EXACT_CHECK[@]}" -n 1 -c 1 --cost 1
exact exact_usage "${EXACT_USAGE[@]}" -n "$EXACT_N" -c 50
exact exact_usage "${EXACT_USAGE[@]}" -n 1 -c 1 --cost 2
exact exact_usage "${EXACT_USAGE[@]}" -n 1 -c 1 --cost 1

# ---- The table ---------------------------------------------------------------
python3 - "$WORK" "$SOAK_S" "$RATE" "$CHUNK_S" "$EXACT_N" "$RSS_START" "$RSS_END" \
    "$TG_ALIVE" "$PAUSE_PING" "$(awk -v a="$T0" -v b="$T1" 'BEGIN { printf "%.1f", b - a }')" \
    "$CORES" "$TOLLGATE_THREADS" "$(redis-server --version | cut -d' ' -f3 | sed 's/^v=//')" \
    "$(rcli INFO memory | awk -F: '/^used_memory_human:/ { sub("\r", "", $2); print $2 }')" <<'EOF'
import json, os, re, sys

(work, soak_s, rate, chunk_s, exact_n, rss_start, rss_end, alive, pause_ping, wall,
 cores, threads, redis_version, redis_memory) = sys.argv[1:]
soak_s, rate, chunk_s, exact_n = int(soak_s), int(rate), int(chunk_s), int(exact_n)
rss_start, rss_end = int(rss_start), int(rss_end)

def lines(name):
    path = os.path.join(work, name + ".jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]

def load(name):
    runs = lines(name)
    good = [r for r in runs if "count" in r]
    chunks = -(-soak_s // chunk_s)
    # The pacer releases request i at i / rate, for i while that is within
    # the run: ceil(seconds * rate) arrivals per chunk.
    scheduled = sum(min(chunk_s, soak_s - i * chunk_s) * rate for i in range(chunks))
    t = dict(scheduled=scheduled, runs_failed=len(runs) - len(good) + max(0, chunks - len(runs)))
    for key in ("count", "allowed", "denied", "degraded", "errors"):
        t[key] = sum(r[key] for r in good)
    t["codes"] = {}
    for r in good:
        for code, n in r["errors_by_code"].items():
            t["codes"][code] = t["codes"].get(code, 0) + n
    for key in ("p50", "p99", "max"):
        t[key] = max((r["latency_us"][key] for r in good), default=0) / 1000
    return t

def metrics(path):
    values = {}
    if not os.path.exists(path):
        return values
    for line in open(path):
        m = re.match(r'^(tollgate_\w+)(\{[^}]*\})?\s+([0-9.eE+-]+)', line)
        if m:
            values[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return values

def degraded(values):
    return sum(v for k, v in values.items()
               if re.match(r'tollgate_(decisions|quota_increments)_total\{.*outcome="degraded"', k))

def store_errors(before, after):
    out = {}
    for k, v in after.items():
        m = re.match(r'tollgate_store_errors_total\{.*error="(\w+)"', k)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + v - before.get(k, 0)
    return out

def show(errors):
    return ", ".join(f"{e} {n:,.0f}" for e, n in sorted(errors.items()) if n) or "none"

check, usage = load("check"), load("usage")
total = {k: check[k] + usage[k] for k in ("scheduled", "count", "allowed", "denied", "degraded", "errors", "runs_failed")}
codes = dict(check["codes"])
for code, n in usage["codes"].items():
    codes[code] = codes.get(code, 0) + n

print(f"tollgate bench/soak.sh: {soak_s} s ({wall} s measured) at {2 * rate:,} req/s "
      f"({rate:,} CheckLimit + {rate:,} IncrementUsage), Redis {redis_version}, {cores} cores, "
      f"tollgate on {threads} worker thread(s)")
print()
print("| load | scheduled | sent | answered | allowed | denied | degraded | gRPC errors | p50 ms | p99 ms | max ms |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for label, t in (("CheckLimit, rule soak", check), ("IncrementUsage, text, premium", usage)):
    print(f"| {label} | {t['scheduled']:,} | {t['count']:,} | {t['allowed'] + t['denied']:,} | "
          f"{t['allowed']:,} | {t['denied']:,} | {t['degraded']:,} | {t['errors']:,} | "
          f"{t['p50']:.2f} | {t['p99']:.2f} | {t['max']:.0f} |")
print(f"| total | {total['scheduled']:,} | {total['count']:,} | {total['allowed'] + total['denied']:,} | "
      f"{total['allowed']:,} | {total['denied']:,} | {total['degraded']:,} | {total['errors']:,} | | | |")
if codes:
    print("gRPC errors by code: " + ", ".join(f"{c} {n:,}" for c, n in sorted(codes.items())))
print()

print("| fault | at s | Redis out s | degraded answers | store errors | last degraded after Redis back, s |")
print("|---|---:|---:|---:|---:|---:|")
in_faults = 0
fault_times = []
errors_in_faults = {}
for line in open(os.path.join(work, "faults.tsv")):
    fid, label, at, out, tail = line.rstrip("\n").split("\t")
    fault_times.append(float(at))
    before = metrics(os.path.join(work, f"metrics-{fid}-before.txt"))
    after = metrics(os.path.join(work, f"metrics-{fid}-after.txt"))
    n = degraded(after) - degraded(before)
    in_faults += n
    errors = store_errors(before, after)
    for e, k in errors.items():
        errors_in_faults[e] = errors_in_faults.get(e, 0) + k
    print(f"| {label} | {at} | {out} | {n:,.0f} | {show(errors)} | {tail} |")
outside = store_errors(metrics(os.path.join(work, "metrics-start.txt")),
                       metrics(os.path.join(work, "metrics-end.txt")))
outside = {e: n - errors_in_faults.get(e, 0) for e, n in outside.items()}
print(f"| (the rest of the soak) | | | {total['degraded'] - in_faults:,.0f} | {show(outside)} | |")
print(f"PING to Redis during the pause: {pause_ping}. Redis used_memory at the end: {redis_memory}.")
print()

growth = 100 * (rss_end - rss_start) / rss_start
rss_path = os.path.join(work, "rss.tsv")
samples = [int(l.split("\t")[1]) for l in open(rss_path) if l.strip() and l.split("\t")[1].strip()] if os.path.exists(rss_path) else []
print(f"tollgate RSS: {rss_start / 1024:.1f} MiB after the warm-up, {rss_end / 1024:.1f} MiB at the end "
      f"({growth:+.1f} %); every 5 s during the soak {min(samples, default=0) / 1024:.1f}-"
      f"{max(samples, default=0) / 1024:.1f} MiB")
print()

def exact(name):
    runs = lines(name)
    if len(runs) != 3 or any("count" not in r for r in runs):
        return False, "a call failed to run"
    bulk, two, one = runs
    ok = (bulk["count"] == exact_n and bulk["allowed"] == exact_n and bulk["errors"] == 0
          and bulk["degraded"] == 0 and two["denied"] == 1 and two["degraded"] == 0
          and one["allowed"] == 1 and one["degraded"] == 0)
    said = (f"{bulk['allowed']:,} of {exact_n:,} allowed, then cost 2 "
            f"{'denied' if two['denied'] else 'allowed' if two['allowed'] else 'failed'}, cost 1 "
            f"{'allowed' if one['allowed'] else 'denied' if one['denied'] else 'failed'}")
    return ok, said + (f": count = {exact_n:,} exactly" if ok else "")

goals = [
    ("every scheduled request sent (the rate held)", f"{total['count']:,} of {total['scheduled']:,}",
     total["count"] == total["scheduled"] and total["runs_failed"] == 0),
    ("every request answered", f"{total['allowed'] + total['denied']:,} of {total['count']:,}",
     total["allowed"] + total["denied"] == total["count"] and total["count"] > 0),
    ("no gRPC error (any code)", f"{total['errors']:,}", total["errors"] == 0),
    ("no denial (room, unlimited tier; degraded = allow)", f"{total['denied']:,}", total["denied"] == 0),
    ("tollgate RSS growth < 10 %", f"{growth:+.1f} %", growth < 10),
    ("tollgate ran throughout (same process)", alive, alive == "yes"),
    ("3 faults, each at least 5 s before the load ended",
     ", ".join(f"{t:.0f} s" for t in fault_times) + f" of {soak_s} s",
     len(fault_times) == 3 and all(t + 5 <= soak_s for t in fault_times)),
]
for label, name in (("CheckLimit count exact after the faults", "exact_check"),
                    ("IncrementUsage count exact after the faults", "exact_usage")):
    ok, said = exact(name)
    goals.append((label, said, ok))
print("| goal | measured | met |")
print("|---|---|---|")
for label, measured, ok in goals:
    print(f"| {label} | {measured} | {'yes' if ok else 'NO'} |")
sys.exit(0 if all(ok for _, _, ok in goals) else 1)
EOF
