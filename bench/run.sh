#!/usr/bin/env bash
# bench/run.sh: tollgate's speed, measured in one command, as one table.
#
# Starts a redis-server and two `tollgate serve` (one on that Redis, one on
# the embedded memory store) on free loopback ports, drives them with
# `tollgate-bench`, runs redis-benchmark baselines against the same Redis,
# and prints one table: requests/s, p50/p99 latency and CPU microseconds per
# decision for each process, from /proc/<pid>/stat (utime + stime) read
# before and after each scenario. With RUNS > 1 every figure is the median
# of the runs. Everything it starts is stopped on exit (a trap), every load
# is bounded in time and count, and only 127.0.0.1 is used.
#
#   bench/run.sh                      # one run, 5 s per scenario
#   RUNS=3 bench/run.sh               # medians of 3 runs (about 4 minutes)
#
# Environment:
#   RUNS=1          runs; figures are medians over them
#   DURATION=5      seconds per scenario
#   SUBJECTS=10000  distinct subjects in (a), (b), (d), (e), (f), (g)
#   WARMUP=1        seconds of uncounted load before each scenario, on the
#                   connection it then measures (0: none)
#   CLIENT_THREADS=1  tollgate-bench's runtime threads
#   TOLLGATE_THREADS  each tollgate's worker threads (server.worker_threads);
#                   default: one less than the cores, at least 1
#   SKIP_BUILD=0    1: use the existing target/release binaries
#   MAX_SECONDS     hard limit for the whole script (default from the above)
#   KEEP=0          1: keep the work directory (logs, raw results)
#
# Scenarios (tollgate-bench, round-robin subjects "bench-N"):
#   (a) CheckLimit on Redis, rule api_log (sliding_log, 1,000,000 per 15m:
#       room, so mostly allowed), concurrency 50 and 200; and at a fixed
#       10,000 requests/s for the latency target
#   (b) the same with api_sliding_counter (sliding_counter)
#   (c) abuse: one subject far over its limit (rule api, 100 per 15m)
#   (d) IncrementUsage on 10,000 conversations (premium: unlimited, counted),
#       and once more on a tollgate with stats.enabled = false: the cost of
#       usage statistics
#   (e) ShouldRateLimit, one descriptor (generic_key api_log), as (a)
#   (f) (a) on the memory store
#   (g) cost-heavy: CheckLimit on Redis, rule tokens (sliding_log,
#       100,000,000 per minute), costs drawn from 1 to 100,000
#   (h) CheckLimits on Redis, a group of 3 checks of one subject (api_log,
#       api_sliding_counter, api_counter's premium tier: room), compared
#       per call with (a)
#   (rid) (a) with a request_id of its own on every request (each is
#       remembered for the window, as retries are)
#   (settle) pay after use on Redis, rule tokens: each request reserves
#       1000 under a fresh request_id and settles it to 500 (two RPCs)
# Baselines on the same Redis: redis-benchmark -P 1 with tollgate's own
# sliding_log script by EVALSHA over 10,000 keys, and a plain INCR.
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
for tool in redis-server redis-cli redis-benchmark python3 nproc; do
    command -v "$tool" >/dev/null || { echo "bench/run.sh: needs $tool" >&2; exit 1; }
done
RUNS=${RUNS:-1}
DURATION=${DURATION:-5}
SUBJECTS=${SUBJECTS:-10000}
WARMUP=${WARMUP:-1}
# One thread, like redis-benchmark: on a small machine the load generator
# then takes about the same share of the cores in the baselines and in the
# scenarios, and leaves the rest to tollgate and Redis.
CLIENT_THREADS=${CLIENT_THREADS:-1}
# Redis and the load generator run on the same machine: leave them a core
# rather than have tollgate's threads contend with them for every core. On
# 2 cores, in A/B runs, one worker thread cost 8 % less CPU per decision
# than two at saturation and 17 % less at 10,000 req/s, at the same req/s.
CORES=$(nproc)
TOLLGATE_THREADS=${TOLLGATE_THREADS:-$((CORES > 1 ? CORES - 1 : 1))}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP=${KEEP:-0}
# 18 scenarios of DURATION (plus set-up, which takes seconds on a busy
# machine) per run, the memory measurements and start-up; a build is
# bounded on its own.
MAX_SECONDS=${MAX_SECONDS:-$((180 + RUNS * 19 * (DURATION + WARMUP + 8)))}
CONFIG=bench/tollgate-bench.toml
TOLLGATE=target/release/tollgate
BENCH=target/release/tollgate-bench

