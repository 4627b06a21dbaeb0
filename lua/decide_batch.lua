--[[
decide_batch.lua: many callers' decisions in one script call, each decided
exactly as if it had been sent alone, one after another, in order.

This file is not a script by itself: src/store/redis.rs puts the decision
scripts, as local functions of (KEYS, ARGV, redis), lua/at_once.lua, and
lua/check_limits.lua as a local function of its own, before it (see
at_once.lua). So a decision in a batch is made by exactly the code that
makes it alone. Each is run with at_once: the batch is a run of calls
arriving one after another within one microsecond. A CheckLimits group
(check_limits) is one entry of the batch, decided all or nothing as it is
alone.

Why: tollgate sends a batch when decisions are waiting for a connection
whose script calls are in flight. One script call of n decisions saves
Redis n - 1 commands to read, parse and answer and n - 1 TIME calls, and
tollgate n - 1 commands to send and replies to parse. (The decisions' own
work, mostly their redis.call()s, is the same either way.)

KEYS     every decision's keys, in decision order: each decision's own KEYS,
         as its script takes them. All share one Cluster slot.

ARGV[1]  n          decisions in the batch (>= 1)
then the decisions, in order, as runs of consecutive decisions of one
script and shape, each run:
         script     'sliding_log', 'sliding_counter', 'usage_increment' or
                    'check_limits'
         nkeys      how many of KEYS each decision of the run takes
         nargs      how many ARGV each decision of the run takes
         count      decisions in the run (>= 1)
         shared     1: every decision of the run takes the same ARGV, sent
                    once; 0: each its own
         args...    nargs ARGV when shared, else count * nargs: each
                    decision's own ARGV, as its script takes them, one
                    decision after another
Runs only shorten the layout: under load most batches are one run (every
CheckLimit of a rule without a lock-out has the same shape), so a
decision costs Redis no header of its own to read and Lua none to check
(a header per decision was 7,000 instructions of redis-server's per
decision, in bench/script_cost.py), and most runs' decisions share their
ARGV (one rule and a cost of 1), which Redis then reads once rather than
once per decision.

Returns one reply per decision, in order: the script's own reply (an
array), or, when that script raised an error, the error's message as a
string. One decision's error (a key of the wrong type, say) is that
decision's alone: the others are still decided and answered, as they would
be if each had been sent alone. (A nested error reply would make clients
fail the whole batch, hence a plain string.)

Bounded work: the sum of the decisions' scripts' work (each bounded by its
own header) plus O(n) to cut out their arguments; tollgate sends at most
store.max_batch decisions (at most 512) in one batch, a group counting as
its checks.

Worked example: ARGV {2, 'sliding_log', 1, 5, 2, 1, 100, 60000000, 1, 0,
0} with KEYS {log, log}: two hits on one empty log of limit 100, the second
seeing the first: {{1, 99, 0, 60000000, 0}, {1, 98, 0, 60000000, 0}}. The
same with shared 0 sends the five ARGV twice.
]]

local n = tonumber(ARGV[1])
if not (n and n >= 1 and n == math.floor(n)) then error('decide_batch.lua: ARGV[1] (n) must be a positive integer', 0) end

local SCRIPTS = {
  sliding_log = sliding_log,
  sliding_counter = sliding_counter,
  usage_increment = usage_increment,
  check_limits = check_limits,
}

-- An error raised in a script is a string (assert, error) or, from
-- redis.call, a table holding the server's error.
local function message(err)
  if type(err) == 'table' then
    return tostring(err.err or err.message or 'unknown error')
  end
  return tostring(err)
end

-- The layout is checked whole before anything is decided, so a malformed
-- batch changes nothing. Only the runs' offsets are kept: each decision's
-- KEYS and ARGV are cut out with unpack (one allocation each) as it is run.
local runs = {}
local decisions, next_key, next_arg = 0, 1, 2
while decisions < n do
  local script = SCRIPTS[ARGV[next_arg]]
  local nkeys, nargs, count = tonumber(ARGV[next_arg + 1]), tonumber(ARGV[next_arg + 2]), tonumber(ARGV[next_arg + 3])
  local shared = ARGV[next_arg + 4]
  if not script then error('decide_batch.lua: run ' .. (#runs + 1) .. ': unknown script ' .. tostring(ARGV[next_arg]), 0) end
  if not (nkeys and nkeys >= 0 and nkeys % 1 == 0 and nargs and nargs >= 0 and nargs % 1 == 0 and count and count >= 1 and count % 1 == 0
      and (shared == '0' or shared == '1')) then
    error('decide_batch.lua: run ' .. (#runs + 1) .. ': nkeys and nargs must be integers >= 0, count an integer >= 1, shared 0 or 1', 0)
  end
  -- How far each decision's ARGV is from the one before: 0 when shared.
  local stride = shared == '1' and 0 or nargs
  runs[#runs + 1] = { script, nkeys, nargs, count, next_key, next_arg + 5, stride }
  decisions = decisions + count
  next_key = next_key + count * nkeys
  next_arg = next_arg + 5 + (stride == 0 and nargs or count * nargs)
end
if decisions ~= n then error('decide_batch.lua: the runs hold ' .. decisions .. ' decisions, not ' .. n, 0) end
if next_key - 1 ~= #KEYS then error('decide_batch.lua: the decisions take ' .. (next_key - 1) .. ' KEYS, got ' .. #KEYS, 0) end
if next_arg - 1 ~= #ARGV then error('decide_batch.lua: the decisions take ' .. (next_arg - 1) .. ' ARGV, got ' .. #ARGV, 0) end

local replies = {}
for r = 1, #runs do
  local script, nkeys, nargs, count, key, arg, stride = unpack(runs[r])
  for _ = 1, count do
    local keys = { unpack(KEYS, key, key + nkeys - 1) }
    local args = { unpack(ARGV, arg, arg + nargs - 1) }
    local ok, reply = pcall(script, keys, args, at_once)
    if ok then
      replies[#replies + 1] = reply
    else
      replies[#replies + 1] = message(reply)
    end
    key, arg = key + nkeys, arg + stride
  end
end
return replies
