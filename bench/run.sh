#!/usr/bin/env bash
# bench/run.sh: tollgate's speed, measured in one command, as one table.
#
# Starts a redis-server, `tollgate serve` on it and on the embedded memory
# store, and the floor (bench/floor.rs: a bare server doing one EVALSHA per
# request) on that Redis, on free loopback ports, drives them with
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
#   BASELINE_REV    a git revision (e.g. 484f5af, the release before
#                   batching): (a) c=200 on its tollgate too, in every run,
#                   for the Redis CPU per decision against it; unset: none
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
#   (e) ShouldRateLimit, one descriptor (generic_key api_log), as (a),
#       concurrency 50 and 200
#   (floor) (a) and (e) against the floor, concurrency 50 and 200: what a
#       service that calls Redis itself would do; tollgate / floor is a goal
#   (a) unbatched: (a) at c=200 on a tollgate with store.max_batch = 1
#       (every decision its own EVALSHA): the Redis CPU batching saves
#   (a) previous release: (a) at c=200 on the tollgate of BASELINE_REV,
#       built by this script into target/baseline-<rev>/ (once; a full
#       release build, about 5 minutes), when BASELINE_REV is set
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
# Every scenario on rule api_log (tollgate's or the floor's) and the EVALSHA
# baselines start from empty logs, so that each compares like with like.
# After (a) c=200 and (a) at 10,000 req/s the table gives the batch sizes of
# tollgate's Redis script calls (the tollgate_store_batch_size histogram of
# its metrics), "-" when this tollgate has none.
set -euo pipefail

cd "$(dirname "$0")/.."
# shellcheck source=bench/lib.sh
source bench/lib.sh
for tool in redis-server redis-cli redis-benchmark python3 curl nproc; do
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
# 26 scenarios of DURATION (plus set-up, which takes seconds on a busy
# machine) per run, the memory measurements and start-up; a build is
# bounded on its own.
MAX_SECONDS=${MAX_SECONDS:-$((180 + RUNS * 26 * (DURATION + WARMUP + 8)))}
CONFIG=bench/tollgate-bench.toml
TOLLGATE=target/release/tollgate
BENCH=target/release/tollgate-bench
FLOOR=target/release/examples/floor

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
    # On its own: an example brings in the dev-dependencies, whose features
    # (tokio's test-util) would otherwise be built into tollgate too.
    timeout 1800 cargo build --release --quiet --example floor
fi

# The previous release, built from its own source tree into a target
# directory of its own, once.
BASELINE=""
if [[ -n ${BASELINE_REV:-} ]]; then
    rev=$(git rev-parse --short "$BASELINE_REV^{commit}") || { echo "bench/run.sh: BASELINE_REV $BASELINE_REV is not a commit" >&2; exit 1; }
    BASELINE="$PWD/target/baseline-$rev/release/tollgate"
    if [[ ! -x $BASELINE ]]; then
        echo "building tollgate $rev (BASELINE_REV) ..." >&2
        src=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-baseline.XXXXXX")
        git worktree add --detach "$src/tree" "$rev" >/dev/null
        (cd "$src/tree" && CARGO_TARGET_DIR="$OLDPWD/target/baseline-$rev" timeout 1800 cargo build --release --quiet --bin tollgate)
        git worktree remove --force "$src/tree"
        rm -rf "$src"
    fi
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-bench.XXXXXX")
PIDS=()
install_cleanup

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

start_tollgate() { # name store_url [binary] -> sets <name>_PID, <name>_ADDR
    local name=$1 store=$2 binary=${3:-$TOLLGATE} port
    port=$(free_port)
    TOLLGATE_LOG__LEVEL=warn TOLLGATE_SERVER__WORKER_THREADS=$TOLLGATE_THREADS "$binary" serve --config "$CONFIG" \
        --listen "127.0.0.1:$port" --store "$store" >"$WORK/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    await_serving "$pid" "http://127.0.0.1:$port" "$WORK/$name.log"
    printf -v "${name}_PID" %s "$pid"
    printf -v "${name}_ADDR" %s "http://127.0.0.1:$port"
}
# The Redis tollgate serves its metrics too: the batch sizes.
METRICS_PORT=$(free_port)
TOLLGATE_SERVER__METRICS_LISTEN=127.0.0.1:$METRICS_PORT start_tollgate REDIS_TG "redis://127.0.0.1:$REDIS_PORT/0"
start_tollgate MEMORY_TG "memory://"
# (d) once more without usage statistics (on by default), for their cost.
TOLLGATE_STATS__ENABLED=false start_tollgate NOSTATS_TG "redis://127.0.0.1:$REDIS_PORT/0"
# (a) once more with every decision its own script call, when this tollgate
# batches at all (store.max_batch).
UNBATCHED_OK=0
if TOLLGATE_STORE__MAX_BATCH=1 "$TOLLGATE" check-config "$CONFIG" >/dev/null 2>&1; then
    TOLLGATE_STORE__MAX_BATCH=1 start_tollgate UNBATCHED_TG "redis://127.0.0.1:$REDIS_PORT/0"
    UNBATCHED_OK=1
