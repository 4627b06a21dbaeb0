--[[
check_limits.lua: several rate limits decided together, all or nothing.

This file is not a script by itself: src/store/redis/group.rs builds the
script by putting, before this text, the two decision scripts each wrapped
as a local function of (KEYS, ARGV, redis):
  local function sliding_log(KEYS, ARGV, redis) <lua/sliding_log.lua> end
  local function sliding_counter(KEYS, ARGV, redis) <lua/sliding_counter.lua> end
So each algorithm has one source, and a check in a group is decided by
exactly the code that decides it alone. The `redis` each one gets answers
TIME with the one instant read here, so that every check, in every pass
below, is decided at the same moment; every other command goes to Redis.

KEYS     every check's keys, in check order: each check's own KEYS, as its
         script takes them (the counter, then the block key when the rule
         has a lock-out); then, with record_ms > 0, the record of the
         group's request_id. All share one Cluster slot.

ARGV[1]  n          checks in the group (>= 1)
ARGV[2]  want_undo  1: also report what was counted (see the return shape),
                    for a caller that may have to take it back; 0: don't
ARGV[3]  record_ms  > 0: the group has a request_id, whose record is the
                    last KEY; its answer is kept this long. 0: none
then, for each check in order:
         algorithm  'sliding_log' or 'sliding_counter'
         nkeys      how many of KEYS are this check's
         nargs      how many ARGV follow for this check
         args...    the check's own ARGV, as its script takes them (ARGV[4]
                    of those is dry_run)

Returns {counted, results, undo, recorded}:
  counted  1 if the group was allowed (and counted), else 0
  results  one reply per check, in order, each the check's script's own
           reply ({allowed, remaining, retry_after_us, reset_after_us,
           blocked}, and whatever that script returns)
  undo     when want_undo = 1 and the group was counted, one entry per
           check that was counted (not a dry run):
             {i, 'sliding_log', member, score}: the log member it added
             {i, 'sliding_counter', w, cost}: the window it counted in
           else empty.
  recorded '' when the group was decided now; else the answer recorded for
           its request_id (see below), and nothing was decided or counted

Semantics (every check decided at the same instant):
- With a record key that exists: its value is returned as `recorded`
  (counted = 0, no results) and nothing else happens. Otherwise, once the
  group is decided, its answer is stored there with PX record_ms, as
  "<counted>" then, per check, "|<allowed>,<remaining>,<retry_after_us>,
  <reset_after_us>,<blocked>" (src/store/redis/group.rs reads it; it also
  writes it for a group over several slots).
- First the checks that would start a lock-out on a denial (block_us > 0,
  not a dry run) are run as dry runs: if one is denied, the group is
  denied.
- Then every check is run as sent, in order, counting it unless its own
  dry run. A check without a lock-out writes nothing when denied (see its
  script), and a check with one was just allowed by its dry run, at the
  same instant, on a counter no other check of the group touches (the
  caller's promise), so it is allowed again: no block is ever started.
- If a check is denied there, the checks counted before it are taken back
  at once (nothing ran in between: a log's call is its newest member, so
  ZPOPMAX; a counter's cost comes off c, in the same window) and the group
  is denied.
- A denied group's results are every check run again as a dry run, so
  each is exactly the answer the check would get alone, as a dry run.
- An allowed group's results are the counting runs'. So an allowed group
  of n checks costs n script runs, as n CheckLimits would, and no more.

Worked example: checks A (sliding_log, limit 2, 1 hit counted) and B
(sliding_counter, limit 10, empty), cost 1 each, no lock-outs: A is
counted, then B: {1, {{1, 0, 0, W, 0}, {1, 9, 0, 2W - e, 0}}, {}}. Again:
A is denied ({0, 0, r, R, 0}): nothing was counted before it; both are run
as dry runs: {0, {{0, 0, r, R, 0}, {1, 8, 0, ...}}, {}} and B still holds
1 hit. In the order (B, A), B would be counted, then A denied, then B's
hit taken back, with the same reply.

Bounded work: at most three runs of each check's script (whose own headers
bound their work) plus one ZPOPMAX or HINCRBY per check taken back and,
with want_undo, one ZRANGE or HGET per counted check; the limiter sends at
most 16 checks.
]]