case "$RUNS$DURATION$SUBJECTS$WARMUP$CLIENT_THREADS$TOLLGATE_THREADS" in *[!0-9]*)
    echo "bench/run.sh: RUNS, DURATION, SUBJECTS, WARMUP, CLIENT_THREADS and TOLLGATE_THREADS are whole numbers" >&2
    exit 1
    ;;
esac
if ((RUNS < 1 || RUNS > 9 || DURATION < 1 || DURATION > 60 || WARMUP > 60 || CLIENT_THREADS < 1 || CLIENT_THREADS > 64)); then
    echo "bench/run.sh: RUNS must be 1-9, DURATION 1-60 and WARMUP 0-60 (seconds), CLIENT_THREADS 1-64" >&2
    exit 1
fi

if [[ $SKIP_BUILD != 1 ]]; then
    echo "building (cargo build --release) ..." >&2
    timeout 1800 cargo build --release --quiet --bin tollgate --bin tollgate-bench
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-bench.XXXXXX")
PIDS=()
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [[ $KEEP == 1 ]]; then
        echo "kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_watchdog bench/run.sh

# utime + stime of a process and all its threads, in clock ticks.
cpu_ticks() {
    local stat
    stat=$(<"/proc/$1/stat")
    stat=${stat##*) }
    read -r -a fields <<<"$stat"
    # After "(comm) ", field 3 of the file is index 0: utime is 14, stime 15.
    echo $((fields[11] + fields[12]))
}

# CPU seconds (user + system) of this shell's finished children (and theirs)
# so far, from the `times` builtin; run in this shell, not in a $(...)
# subshell, which would count only its own children.
children_cpu() { # -> CHILDREN_CPU
    times >"$WORK/times"
    CHILDREN_CPU=$(tail -n 1 "$WORK/times" | awk '{
        t = 0
        for (i = 1; i <= NF; i++) { split($i, a, "m"); sub("s", "", a[2]); t += a[1] * 60 + a[2] }
        printf "%.3f", t
    }')
}

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$WORK" --logfile "$WORK/redis.log" &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
rcli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }
for _ in $(seq 50); do
    [[ $(rcli PING 2>/dev/null) == PONG ]] && break
    sleep 0.1
done
[[ $(rcli PING) == PONG ]] || { echo "bench/run.sh: redis-server did not start" >&2; exit 1; }

start_tollgate() { # name store_url -> sets <name>_PID, <name>_ADDR
    local name=$1 store=$2 port
    port=$(free_port)
    TOLLGATE_LOG__LEVEL=warn TOLLGATE_SERVER__WORKER_THREADS=$TOLLGATE_THREADS "$TOLLGATE" serve --config "$CONFIG" \
        --listen "127.0.0.1:$port" --store "$store" >"$WORK/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    await_serving "$pid" "http://127.0.0.1:$port" "$WORK/$name.log"
    printf -v "${name}_PID" %s "$pid"
    printf -v "${name}_ADDR" %s "http://127.0.0.1:$port"
}
start_tollgate REDIS_TG "redis://127.0.0.1:$REDIS_PORT/0"
start_tollgate MEMORY_TG "memory://"
# (d) once more without usage statistics (on by default), for their cost.
TOLLGATE_STATS__ENABLED=false start_tollgate NOSTATS_TG "redis://127.0.0.1:$REDIS_PORT/0"

# Commands Redis has processed (INFO stats: the commands a script runs count
# too, so one sliding_log decision is 6).
redis_commands() {
    rcli INFO stats | awk -F: '/^total_commands_processed:/ { print $2 + 0 }'
}