else
    echo "this tollgate has no store.max_batch: no (a) unbatched" >&2
fi
if [[ -n $BASELINE ]]; then
    start_tollgate BASELINE_TG "redis://127.0.0.1:$REDIS_PORT/0" "$BASELINE"
fi

# The floor, on the same Redis and as many worker threads, under keys of its
# own (prefix floor:), with api_log's limit and window.
start_floor() {
    local port pid
    port=$(free_port)
    "$FLOOR" --listen "127.0.0.1:$port" --redis "redis://127.0.0.1:$REDIS_PORT/0" \
        --limit 1000000 --window 15m --key-prefix floor: --worker-threads "$TOLLGATE_THREADS" \
        >"$WORK/floor.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    FLOOR_PID=$pid
    FLOOR_ADDR="http://127.0.0.1:$port"
    # It has no health service: one CheckLimit answered means it serves.
    for _ in $(seq 100); do
        timeout 5 "$BENCH" --addr "$FLOOR_ADDR" --rule api_log -n 1 >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "bench/run.sh: the floor did not serve; its log:" >&2
    cat "$WORK/floor.log" >&2
    exit 1
}
start_floor

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
BATCHES="$WORK/batches.tsv"
: >"$BATCHES"
SLIDING_LOG_SHA=$(rcli SCRIPT LOAD "$(cat lua/sliding_log.lua)")

