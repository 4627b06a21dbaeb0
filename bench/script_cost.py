#!/usr/bin/env python3
"""bench/script_cost.py: what tollgate's decision scripts cost Redis, in
instructions of redis-server per decision, counted by valgrind's callgrind:
a figure a shared, noisy machine cannot move (bench/callgrind.sh counts
tollgate's own process the same way).

For each scenario it starts redis-server under `valgrind --tool=callgrind`
on a free loopback port, loads the script, fills the logs of SUBJECTS
subjects with ROUNDS calls each (rule api_log's arguments: limit 1,000,000,
window 15 min, cost 1, so every call is allowed and counted, as in
bench/run.sh's (a)), makes N more calls, and stops Redis so that callgrind
writes its counts. It does so twice, with N_SMALL and N_BIG calls:
instructions per decision = (big run - small run) / (N_BIG - N_SMALL), so
start-up, loading and the filling cancel out.

Scenarios:
  sliding_log alone       one EVALSHA of lua/sliding_log.lua per decision
  sliding_log, batch of B decide_batch.lua (composed as src/store/redis.rs
                          composes it) deciding B calls per EVALSHA
  sliding_counter alone   one EVALSHA of lua/sliding_counter.lua

  bench/script_cost.py                  # the working tree's scripts
  bench/script_cost.py --rev 484f5af    # and those of a revision, side by side
  bench/script_cost.py --keep DIR       # and keep callgrind's counts in DIR

Each figure is followed by the share of the big run's decisions that made
a PEXPIRE. A sliding_log refreshes its expiry once per key per eighth of a
window (about 112 s here) and a sliding_counter once per window; valgrind
stretches a run to a minute or more, so whether a stretch ends during it
(and every key then refreshes once more) depends on the wall clock. Each
refresh is one redis.call(), 11,000 to 14,000 instructions: read the
figure with its share. (A log's first call always sets the expiry; in
bench/run.sh's scenarios, 10,000 new logs each called about ten times in
five seconds, about one decision in ten does.)

Calls are pipelined 100 at a time, so the figures are the scripts' own
work plus Redis's per-command handling, with little of its socket work.
Redis runs with hz 1: its timer work grows with wall time, which valgrind
stretches. Only 127.0.0.1 is used; every process is bounded by a timeout
and stopped on exit.
"""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBJECTS = 2000
ROUNDS = 5
# rule api_log of bench/tollgate-bench.toml: limit, window_us, cost,
# dry_run, block_us.
DECISION_ARGS = ["1000000", "900000000", "1", "0", "0"]
PIPELINE = 100
TIMEOUT_SECONDS = 600


