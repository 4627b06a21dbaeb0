# shellcheck shell=bash
# bench/lib.sh: what bench/run.sh, bench/soak.sh and bench/callgrind.sh
# share. Sourced, not run.
#
# Expects PIDS (an array of the processes the script started), WORK (its
# work directory), KEEP, MAX_SECONDS and TOLLGATE to be set by the caller.

# A free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# A watchdog: the whole script is bounded even if something hangs. After
# MAX_SECONDS it sends the script SIGTERM; its PID joins PIDS, so cleanup
# stops it.
start_watchdog() { # script name, for the message
    local name=$1
    (
        sleep "$MAX_SECONDS" &
        sleeper=$!
        trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
        wait "$sleeper" || exit 0
        echo "$name: over MAX_SECONDS=$MAX_SECONDS; stopping" >&2
        kill -TERM $$ 2>/dev/null
    ) &
    PIDS+=($!)
}

# Waits until the tollgate at addr answers its health check as SERVING;
# exits with its log if the process dies first or never serves.
await_serving() { # pid addr log
    local pid=$1 addr=$2 log=$3
    for _ in $(seq 100); do
        "$TOLLGATE" health --addr "$addr" --timeout 1s >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.1
    done
    "$TOLLGATE" health --addr "$addr" --timeout 1s >/dev/null ||
        { echo "tollgate at $addr is not SERVING; its log:" >&2; cat "$log" >&2; exit 1; }
}

# Stops every process in PIDS (after the script's own before_cleanup, when
# it defines one), waits for them, removes WORK unless KEEP=1, and exits
# with the script's status: the EXIT trap install_cleanup sets.
cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if declare -F before_cleanup >/dev/null; then
        before_cleanup
    fi
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

# Runs cleanup however the script ends: normally, on an error (set -e), or
# on SIGINT or SIGTERM (the watchdog's), with the signal's exit status.
install_cleanup() {
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}