# Deletes the keys matching each pattern, in one script call per pattern
# (SCAN inside the script: one round trip, between scenarios only). A
# sliding log's cost in Redis grows with its length, so every compared
# scenario starts from empty logs and grows them at its own pace.
RESET_LUA='local n, cursor = 0, "0"
repeat
  local page = redis.call("SCAN", cursor, "MATCH", ARGV[1], "COUNT", 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do redis.call("UNLINK", key); n = n + 1 end
until cursor == "0"
return n'
reset_logs() { # pattern...
    local pattern
    for pattern; do
        rcli EVAL "$RESET_LUA" 0 "$pattern" >/dev/null
    done
}
# The logs of rule api_log, tollgate's and the floor's.
reset_api_log() { reset_logs 'aim:{rl:*}:api_log:calls' 'floor:{rl:*}:api_log:calls'; }

# The Redis tollgate's tollgate_store_batch_size histogram, on one line:
# count, sum and the cumulative buckets le=1 2 4 8 16 32 64 128 256 +Inf
# (summed over any labels), or "-" when it has none.
batch_snapshot() {
    curl -sf --max-time 2 "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null | python3 -c '
import re, sys
les = ["1", "2", "4", "8", "16", "32", "64", "128", "256", "+Inf"]
count = total = None
buckets = dict.fromkeys(les, 0.0)
for line in sys.stdin:
    m = re.match(r"tollgate_store_batch_size_(bucket|sum|count)(\{[^}]*\})?\s+(\S+)", line)
    if not m:
        continue
    kind, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
    if kind == "count":
        count = (count or 0) + value
    elif kind == "sum":
        total = (total or 0) + value
    else:
        le = re.search(r"le=\"([^\"]*)\"", labels)
        if le:
            key = le.group(1)
            key = key if key in ("+Inf", "Inf", "inf") else format(float(key), "g")
            key = "+Inf" if key in ("Inf", "inf") else key
            if key in buckets:
                buckets[key] += value
if count is None or total is None:
    print("-")
else:
    print(" ".join(format(v, ".0f") for v in [count, total] + [buckets[le] for le in les]))
' || echo "-"
}

# Appends the histogram's growth over a scenario to BATCHES: run, id and
# the differences of batch_snapshot's fields, or "-".
record_batches() { # run id before after
    python3 - "$@" >>"$BATCHES" <<'EOF'
import sys
run, id, before, after = sys.argv[1:]
if before == "-" or after == "-":
    print(f"{run}\t{id}\t-")
else:
    b, a = before.split(), after.split()
    print("\t".join([run, id] + [str(int(float(y) - float(x))) for x, y in zip(b, a)]))
EOF
}

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
    case $server in
    memory) pid=$MEMORY_TG_PID addr=$MEMORY_TG_ADDR ;;
    nostats) pid=$NOSTATS_TG_PID addr=$NOSTATS_TG_ADDR ;;
    unbatched) pid=$UNBATCHED_TG_PID addr=$UNBATCHED_TG_ADDR ;;
    baseline) pid=$BASELINE_TG_PID addr=$BASELINE_TG_ADDR ;;
    floor) pid=$FLOOR_PID addr=$FLOOR_ADDR ;;
    *) pid=$REDIS_TG_PID addr=$REDIS_TG_ADDR ;;
    esac
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
    # The EVALSHA baselines' logs start empty, as (a)'s do.
    reset_logs 'aim:{rl:*}:rb:calls'
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
if ((UNBATCHED_OK)); then bench "$UNBATCHED_TG_ADDR" --rule api_log -d 2s -c 50 >/dev/null; fi
bench "$FLOOR_ADDR" --rule api_log -d 2s -c 50 >/dev/null

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
    # Each tollgate scenario on api_log next to its floor scenario, so both
    # meet the same moment of a shared machine; each from empty logs.
    reset_api_log
    scenario "$run" a_50 "(a) CheckLimit, Redis, sliding_log" redis --rule api_log --subjects "$SUBJECTS" -c 50
    reset_api_log
    scenario "$run" floor_a_50 "floor: CheckLimit, one EVALSHA per request" floor --rule api_log --subjects "$SUBJECTS" -c 50
    reset_api_log
    before=$(batch_snapshot)
    scenario "$run" a_200 "(a) CheckLimit, Redis, sliding_log" redis --rule api_log --subjects "$SUBJECTS" -c 200
    record_batches "$run" a_200 "$before" "$(batch_snapshot)"
    reset_api_log
    scenario "$run" floor_a_200 "floor: CheckLimit, one EVALSHA per request" floor --rule api_log --subjects "$SUBJECTS" -c 200
    if ((UNBATCHED_OK)); then
        reset_api_log
        scenario "$run" a_unbatched_200 "(a) unbatched: store.max_batch = 1" unbatched --rule api_log --subjects "$SUBJECTS" -c 200
    else
        printf '%s\ta_unbatched_200\t(a) unbatched: store.max_batch = 1\tn/a\n' "$run" >>"$RESULTS"
    fi
    if [[ -n $BASELINE ]]; then
        reset_api_log
        scenario "$run" a_prev_200 "(a) previous release ($BASELINE_REV)" baseline --rule api_log --subjects "$SUBJECTS" -c 200
    fi
    reset_api_log
    before=$(batch_snapshot)
    scenario "$run" a_10k "(a) at a fixed 10,000 req/s" redis --rule api_log --subjects "$SUBJECTS" -c 200 --rps 10000
    record_batches "$run" a_10k "$before" "$(batch_snapshot)"
    scenario "$run" b_50 "(b) CheckLimit, Redis, sliding_counter" redis --rule api_sliding_counter --subjects "$SUBJECTS" -c 50
    scenario "$run" b_200 "(b) CheckLimit, Redis, sliding_counter" redis --rule api_sliding_counter --subjects "$SUBJECTS" -c 200
    scenario "$run" c_50 "(c) abuse: 1 subject far over its limit" redis --rule api --subjects 1 -c 50
    scenario "$run" d_50 "(d) IncrementUsage, 10k conversations" redis --call increment-usage --tier premium --subjects "$SUBJECTS" -c 50
    scenario "$run" d_nostats_50 "(d) IncrementUsage, stats.enabled = false" nostats --call increment-usage --tier premium --subjects "$SUBJECTS" -c 50
    for c in 50 200; do
        if ((ENVOY_OK)); then
            reset_api_log
            scenario "$run" "e_$c" "(e) ShouldRateLimit, 1 descriptor" redis "${ENVOY_ARGS[@]}" --subjects "$SUBJECTS" -c "$c"
            reset_api_log
            scenario "$run" "floor_e_$c" "floor: ShouldRateLimit, one EVALSHA per request" floor "${ENVOY_ARGS[@]}" \
                --subjects "$SUBJECTS" -c "$c"
        else
            printf '%s\te_%s\t(e) ShouldRateLimit, 1 descriptor\tn/a\n' "$run" "$c" >>"$RESULTS"
            printf '%s\tfloor_e_%s\tfloor: ShouldRateLimit, one EVALSHA per request\tn/a\n' "$run" "$c" >>"$RESULTS"
        fi
    done
    scenario "$run" f_50 "(f) CheckLimit, memory store" memory --rule api_log --subjects "$SUBJECTS" -c 50
    scenario "$run" f_200 "(f) CheckLimit, memory store" memory --rule api_log --subjects "$SUBJECTS" -c 200
    scenario "$run" g_50 "(g) CheckLimit, Redis, costs 1..100,000" redis --rule tokens --cost 1 --cost-max 100000 \
        --subjects "$SUBJECTS" -c 50
    scenario "$run" h_50 "(h) CheckLimits, Redis, 3 checks" redis --call check-limits \
        --rule api_log,api_sliding_counter,api_counter --tier premium --subjects "$SUBJECTS" -c 50
    reset_api_log
    scenario "$run" rid_50 "(rid) CheckLimit with a request_id, Redis, sliding_log" redis --rule api_log \
        --request-ids --subjects "$SUBJECTS" -c 50
    scenario "$run" settle_50 "(settle) reserve + SettleLimit pairs, Redis, sliding_log" redis \
        --call settle-limit --rule tokens --cost 1000 --subjects "$SUBJECTS" -c 50