bench() { # addr args... -> one JSON line
    timeout $((DURATION + WARMUP + 60)) "$BENCH" --json --threads "$CLIENT_THREADS" --addr "$@"
}

# ---- Redis memory per subject, for the shipped rules -----------------------
# Each subject is filled to its limit through tollgate; MEMORY USAGE ... SAMPLES 0
# counts every element.
MEMORY="$WORK/memory.tsv"
usage() { rcli MEMORY USAGE "$1" SAMPLES 0; }
fill() { # rule hits tier
    bench "$REDIS_TG_ADDR" --rule "$1" --subjects 1 -c 1 -n "$2" --tier "$3" >/dev/null
}
measure_memory() {
    # One subject per rule ("bench-0"), filled to the free tier's limit.
    local rule limit key
    for rule_limit in api:100 messaging:10 ai:20 uploads:20 auth:5; do
        rule=${rule_limit%%:*}
        limit=${rule_limit##*:}
        fill "$rule" "$limit" ""
        key="aim:{rl:bench-0}:$rule:calls"
        printf 'sliding_log\t%s\t%s\t%s\n' "$rule" "$limit" "$(usage "$key")" >>"$MEMORY"
    done
    # The auth lock-out: one more attempt starts the block.
    fill auth 1 ""
    printf 'block key\tauth\t(blocked)\t%s\n' "$(usage 'aim:{rl:bench-0}:auth:block')" >>"$MEMORY"
    # sliding_counter: the api copy at its limit.
    fill api_counter 100 ""
    printf 'sliding_counter\tapi_counter\t100\t%s\n' \
        "$(usage 'aim:{rl:bench-0}:api_counter:ctr')" >>"$MEMORY"
    # Bytes per counted call: api for bench-1 holds 100 calls; premium
    # fills it on. A sorted set stays a compact listpack up to
    # zset-max-listpack-entries (128) members, then becomes a skiplist.
    local at1 at100 at128 at1000 key='aim:{rl:bench-1}:api:calls'
    bench "$REDIS_TG_ADDR" --rule api --subjects 2 -c 1 -n 2 >/dev/null # bench-1: 1 call
    at1=$(usage "$key")
    bench "$REDIS_TG_ADDR" --rule api --subjects 2 -c 1 -n 198 >/dev/null # bench-1: 100 calls
    at100=$(usage "$key")
    bench "$REDIS_TG_ADDR" --rule api --subjects 2 -c 1 -n 56 --tier premium >/dev/null # 128
    at128=$(usage "$key")
    bench "$REDIS_TG_ADDR" --rule api --subjects 2 -c 1 -n 1744 --tier premium >/dev/null # 1000
    at1000=$(usage "$key")
    printf 'per call\tapi\t1..100\t%s\n' "$(python3 -c "print(round(($at100 - $at1) / 99, 1))")" >>"$MEMORY"
    printf 'sliding_log\tapi (premium)\t1000\t%s\n' "$at1000" >>"$MEMORY"
    printf 'per call\tapi (premium)\t128..1000\t%s\n' \
        "$(python3 -c "print(round(($at1000 - $at128) / 872, 1))")" >>"$MEMORY"
    # A token budget: 1,000 calls of cost 1 to 100,000 are 1,000 members,
    # whatever their costs add up to.
    bench "$REDIS_TG_ADDR" --rule tokens --subjects 1 -c 1 -n 1000 --cost 1 --cost-max 100000 >/dev/null
    printf 'sliding_log\ttokens (1,000 calls of cost 1..100,000)\t1000 calls\t%s\n' \
        "$(usage 'aim:{rl:bench-0}:tokens:calls')" >>"$MEMORY"
}
echo "measuring Redis memory per subject ..." >&2
measure_memory

# ---- Scenarios -------------------------------------------------------------
RESULTS="$WORK/results.tsv"
SLIDING_LOG_SHA=$(rcli SCRIPT LOAD "$(cat lua/sliding_log.lua)")

# Runs one tollgate-bench scenario and appends a row:
# run, id, label, server, rps, p50_us, p99_us, count, denied, errors,
# tollgate ticks, redis ticks, client seconds, Redis commands, warm-up count.
# The warm-up runs in the same tollgate-bench process, on the connection it
# measures (a new connection's first tens of milliseconds are slow and would
# otherwise set the p99 of a fixed-rate run); the CPU and command counters
# span both phases, so the table divides them by both phases' requests.
scenario() { # run id label server(redis|memory) args...
    local run=$1 id=$2 label=$3 server=$4
    shift 4
    local pid addr
    if [[ $server == memory ]]; then pid=$MEMORY_TG_PID addr=$MEMORY_TG_ADDR; else pid=$REDIS_TG_PID addr=$REDIS_TG_ADDR; fi
    if [[ $server == nostats ]]; then pid=$NOSTATS_TG_PID addr=$NOSTATS_TG_ADDR; fi
    local t0 r0 c0 k0 t1 r1 c1 k1 json
    children_cpu
    c0=$CHILDREN_CPU
    k0=$(redis_commands)
    t0=$(cpu_ticks "$pid")
    r0=$(cpu_ticks "$REDIS_PID")
    local warmup=()
    ((WARMUP > 0)) && warmup=(--warmup "${WARMUP}s")
    if ! json=$(bench "$addr" -d "${DURATION}s" "${warmup[@]}" "$@" 2>"$WORK/bench.err"); then
        echo "  $id: $(head -c 300 "$WORK/bench.err")" >&2
        printf '%s\t%s\t%s\tn/a\n' "$run" "$id" "$label" >>"$RESULTS"
        return 0
    fi
    t1=$(cpu_ticks "$pid")
    r1=$(cpu_ticks "$REDIS_PID")
    children_cpu
    c1=$CHILDREN_CPU
    k1=$(redis_commands)
    python3 - "$run" "$id" "$label" "$server" "$json" $((t1 - t0)) $((r1 - r0)) "$c0" "$c1" \
        $((k1 - k0 - 1)) >>"$RESULTS" <<'EOF'
import json, sys
run, id, label, server, line, t, r, c0, c1, k = sys.argv[1:]
j = json.loads(line)
l = j["latency_us"]
client = float(c1) - float(c0)
print("\t".join(map(str, [run, id, label, server, j["rps"], l["p50"], l["p99"], j["count"],
                          j["denied"], j["errors"], t, r, f"{client:.3f}", k, j["warmup_count"]])))
EOF
    echo "  $id: $(python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print("%.0f req/s, p99 %s us, denied %s, errors %s" % (j["rps"], j["latency_us"]["p99"], j["denied"], j["errors"]))' "$json")" >&2
}

# A redis-benchmark baseline: sized by a short probe to last about DURATION.
baseline() { # run id label concurrency command...
    local run=$1 id=$2 label=$3 conc=$4
    shift 4
    local probe rps n r0 r1 c0 c1 k0 k1 csv
    probe=$(timeout 60 redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$conc" -P 1 -n 5000 \
        -r "$SUBJECTS" --csv "$@" | tail -n 1)
    rps=$(python3 -c 'import csv,sys; print(float(next(csv.reader([sys.argv[1]]))[1]))' "$probe")
    n=$(python3 -c "print(max(1000, min(int($rps * $DURATION), 5_000_000)))")
    children_cpu
    c0=$CHILDREN_CPU
    k0=$(redis_commands)
    r0=$(cpu_ticks "$REDIS_PID")
    csv=$(timeout $((DURATION * 4 + 60)) redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c "$conc" \
        -P 1 -n "$n" -r "$SUBJECTS" --csv "$@" | tail -n 1)
    r1=$(cpu_ticks "$REDIS_PID")
    children_cpu
    c1=$CHILDREN_CPU
    k1=$(redis_commands)
    python3 - "$run" "$id" "$label" "$csv" "$n" $((r1 - r0)) "$c0" "$c1" $((k1 - k0 - 1)) \
        >>"$RESULTS" <<'EOF'
import csv, sys
run, id, label, line, n, r, c0, c1, k = sys.argv[1:]
row = next(csv.reader([line]))
rps, p50, p99 = float(row[1]), float(row[4]), float(row[6])
client = float(c1) - float(c0)
print("\t".join(map(str, [run, id, label, "redis-benchmark", rps, int(p50 * 1000), int(p99 * 1000),
                          n, 0, 0, "-", r, f"{client:.3f}", k, 0])))
EOF
    echo "  $id: $(printf '%.0f' "$(python3 -c 'import csv,sys; print(next(csv.reader([sys.argv[1]]))[1])' "$csv")") req/s" >&2
}

# Warm both servers up (connections, allocator, caches), uncounted.
bench "$REDIS_TG_ADDR" --rule api_log -d 2s -c 50 >/dev/null
bench "$MEMORY_TG_ADDR" --rule api_log -d 2s -c 50 >/dev/null
bench "$NOSTATS_TG_ADDR" --rule api_log -d 2s -c 50 >/dev/null

ENVOY_OK=1
if timeout 10 "$BENCH" --addr "$REDIS_TG_ADDR" --call should-rate-limit -n 1 >/dev/null 2>&1; then
    ENVOY_ARGS=(--call should-rate-limit --rule api_log)
else
    ENVOY_OK=0
fi

# CPU time the hypervisor gave to other guests while this VM wanted it
# (steal, from /proc/stat, as in vmstat's "st"), against all CPU time: on a
# shared VM, how much the neighbours slowed every figure of the run.
cpu_steal() { # -> "steal total" in clock ticks, all cores
    awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print $9, t }' /proc/stat
}
read -r STEAL0 TOTAL0 < <(cpu_steal)

for run in $(seq "$RUNS"); do
    echo "run $run of $RUNS" >&2
    baseline "$run" base_evalsha_50 "redis-benchmark EVALSHA sliding_log, 10k keys" 50 \
        EVALSHA "$SLIDING_LOG_SHA" 1 'aim:{rl:__rand_int__}:rb:calls' \
        1000000 900000000 1 0 0
    baseline "$run" base_evalsha_200 "redis-benchmark EVALSHA sliding_log, 10k keys" 200 \
        EVALSHA "$SLIDING_LOG_SHA" 1 'aim:{rl:__rand_int__}:rb:calls' \
        1000000 900000000 1 0 0
    baseline "$run" base_incr_50 "redis-benchmark INCR, 10k keys" 50 INCR 'rb:ctr:__rand_int__'
    scenario "$run" a_50 "(a) CheckLimit, Redis, sliding_log" redis --rule api_log --subjects "$SUBJECTS" -c 50
    scenario "$run" a_200 "(a) CheckLimit, Redis, sliding_log" redis --rule api_log --subjects "$SUBJECTS" -c 200
    scenario "$run" a_10k "(a) at a fixed 10,000 req/s" redis --rule api_log --subjects "$SUBJECTS" -c 200 --rps 10000
    scenario "$run" b_50 "(b) CheckLimit, Redis, sliding_counter" redis --rule api_sliding_counter --subjects "$SUBJECTS" -c 50
    scenario "$run" b_200 "(b) CheckLimit, Redis, sliding_counter" redis --rule api_sliding_counter --subjects "$SUBJECTS" -c 200
    scenario "$run" c_50 "(c) abuse: 1 subject far over its limit" redis --rule api --subjects 1 -c 50
    scenario "$run" d_50 "(d) IncrementUsage, 10k conversations" redis --call increment-usage --tier premium --subjects "$SUBJECTS" -c 50
    scenario "$run" d_nostats_50 "(d) IncrementUsage, stats.enabled = false" nostats --call increment-usage --tier premium --subjects "$SUBJECTS" -c 50
    if ((ENVOY_OK)); then
        scenario "$run" e_50 "(e) ShouldRateLimit, 1 descriptor" redis "${ENVOY_ARGS[@]}" --subjects "$SUBJECTS" -c 50
    else
        printf '%s\te_50\t(e) ShouldRateLimit, 1 descriptor\tn/a\n' "$run" >>"$RESULTS"
    fi
    scenario "$run" f_50 "(f) CheckLimit, memory store" memory --rule api_log --subjects "$SUBJECTS" -c 50
    scenario "$run" f_200 "(f) CheckLimit, memory store" memory --rule api_log --subjects "$SUBJECTS" -c 200
    scenario "$run" g_50 "(g) CheckLimit, Redis, costs 1..100,000" redis --rule tokens --cost 1 --cost-max 100000 \
        --subjects "$SUBJECTS" -c 50
    scenario "$run" h_50 "(h) CheckLimits, Redis, 3 checks" redis --call check-limits \
        --rule api_log,api_sliding_counter,api_counter --tier premium --subjects "$SUBJECTS" -c 50
    scenario "$run" rid_50 "(rid) CheckLimit with a request_id, Redis, sliding_log" redis --rule api_log \
        --request-ids --subjects "$SUBJECTS" -c 50
    scenario "$run" settle_50 "(settle) reserve + SettleLimit pairs, Redis, sliding_log" redis \
        --call settle-limit --rule tokens --cost 1000 --subjects "$SUBJECTS" -c 50
done

read -r STEAL1 TOTAL1 < <(cpu_steal)
STEAL_PERCENT=$(python3 -c "print(round(100 * ($STEAL1 - $STEAL0) / max(1, $TOTAL1 - $TOTAL0), 1))")

# ---- The table -------------------------------------------------------------
python3 - "$RESULTS" "$MEMORY" "$RUNS" "$DURATION" "$(getconf CLK_TCK)" "$CORES" \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" "$(redis-server --version | cut -d' ' -f3)" \
    "$STEAL_PERCENT" "$WARMUP" "$CLIENT_THREADS" "$TOLLGATE_THREADS" <<'EOF'
import statistics, sys
from collections import OrderedDict

results, memory, runs, duration, tck, cores, cpu, redis, steal, warmup, client_threads, tollgate_threads = sys.argv[1:]
tck = int(tck)
rows = OrderedDict()
for line in open(results):
    f = line.rstrip("\n").split("\t")
    key = f[1]
    entry = rows.setdefault(key, {"label": f[2], "runs": []})
    if f[3] == "n/a":
        continue
    rps, p50, p99, count, denied, errors = float(f[4]), int(f[5]), int(f[6]), int(f[7]), int(f[8]), int(f[9])
    # CPU and commands were counted over the warm-up too.
    sent = max(count + int(f[14]), 1)
    tg = None if f[10] == "-" else int(f[10]) * 1e6 / tck / sent
    rd = int(f[11]) * 1e6 / tck / sent
    cl = float(f[12]) * 1e6 / sent
    cmds = int(f[13]) / sent
    entry["server"] = f[3]
    entry["runs"].append(dict(rps=rps, p50=p50, p99=p99, denied=100 * denied / max(count, 1),
                              errors=errors, tg=tg, rd=rd, cl=cl, cmds=cmds))

def med(key, field):
    vals = [r[field] for r in rows.get(key, {}).get("runs", []) if r[field] is not None]
    return statistics.median(vals) if vals else None

def fmt(v, spec):
    return "-" if v is None else format(v, spec)

conc = {"50": 50, "200": 200, "10k": 200}
print(f"tollgate bench/run.sh: {cores} cores ({cpu}), Redis {redis}; "
      f"{runs} run(s) of {duration} s per scenario (after {warmup} s of warm-up), medians; "
      f"tollgate on {tollgate_threads} worker thread(s), tollgate-bench on {client_threads}; "
      f"CPU steal during the scenarios: {steal} % (time the host gave this VM's cores to others)")
print()
print("| scenario | c | req/s | p50 ms | p99 ms | denied | Redis commands/req | tollgate CPU µs/req | redis CPU µs/req | client CPU µs/req |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for key, e in rows.items():
    c = conc.get(key.rsplit("_", 1)[1], "")
    if not e["runs"]:
        print(f"| {e['label']} | {c} | n/a | | | | | | | |")
        continue
    label = e["label"] + (" (rps 10000)" if key.endswith("10k") else "")
    print(f"| {label} | {c} | {med(key, 'rps'):,.0f} | {med(key, 'p50') / 1000:.2f} | "
          f"{med(key, 'p99') / 1000:.2f} | {med(key, 'denied'):.1f} % | {fmt(med(key, 'cmds'), '.4f' if med(key, 'cmds') < 0.1 else '.2f')} | {fmt(med(key, 'tg'), '.1f')} | "
          f"{fmt(med(key, 'rd'), '.1f')} | {fmt(med(key, 'cl'), '.1f')} |")

print()
def ratio(a, b):
    x, y = med(a, "rps"), med(b, "rps")
    return None if x is None or y is None else x / y
checks = [
    ("(a) c=50 / EVALSHA c=50 req/s", ratio("a_50", "base_evalsha_50"), ">= 0.6", lambda v: v >= 0.6),
    ("(a) c=200 / EVALSHA c=200 req/s", ratio("a_200", "base_evalsha_200"), ">= 0.6", lambda v: v >= 0.6),
    ("(a) c=50 tollgate CPU µs/decision", med("a_50", "tg"), "<= 32", lambda v: v <= 32),
    ("(a) at 10,000 req/s: p99 ms", None if med("a_10k", "p99") is None else med("a_10k", "p99") / 1000, "<= 2", lambda v: v <= 2),
    ("(c) / (f) req/s, c=50", ratio("c_50", "f_50"), ">= 0.9", lambda v: v >= 0.9),
    ("(d) / (d) with stats.enabled = false req/s, c=50", ratio("d_50", "d_nostats_50"), ">= 0.95", lambda v: v >= 0.95),
    ("(c) Redis commands / denied request, c=50", med("c_50", "cmds"), "< 0.01", lambda v: v < 0.01),
    ("(f) c=50 tollgate CPU µs/decision", med("f_50", "tg"), "<= 30", lambda v: v <= 30),
    ("(g) / (a) c=50 Redis CPU µs/decision", None if med("g_50", "rd") is None or med("a_50", "rd") is None
     else med("g_50", "rd") / med("a_50", "rd"), "<= 1.5", lambda v: v <= 1.5),
    ("(h) / (a) c=50 tollgate CPU µs/call", None if med("h_50", "tg") is None or med("a_50", "tg") is None
     else med("h_50", "tg") / med("a_50", "tg"), "<= 1.5", lambda v: v <= 1.5),
    ("(h) / (a) c=50 Redis CPU µs/call", None if med("h_50", "rd") is None or med("a_50", "rd") is None
     else med("h_50", "rd") / med("a_50", "rd"), "<= 3", lambda v: v <= 3),
    ("(rid) / (a) c=50 req/s", ratio("rid_50", "a_50"), ">= 0.9", lambda v: v >= 0.9),
    ("(rid) / (a) c=50 tollgate CPU µs/decision", None if med("rid_50", "tg") is None or med("a_50", "tg") is None
     else med("rid_50", "tg") / med("a_50", "tg"), "<= 1.1", lambda v: v <= 1.1),
]
print("| target | measured | goal | met |")
print("|---|---:|---:|---|")
for name, value, goal, ok in checks:
    print(f"| {name} | {fmt(value, '.4f' if value is not None and value < 0.1 else '.2f')} | {goal} | {'-' if value is None else ('yes' if ok(value) else 'NO')} |")

print()
print("Redis commands/req counts the commands each script runs as well (one allowed")
print("sliding_log decision with nothing to trim: EVALSHA, TIME, ZRANGE oldest, ZRANGE")
print("newest, ZADD, PEXPIRE = 6).")
print()
print("Redis memory per subject (MEMORY USAGE, shipped rules, at the free tier's limit):")
print()
print("| algorithm | rule | calls | bytes |")
print("|---|---|---:|---:|")
for line in open(memory):
    algorithm, rule, hits, size = line.rstrip("\n").split("\t")
    print(f"| {algorithm} | {rule} | {hits} | {size} |")
EOF
