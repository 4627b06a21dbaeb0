--[[
check_limits.lua: several rate limits decided together, all or nothing.

This file is not a script by itself: src/store/redis/group.rs builds the
script by putting, before this text, the two decision scripts each wrapped
as a local function of (KEYS, ARGV, redis):
  local function sliding_log(KEYS, ARGV, redis) <lua/sliding_log.lua> end
  local function sliding_counter(KEYS, ARGV, redis) <lua/sliding_counter.lua> end
So each algorithm has one source, and a check in a group is decided by
exactly the code that decides it alone. The `redis` each one gets answers
TIME with the one instant read here, so that every check, in both passes
below, is decided at the same moment; every other command goes to Redis.

KEYS     every check's keys, in check order: each check's own KEYS, as its
         script takes them (the counter, then the block key when the rule
         has a lock-out). All share one Cluster slot.

ARGV[1]  n          checks in the group (>= 1)
ARGV[2]  want_undo  1: also report what was counted (see the return shape),
                    for a caller that may have to take it back; 0: don't
then, for each check in order:
         algorithm  'sliding_log' or 'sliding_counter'
         nkeys      how many of KEYS are this check's
         nargs      how many ARGV follow for this check
         args...    the check's own ARGV, as its script takes them (ARGV[4]
                    of those is dry_run)

Returns {counted, results, undo}:
  counted  1 if the group was allowed (and counted), else 0
  results  one reply per check, in order, each the check's script's own
           reply ({allowed, remaining, retry_after_us, reset_after_us,
           blocked}, and whatever that script returns)
  undo     when want_undo = 1 and the group was counted, one entry per
           check that was counted (not a dry run):
             {i, 'sliding_log', member, score}: the log member it added
             {i, 'sliding_counter', w, cost}: the window it counted in
           else empty.

Semantics:
- First pass: every check as a dry run. If any is denied, nothing is
  counted and no block is started: the results are the dry runs'.
  (sliding_log's dry run drops calls that have left the window, as it
  always does; that changes no decision.)
- Otherwise, second pass: every check as sent, counting it unless its own
  dry run. The checks are on distinct counters (the caller's promise) and
  decided at the same instant, so each sees what its dry run saw and is
  allowed again. The results are the second pass's.

Worked example: checks A (sliding_log, limit 2, 1 hit counted) and B
(sliding_counter, limit 10, empty), cost 1 each: both dry runs allowed, so
both are counted: {1, {{1, 0, 0, W, 0}, {1, 9, 0, 2W - e, 0}}, {}}. Again:
A's dry run is denied ({0, 0, r, R, 0}), B's allowed ({1, 8, ...}), so
{0, {{0, 0, r, R, 0}, {1, 8, 0, ...}}, {}} and B still holds 1 hit.

Bounded work: at most two runs of each check's script (whose own headers
bound their work) plus, with want_undo, one ZRANGE or HGET per counted
check; the limiter sends at most 16 checks.
]]

local n = tonumber(ARGV[1])
assert(n and n >= 1, 'check_limits.lua: ARGV[1] (n) must be a positive integer')
local want_undo = ARGV[2] == '1'

-- Which ARGV of a decision script is dry_run (see their headers).
local DRY_RUN = 4
local ALGORITHMS = { sliding_log = sliding_log, sliding_counter = sliding_counter }

local frozen = redis.call('TIME')
local at_once = setmetatable({
  call = function(command, ...)
    if command == 'TIME' then
      return frozen
    end
    return redis.call(command, ...)
  end,
}, { __index = redis })

local checks = {}
local next_key, next_arg = 1, 3
for i = 1, n do
  local algorithm = ARGV[next_arg]
  local nkeys = tonumber(ARGV[next_arg + 1])
  local nargs = tonumber(ARGV[next_arg + 2])
  assert(ALGORITHMS[algorithm], 'check_limits.lua: check ' .. i .. ': unknown algorithm ' .. tostring(algorithm))
  assert(nkeys and nargs, 'check_limits.lua: check ' .. i .. ': nkeys and nargs must be integers')
  local keys, args = {}, {}
  for j = 1, nkeys do
    keys[j] = KEYS[next_key + j - 1]
  end
  for j = 1, nargs do
    args[j] = ARGV[next_arg + 2 + j]
  end
  next_key = next_key + nkeys
  next_arg = next_arg + 3 + nargs
  checks[i] = { algorithm = algorithm, keys = keys, args = args }
end
assert(next_key - 1 == #KEYS, 'check_limits.lua: the checks take ' .. (next_key - 1) .. ' KEYS, got ' .. #KEYS)
assert(next_arg - 1 == #ARGV, 'check_limits.lua: the checks take ' .. (next_arg - 1) .. ' ARGV, got ' .. #ARGV)

local results = {}
local allowed = true
for i = 1, n do
  local check = checks[i]
  local dry = {}
  for j = 1, #check.args do
    dry[j] = check.args[j]
  end
  dry[DRY_RUN] = '1'
  results[i] = ALGORITHMS[check.algorithm](check.keys, dry, at_once)
  allowed = allowed and results[i][1] == 1
end
if not allowed then
  return { 0, results, {} }
end

local undo = {}
for i = 1, n do
  local check = checks[i]
  results[i] = ALGORITHMS[check.algorithm](check.keys, check.args, at_once)
  if want_undo and check.args[DRY_RUN] ~= '1' then
    if check.algorithm == 'sliding_log' then
      -- Nothing runs between the script's ZADD and here: its member is
      -- the newest.
      local newest = redis.call('ZRANGE', check.keys[1], -1, -1, 'WITHSCORES')
      undo[#undo + 1] = { i, check.algorithm, newest[1], newest[2] }
    else
      local w = redis.call('HGET', check.keys[1], 'w')
      undo[#undo + 1] = { i, check.algorithm, w, check.args[3] }
    end
  end
end
return { 1, results, undo }