done

read -r STEAL1 TOTAL1 < <(cpu_steal)
STEAL_PERCENT=$(python3 -c "print(round(100 * ($STEAL1 - $STEAL0) / max(1, $TOTAL1 - $TOTAL0), 1))")

# ---- The table -------------------------------------------------------------
python3 - "$RESULTS" "$MEMORY" "$BATCHES" "$RUNS" "$DURATION" "$(getconf CLK_TCK)" "$CORES" \
    "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" "$(redis-server --version | cut -d' ' -f3)" \
    "$STEAL_PERCENT" "$WARMUP" "$CLIENT_THREADS" "$TOLLGATE_THREADS" <<'EOF'
import statistics, sys
from collections import OrderedDict

results, memory, batches, runs, duration, tck, cores, cpu, redis, steal, warmup, client_threads, tollgate_threads = sys.argv[1:]
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

def worst(key, field, pick):
    vals = [r[field] for r in rows.get(key, {}).get("runs", []) if r[field] is not None]
    return pick(vals) if vals else None

def worst_ratio(a, b):
    """The lowest of the runs' req/s ratios: a goal "in every run"."""
    ra, rb = rows.get(a, {}).get("runs", []), rows.get(b, {}).get("runs", [])
    vals = [x["rps"] / y["rps"] for x, y in zip(ra, rb) if y["rps"]]
    return min(vals) if vals else None

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
    ("(a) c=200 / EVALSHA c=200 req/s", ratio("a_200", "base_evalsha_200"), ">= 1.0", lambda v: v >= 1.0),
    ("(a) / floor CheckLimit req/s, c=50, worst run", worst_ratio("a_50", "floor_a_50"), ">= 1.0", lambda v: v >= 1.0),
    ("(a) / floor CheckLimit req/s, c=200, worst run", worst_ratio("a_200", "floor_a_200"), ">= 1.0", lambda v: v >= 1.0),
    ("(e) / floor ShouldRateLimit req/s, c=50, worst run", worst_ratio("e_50", "floor_e_50"), ">= 1.0", lambda v: v >= 1.0),
    ("(e) / floor ShouldRateLimit req/s, c=200, worst run", worst_ratio("e_200", "floor_e_200"), ">= 1.0", lambda v: v >= 1.0),
    ("(a) c=200 Redis CPU µs/decision / previous release's",
     None if med("a_200", "rd") is None or med("a_prev_200", "rd") is None
     else med("a_200", "rd") / med("a_prev_200", "rd"), "<= 0.5", lambda v: v <= 0.5),
    ("(a) c=200 Redis CPU µs/decision, batched / unbatched",
     None if med("a_200", "rd") is None or med("a_unbatched_200", "rd") is None
     else med("a_200", "rd") / med("a_unbatched_200", "rd"), "<= 1.0", lambda v: v <= 1.0),
    ("(a) c=50 tollgate CPU µs/decision", med("a_50", "tg"), "<= 32", lambda v: v <= 32),
    ("(a) at 10,000 req/s: p99 ms, worst run", None if worst("a_10k", "p99", max) is None else worst("a_10k", "p99", max) / 1000, "<= 2", lambda v: v <= 2),
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
print("newest, ZADD = 5, plus a PEXPIRE on a log's first call and once per eighth of a")
print("window). On the floor's rows the tollgate CPU column is the floor's process")
print("(bench/floor.rs).")

