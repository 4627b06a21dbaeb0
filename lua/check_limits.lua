--[[
check_limits.lua: several rate limits decided together, all or nothing.

This file is not a script by itself: src/store/redis.rs puts the decision
scripts, as local functions of (KEYS, ARGV, redis), and lua/at_once.lua
before it (see that file). So each algorithm has one source, and a check
in a group is decided by exactly the code that decides it alone. Every
check, in every pass below, is run with at_once, so every check is decided
at the same moment.
]]

local n = tonumber(ARGV[1])
assert(n and n >= 1, 'check_limits.lua: ARGV[1] (n) must be a positive integer')
local want_undo = ARGV[2] == '1'

local ALGORITHMS = { sliding_log = sliding_log, sliding_counter = sliding_counter }

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
