--[[
settle_log.lua: pay after use on an exact sliding log: the call counted
with a request id (by lua/sliding_log.lua, whose header describes the log)
now counts `actual` hits.

KEYS[1]  the log (a sorted set; see lua/sliding_log.lua)
KEYS[2]  the request's record, as sliding_log.lua wrote it:
         "<allowed> <remaining> <retry_after_us> <reset_after_us> <blocked>
         <limit> <cost> <member>". Both keys share one hash tag.

ARGV[1]  window_us     the rule's window, in microseconds (>= 1000)
ARGV[2]  actual        what the call counts from now on (>= 0)
ARGV[3]  max_rewrites  K: the most scores a settle shifts besides the
                       call's own (tollgate sends 64)

Returns {found, remaining}: found is 0 or 1; remaining = max(limit - hits
in the window, 0) after the settle, under the limit the call was counted
with (0 when not found).

Semantics (the memory store implements the same; keep them in step):
- Not found, and nothing written, when the record is gone (unknown or
  expired id), records a denial (nothing was counted), or its member has
  left the window (it is trimmed first, as sliding_log.lua trims).
- d = actual - the record's cost (the figure last settled, or reserved).
  The call's own hits never go below 0: d >= -(its cost in the log).
- Changing one call's cost changes the running total of every member on
  one side of it. Both sides work: shifting every later member (the call
  included) by +d, or every earlier member (the base included) by -d,
  gives the same differences, so the same counts, and keeps the scores in
  time order. The side with fewer members is shifted, if it holds at most
  K. So a settle is exact whenever the call has at most K members before
  it or at most K after it: a reservation settled soon after it was made
  has few calls after it, a call early in the window few before it.
- Beyond the bound (more than K members on each side, i.e. over 2K + 1
  calls in the window, the call deep inside them), the settle is applied
  so that the limit is never exceeded, at the price of holding hits longer:
    d > 0: the extra hits are added to the newest call, so they leave the
           window with it, later than exact;
    d < 0: nothing is refunded (the reservation counts until it leaves);
           the record keeps its old figure, so a later settle of the same
           id starts from what is really counted.
  Otherwise the record's cost becomes `actual` (KEEPTTL): settling twice
  applies the last figure.
- Nothing else changes: a settle never moves a call in time, nor touches
  the log's TTL, a block, or the first answer a replay reports.

Worked example: limit 10, window 60 s. Calls A (cost 8, request id "a")
and B (cost 1) are counted: {"0:0" -> 0, A -> 8, B -> 9}; remaining 1.
Settling "a" to 3: A has one member after it (B) and one before it (the
base); on a tie the later side is shifted, so A and B become 3 and 4:
{"0:0" -> 0, A -> 3, B -> 4}, {1, 6}. Settling "a" to 3 again: {1, 6}.
Settling "a" to 12: d = 9, {"0:0" -> 0, A -> 12, B -> 13}, {1, 0}, and
calls are denied until A leaves (B's hit leaves later).

Bounded work: one GET, the trim of sliding_log.lua (each call trimmed
once), O(log n) lookups, and at most K + 1 ZADDs of O(log n) each: O(K log n)
whatever the log holds.
]]

assert(#KEYS == 2, 'settle_log.lua: expected 2 KEYS (log, record), got ' .. #KEYS)
assert(#ARGV == 3, 'settle_log.lua: expected 3 ARGV (window_us, actual, max_rewrites), got ' .. #ARGV)
local log_key, record_key = KEYS[1], KEYS[2]

local function int_arg(i, name)
  local value = tonumber(ARGV[i])
  assert(value and value >= 0 and value == math.floor(value), 'settle_log.lua: ' .. name .. ' must be a non-negative integer')
  return value
end
local window = int_arg(1, 'window_us')
local actual = int_arg(2, 'actual')
local max_rewrites = int_arg(3, 'max_rewrites')

local function int(x)
  return string.format('%d', x)
end

local seen = redis.call('GET', record_key)
if not seen then
  return {0, 0}
end
local head, limit, settled, member = string.match(seen, '^(%d+ %d+ %d+ %d+ %d+) (%d+) (%d+) (%S+)$')
assert(head, 'settle_log.lua: unexpected record in ' .. record_key)
limit, settled = tonumber(limit), tonumber(settled)
if member == '-' then
  -- A denial: nothing was counted.
  return {0, 0}
end

local function time_of(m)
  local at = string.match(m, '^(%d+):')
  assert(at, 'settle_log.lua: unexpected member ' .. tostring(m) .. ' in ' .. log_key)
  return tonumber(at)
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

-- The same trim as sliding_log.lua's: rank 0 is the base.
local BATCH = 16
local cutoff = now - window
while true do
  local oldest = redis.call('ZRANGE', log_key, 1, BATCH)
  local gone = 0
  for i = 1, #oldest do
    if time_of(oldest[i]) > cutoff then
      break
    end
    gone = i
  end
  if gone > 0 then
    redis.call('ZREMRANGEBYRANK', log_key, 0, gone - 1)
  end
  if gone < BATCH then
    break
  end
end

local rank = redis.call('ZRANK', log_key, member)
if not rank or rank == 0 then
  -- Trimmed, or the base: the call has left the window.
  return {0, 0}
end

local d = actual - settled
if d ~= 0 then
  local score = tonumber(redis.call('ZSCORE', log_key, member))
  local before = redis.call('ZRANGE', log_key, rank - 1, rank - 1, 'WITHSCORES')
  local own = score - tonumber(before[2])
  if own + d < 0 then
    d = -own
  end
  local card = redis.call('ZCARD', log_key)
  local after = card - rank - 1
  local applied = true
  local function shift(from, to, by)
    local members = redis.call('ZRANGE', log_key, from, to, 'WITHSCORES')
    for i = 1, #members, 2 do
      redis.call('ZADD', log_key, int(tonumber(members[i + 1]) + by), members[i])
    end
  end
  if after <= max_rewrites and after <= rank then
    shift(rank, -1, d)
  elseif rank <= max_rewrites then
    shift(0, rank - 1, -d)
  elseif d > 0 then
    local last = redis.call('ZRANGE', log_key, -1, -1)
    redis.call('ZINCRBY', log_key, int(d), last[1])
  else
    applied = false
  end
  if applied then
    redis.call('SET', record_key, head .. ' ' .. int(limit) .. ' ' .. int(actual) .. ' ' .. member, 'KEEPTTL')
  end
end

local first = redis.call('ZRANGE', log_key, 0, 0, 'WITHSCORES')
local last = redis.call('ZRANGE', log_key, -1, -1, 'WITHSCORES')
local count = tonumber(last[2]) - tonumber(first[2])
return {1, math.max(limit - count, 0)}