# Batch sizes: the growth of tollgate_store_batch_size over each scenario,
# added up over the runs. Its buckets count script calls; a call of the
# bucket (lo, hi] decided lo+1 to hi requests, so the decisions per size
# class are exact for sizes 1 and 2 and otherwise taken at each bucket's
# middle, scaled so that they add up to the histogram's exact sum.
print()
print("Batch sizes of tollgate's Redis script calls (tollgate_store_batch_size, all runs;")
print("shares of decisions by the size of the call that decided them):")
print()
print("| scenario | script calls | decisions | decisions per call | 1 | 2-4 | 5-16 | 17-64 | >64 |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
sums = OrderedDict()
for line in open(batches):
    f = line.rstrip("\n").split("\t")
    if f[2] == "-":
        sums.setdefault(f[1], None)
        continue
    vals = [int(x) for x in f[2:]]
    prev = sums.get(f[1])
    sums[f[1]] = vals if prev is None else [a + b for a, b in zip(prev, vals)]
labels = {"a_200": "(a) c=200", "a_10k": "(a) at a fixed 10,000 req/s"}
bounds = [1, 2, 4, 8, 16, 32, 64, 128, 256]
classes = [("1", 1), ("2-4", 4), ("5-16", 16), ("17-64", 64), (">64", None)]
for key, vals in sums.items():
    label = labels.get(key, key)
    if vals is None or vals[0] <= 0:
        print(f"| {label} | - | - | - | - | - | - | - | - |")
        continue
    calls, decisions, cumulative = vals[0], vals[1], vals[2:]
    per_bucket = [c - (cumulative[i - 1] if i else 0) for i, c in enumerate(cumulative)]
    exact, estimated = {}, {}
    lo = 0
    for i, n in enumerate(per_bucket):
        hi = bounds[i] if i < len(bounds) else None
        if hi is not None and hi - lo == 1:
            exact[i] = n * hi
        else:
            estimated[i] = n * ((lo + 1 + hi) / 2 if hi is not None else 2 * lo)
        lo = hi if hi is not None else lo
    rest = max(decisions - sum(exact.values()), 0)
    scale = rest / sum(estimated.values()) if sum(estimated.values()) > 0 else 0
    share = {i: exact.get(i, estimated.get(i, 0) * scale) for i in range(len(per_bucket))}
    cells = []
    first = 0
    for name, top in classes:
        idx = [i for i in range(len(per_bucket)) if i >= first and (top is None or (bounds[i] if i < len(bounds) else 1e18) <= top)]
        first = max(idx) + 1 if idx else first
        cells.append(f"{100 * sum(share[i] for i in idx) / max(decisions, 1):.0f} %")
    print(f"| {label} | {calls:,} | {decisions:,} | {decisions / calls:.2f} | " + " | ".join(cells) + " |")
print()
print("Redis memory per subject (MEMORY USAGE, shipped rules, at the free tier's limit):")
print()
print("| algorithm | rule | calls | bytes |")
print("|---|---|---:|---:|")
for line in open(memory):
    algorithm, rule, hits, size = line.rstrip("\n").split("\t")
    print(f"| {algorithm} | {rule} | {hits} | {size} |")
EOF