local n = tonumber(ARGV[1])
assert(n and n >= 1, 'check_limits.lua: ARGV[1] (n) must be a positive integer')
local want_undo = ARGV[2] == '1'

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

local record_ms = tonumber(ARGV[3])
assert(record_ms and record_ms >= 0, 'check_limits.lua: ARGV[3] (record_ms) must be a non-negative integer')
local record_key = nil
if record_ms > 0 then
  record_key = KEYS[#KEYS]
  local recorded = redis.call('GET', record_key)
  if recorded then
    return { 0, {}, {}, recorded }
  end
end

local checks = {}
local next_key, next_arg = 1, 4
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
local want_keys = next_key - 1 + (record_key and 1 or 0)
assert(want_keys == #KEYS, 'check_limits.lua: the checks take ' .. want_keys .. ' KEYS, got ' .. #KEYS)
assert(next_arg - 1 == #ARGV, 'check_limits.lua: the checks take ' .. (next_arg - 1) .. ' ARGV, got ' .. #ARGV)

-- Where the decision scripts take cost, dry_run and block_us (see their
-- headers).
local COST, DRY_RUN, BLOCK_US = 3, 4, 5

local function run(check, args)
  return ALGORITHMS[check.algorithm](check.keys, args, at_once)
end

local function as_dry_run(check)
  local dry = {}
  for j = 1, #check.args do
    dry[j] = check.args[j]
  end
  dry[DRY_RUN] = '1'
  return dry
end

local function int(x)
  return string.format('%d', x)
end

-- The group's answer, recorded under its request_id if it has one.
local function answer(counted, results, undo)
  if record_key then
    local parts = { int(counted) }
    for i = 1, n do
      local r = results[i]
      parts[#parts + 1] = int(r[1]) .. ',' .. int(r[2]) .. ',' .. int(r[3]) .. ',' .. int(r[4]) .. ',' .. int(r[5])
    end
    redis.call('SET', record_key, table.concat(parts, '|'), 'PX', int(record_ms))
  end
  return { counted, results, undo, '' }
end

-- The denied group's answer: every check's own, as a dry run.
local function denied()
  local results = {}
  for i = 1, n do
    results[i] = run(checks[i], as_dry_run(checks[i]))
  end
  return answer(0, results, {})
end

local function counts(check)
  return check.args[DRY_RUN] ~= '1'
end

for i = 1, n do
  local check = checks[i]
  if counts(check) and tonumber(check.args[BLOCK_US]) > 0 and run(check, as_dry_run(check))[1] ~= 1 then
    return denied()
  end
end

local results, counted, undo = {}, {}, {}
for i = 1, n do
  local check = checks[i]
  results[i] = run(check, check.args)
  if results[i][1] ~= 1 then
    for _, j in ipairs(counted) do
      local key = checks[j].keys[1]
      if checks[j].algorithm == 'sliding_log' then
        redis.call('ZPOPMAX', key)
      else
        redis.call('HINCRBY', key, 'c', -tonumber(checks[j].args[COST]))
      end
    end
    return denied()
  end
  if counts(check) then
    counted[#counted + 1] = i
    if want_undo then
      if check.algorithm == 'sliding_log' then
        -- Nothing runs between the script's ZADD and here: its member is
        -- the newest.
        local newest = redis.call('ZRANGE', check.keys[1], -1, -1, 'WITHSCORES')
        undo[#undo + 1] = { i, check.algorithm, newest[1], newest[2] }
      else
        local w = redis.call('HGET', check.keys[1], 'w')
        undo[#undo + 1] = { i, check.algorithm, w, check.args[COST] }
      end
    end
  end
end
return answer(1, results, undo)