def lua_source(rev, name):
    """A script's text in the working tree (rev None) or at a revision."""
    if rev is None:
        with open(os.path.join(ROOT, "lua", name), encoding="utf-8") as file:
            return file.read()
    return subprocess.run(
        ["git", "-C", ROOT, "show", f"{rev}:lua/{name}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def composed(rev, name):
    """decide_batch.lua as src/store/redis.rs composes it (composed_script!)."""
    def function(script):  # lua_function! in src/store/redis.rs
        return f"local function {script}(KEYS, ARGV, redis)\n{lua_source(rev, script + '.lua')}\nend\n"

    parts = [function(script) for script in ("sliding_log", "sliding_counter", "usage_increment")]
    parts.append(lua_source(rev, "at_once.lua"))
    script = lua_source(rev, name)
    # Since groups batch, decide_batch.lua also runs check_limits.lua, as a
    # function of its own.
    if "check_limits = check_limits" in script:
        parts.append(function("check_limits"))
    parts.append(script)
    return "".join(parts)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Redis:
    """A minimal RESP client: enough to load a script and pipeline calls."""

    def __init__(self, port):
        deadline = time.monotonic() + TIMEOUT_SECONDS / 4
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_SECONDS)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.reader = self.sock.makefile("rb")

    @staticmethod
    def encode(args):
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(out)

    def reply(self):
        line = self.reader.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"-":
            raise RuntimeError(f"Redis replied with an error: {rest.decode(errors='replace')}")
        if kind in (b"+", b":"):
            return rest
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self.reader.read(size + 2)[:-2]
        if kind == b"*":
            return [self.reply() for _ in range(max(int(rest), 0))]
        raise RuntimeError(f"unexpected reply {line!r}")

    def pipeline(self, commands):
        self.sock.sendall(b"".join(self.encode(command) for command in commands))
        return [self.reply() for _ in commands]


def log_key(subject):
    return f"bench:{{rl:s{subject}}}:api_log:calls"


def commands(kind, sha, batch, layout, first, count):
    """EVALSHA commands for decisions first .. first + count - 1, in
    decide_batch.lua's layout of the revision: "shared" (a header per run of
    decisions of one shape, their common ARGV sent once, as tollgate sends
    this rule's), "runs" (a header per run, each decision's ARGV), or
    "each" (a header per decision)."""
    out = []
    subjects = [(first + i) % SUBJECTS for i in range(count)]
    if batch:
        for start in range(0, count, batch):
            chunk = subjects[start:start + batch]
            argv = [str(len(chunk))]
            if layout == "shared":
                argv += [kind, "1", str(len(DECISION_ARGS)), str(len(chunk)), "1"]
                argv += DECISION_ARGS
            elif layout == "runs":
                argv += [kind, "1", str(len(DECISION_ARGS)), str(len(chunk))]
                argv += DECISION_ARGS * len(chunk)
            else:
                for _ in chunk:
                    argv += [kind, "1", str(len(DECISION_ARGS))] + DECISION_ARGS
            out.append(["EVALSHA", sha, str(len(chunk))] + [log_key(s) for s in chunk] + argv)
    else:
        out = [["EVALSHA", sha, "1", log_key(s)] + DECISION_ARGS for s in subjects]
    return out


def instructions(source, kind, batch, calls, out_file):
    """Instructions redis-server ran in all, filling the logs, then `calls`,
    counted into `out_file`."""
    port = free_port()
    server = subprocess.Popen(
        ["timeout", str(TIMEOUT_SECONDS), "valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}",
         "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--hz", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        redis = Redis(port)
        sha = redis.pipeline([["SCRIPT", "LOAD", source]])[0].decode()
        step = PIPELINE * (batch or 1)
        if "the same ARGV, sent" in source:
            layout = "shared"
        elif "runs of consecutive decisions" in source:
            layout = "runs"
        else:
            layout = "each"
        # Fill the logs, then the calls measured.
        for total in (SUBJECTS * ROUNDS, calls):
            redis.pipeline([["CONFIG", "RESETSTAT"]])
            for first in range(0, total, step):
                redis.pipeline(commands(kind, sha, batch, layout, first, min(step, total - first)))
        expiries = pexpire_calls(redis.pipeline([["INFO", "commandstats"]])[0])
        redis.sock.close()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=TIMEOUT_SECONDS)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    with open(out_file, encoding="utf-8") as file:
        for line in file:
            if line.startswith("summary:") or line.startswith("totals:"):
                return int(line.split()[1]), expiries
    raise RuntimeError(f"no totals in {out_file}")


def pexpire_calls(commandstats):
    """The PEXPIRE count in an INFO commandstats reply."""
    for line in commandstats.decode().splitlines():
        if line.startswith("cmdstat_pexpire:calls="):
            return int(line.split("=", 1)[1].split(",", 1)[0])
    return 0


def per_decision(source, kind, batch, small, big, out_prefix):
    """Instructions per decision, and the share of the big run's decisions
    that refreshed their key's expiry (a PEXPIRE); the counts go to
    `<out_prefix>.big` and `.small`."""
    big_total, expiries = instructions(source, kind, batch, big, f"{out_prefix}.big")
    small_total, _ = instructions(source, kind, batch, small, f"{out_prefix}.small")
    return (big_total - small_total) / (big - small), expiries / big


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", action="append", default=[], help="also count the scripts of this git revision")
    parser.add_argument("--batch", type=int, default=20, help="decisions per decide_batch.lua call (default 20)")
    parser.add_argument("--n-small", type=int, default=2000, help="calls in the small run (default 2000)")
    parser.add_argument("--n-big", type=int, default=6000, help="calls in the big run (default 6000)")
    parser.add_argument("--keep", metavar="DIR", help="keep callgrind's counts in DIR (callgrind.out.<scenario>.<rev>.big and .small) for callgrind_annotate")
    options = parser.parse_args()
    for tool in ("valgrind", "redis-server", "timeout"):
        if shutil.which(tool) is None:
            sys.exit(f"bench/script_cost.py: needs {tool}")
    if not (1 <= options.batch <= 512 and 0 < options.n_small < options.n_big):
        sys.exit("bench/script_cost.py: needs 1 <= --batch <= 512 and 0 < --n-small < --n-big")

    revisions = options.rev + [None]
    scenarios = [
        ("sliding_log alone", "sliding_log", lambda rev: lua_source(rev, "sliding_log.lua"), 0),
        (f"sliding_log, batch of {options.batch}", "sliding_log", lambda rev: composed(rev, "decide_batch.lua"), options.batch),
        ("sliding_counter alone", "sliding_counter", lambda rev: lua_source(rev, "sliding_counter.lua"), 0),
    ]
    names = [rev or "working tree" for rev in revisions]
    print("| scenario | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    if options.keep:
        os.makedirs(options.keep, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tollgate-script-cost.") as workdir:
        kept = options.keep or workdir
        for number, (title, kind, source_of, batch) in enumerate(scenarios):
            cells = []
            for rev in revisions:
                try:
                    source = source_of(rev)
                except subprocess.CalledProcessError:
                    cells.append("-")
                    continue
                out_prefix = os.path.join(kept, f"callgrind.out.{number + 1}.{rev or 'tree'}")
                count, expiries = per_decision(source, kind, batch, options.n_small, options.n_big, out_prefix)
                cells.append(f"{count:,.0f} ({expiries:.0%} PEXPIRE)")
            print(f"| {title} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
