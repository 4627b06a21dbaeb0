--[[
sliding_log.lua: an exact sliding-window rate limit, with optional lock-out.

KEYS[1]  the log: a sorted set with one member per counted hit, scored by the
         hit's time in microseconds (Redis's clock).
KEYS[2]  the block key: present while the subject is locked out. Passed
         only when ARGV[5] block_us > 0 (and then required): a rule without
         a lock-out sends one key. Both keys share one hash tag, so the
         script runs on one Cluster slot.

ARGV[1]  limit      hits allowed per window (>= 0)
ARGV[2]  window_us  the window, in microseconds (>= 1000)
ARGV[3]  cost       hits this call spends (>= 1)
ARGV[4]  dry_run    1: decide without writing anything; 0: count if allowed
ARGV[5]  block_us   lock the subject out this long after a denial; 0: never

Returns {allowed, remaining, retry_after_us, reset_after_us, blocked}, all
integers; allowed and blocked are 0 or 1.

Semantics (the memory store implements the same; keep them in step):
- The clock is Redis's own TIME, so every tollgate instance agrees.
- If block_us > 0 and the block key exists: denied, blocked, remaining 0,
  retry_after = the block's PTTL, reset_after = time until the log is empty
  (newest + window - now, or 0). Nothing is written.
- Otherwise entries with score <= now - window are trimmed and
  count = ZCARD.
- count + cost <= limit: allowed. Unless a dry run, `cost` members scored now
  are added and the log expires one window after its newest entry.
  remaining = limit - count - cost, retry_after = 0, reset_after = window if
  counted, else time until the log is empty.
- Otherwise denied and nothing is counted. remaining = max(limit - count, 0);
  reset_after = newest + window - now; retry_after = when the need-th oldest
  entry (need = count + cost - limit) leaves the window, that is its
  score + window - now, or reset_after when cost > limit (it never fits).
  If block_us > 0 and not a dry run, the denial starts a block of block_us
  (PX rounded up to whole ms): blocked = 1 and retry_after = block_us.

Worked example: limit 4, window 2 s, block 0. Hits at t = 0 s (cost 2) and
t = 1.5 s (cost 2) fill the log. At t = 1.5 s a fifth hit is denied:
{0, 0, 500000, 2000000, 0}, since the entries from t = 0 leave at t = 2 s
and the newest at t = 3.5 s. At t = 2.2 s the first two have left: two more
hits are allowed ({1, 1, 0, 2000000, 0} then {1, 0, 0, 2000000, 0}) and a
third is denied ({0, 0, 1300000, 2000000, 0}: the t = 1.5 s entries leave at
3.5 s).

Members are "<now_us>:<index>", where index runs from count + 1 to
count + cost. At one `now` the trimmed log can only grow, so members never
repeat and ZADD never overwrites an entry.
]]

assert(#ARGV == 5, 'sliding_log.lua: expected 5 ARGV (limit, window_us, cost, dry_run, block_us), got ' .. #ARGV)

local function int_arg(i, name)
  local value = tonumber(ARGV[i])
  assert(value and value >= 0 and value == math.floor(value), 'sliding_log.lua: ' .. name .. ' must be a non-negative integer')
  return value
end
local limit = int_arg(1, 'limit')
local window = int_arg(2, 'window_us')
local cost = int_arg(3, 'cost')
local dry_run = ARGV[4] == '1'
local block_us = int_arg(5, 'block_us')

-- The block key comes only with a lock-out. On a slot that is migrating, a
-- script whose keys are only partly on the source node gets TRYAGAIN, and
-- the block key rarely exists: with it, every hit on an existing log would
-- wait out the migration.
local want_keys = block_us > 0 and 2 or 1
assert(#KEYS == want_keys, 'sliding_log.lua: expected ' .. want_keys .. ' KEYS (log' .. (block_us > 0 and ', block' or '') .. ') for block_us ' .. block_us .. ', got ' .. #KEYS)
local log_key, block_key = KEYS[1], KEYS[2]

-- Lua numbers are doubles and print as 1.7e+15 past 14 digits; every number
-- sent to Redis goes through int() so it is an exact integer string.
local function int(x)
  return string.format('%d', x)
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

-- Time until the newest entry leaves the window, i.e. the log is empty.
local function until_empty()
  local newest = redis.call('ZRANGE', log_key, -1, -1, 'WITHSCORES')
  if newest[2] == nil then
    return 0
  end
  return math.max(tonumber(newest[2]) + window - now, 0)
end

if block_us > 0 and redis.call('EXISTS', block_key) == 1 then
  local block_ms = math.max(redis.call('PTTL', block_key), 0)
  return {0, 0, block_ms * 1000, until_empty(), 1}
end

redis.call('ZREMRANGEBYSCORE', log_key, '-inf', int(now - window))
local count = redis.call('ZCARD', log_key)

if count + cost <= limit then
  if dry_run then
    return {1, limit - count - cost, 0, until_empty(), 0}
  end
  -- ZADD in batches: Lua's unpack is limited to a few thousand values.
  local batch = {}
  for i = 1, cost do
    batch[#batch + 1] = int(now)
    batch[#batch + 1] = int(now) .. ':' .. int(count + i)
    if #batch >= 1000 or i == cost then
      redis.call('ZADD', log_key, unpack(batch))
      batch = {}
    end
  end
  redis.call('PEXPIRE', log_key, int(math.ceil(window / 1000)))
  return {1, limit - count - cost, 0, window, 0}
end

local reset_after = until_empty()
local retry_after = reset_after
if cost <= limit then
  local need = count + cost - limit
  local entry = redis.call('ZRANGE', log_key, need - 1, need - 1, 'WITHSCORES')
  retry_after = math.max(tonumber(entry[2]) + window - now, 0)
end

local blocked = 0
if block_us > 0 and not dry_run then
  redis.call('SET', block_key, '1', 'PX', int(math.ceil(block_us / 1000)))
  blocked = 1
  retry_after = block_us
end
return {0, math.max(limit - count, 0), retry_after, reset_after, blocked}
