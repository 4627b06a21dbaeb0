--[[
limit_inspect.lua: one subject's rate-limit counter as it stands, read
without writing anything (an operator's look, through the admin door).

KEYS[1]  the counter of the rule's algorithm: the sliding log (a sorted set,
         see sliding_log.lua) or the sliding counter (a hash, see
         sliding_counter.lua).
KEYS[2]  the block key. Passed only when the rule has a lock-out, since
         only then do the checking scripts read it. Both keys share one hash
         tag (one Cluster slot).

ARGV[1]  algorithm  "sliding_log" or "sliding_counter": how KEYS[1] is laid out
ARGV[2]  window_us  the rule's window, in microseconds (>= 1000)

Returns {used, reset_after_us, blocked, block_remaining_us}, all integers;
blocked is 0 or 1.

Semantics (the memory store implements the same; keep them in step, and
with sliding_log.lua and sliding_counter.lua):
- now = Redis's TIME in microseconds.
- sliding_log: used = the hits of the calls with time > now - window (the
  newest score minus the "total before" of the oldest such call), read
  without trimming the calls that left; reset_after = newest + window - now,
  or 0.
- sliding_counter: used = ceil(estimate), the estimate of sliding_counter.lua
  computed in the same float expression, so that limit - used is the
  remaining a check would report before spending anything; reset_after as
  that script's.
- blocked = 1 and block_remaining_us = the block's PTTL when KEYS[2] is
  given and exists; else 0 and 0.

Worked example: a log {"0:0" -> 2, "1500000:2" -> 4} (times relative),
window 2 s, inspected at t = 2.2 s: the first call has left, so used =
4 - 2 = 2 and reset_after = 1.5 + 2 - 2.2 s: {2, 1300000, 0, 0}.

Bounded work: O(log^2 n) for a log of n calls (a binary search by rank over
calls in time order, each probe an O(log n) ZRANGE); O(1) for a counter.
]]

assert(#ARGV == 2, 'limit_inspect.lua: expected 2 ARGV (algorithm, window_us), got ' .. #ARGV)
assert(#KEYS == 1 or #KEYS == 2, 'limit_inspect.lua: expected 1 or 2 KEYS (counter[, block]), got ' .. #KEYS)
local counter_key, block_key = KEYS[1], KEYS[2]
local algorithm = ARGV[1]
local window = tonumber(ARGV[2])
assert(window and window > 0 and window == math.floor(window), 'limit_inspect.lua: window_us must be a positive integer')

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

local used, reset_after = 0, 0
if algorithm == 'sliding_log' then
  local function parse(member)
    local at, before = string.match(member, '^(%d+):(%d+)$')
    assert(at, 'limit_inspect.lua: unexpected member ' .. tostring(member) .. ' in ' .. counter_key)
    return tonumber(at), tonumber(before)
  end
  local n = redis.call('ZCARD', counter_key)
  if n > 0 then
    -- Calls are in time order by rank: find the first still in the window.
    local cutoff = now - window
    local lo, hi = 0, n
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      local at = parse(redis.call('ZRANGE', counter_key, mid, mid)[1])
      if at > cutoff then
        hi = mid
      else
        lo = mid + 1
      end
    end
    local last = redis.call('ZRANGE', counter_key, -1, -1, 'WITHSCORES')
    local newest_at = parse(last[1])
    if lo < n then
      local _, before = parse(redis.call('ZRANGE', counter_key, lo, lo)[1])
      used = tonumber(last[2]) - before
    end
    reset_after = math.max(newest_at + window - now, 0)
  end
elseif algorithm == 'sliding_counter' then
  local w = math.floor(now / window)
  local elapsed = now - w * window
  local stored = redis.call('HMGET', counter_key, 'w', 'c', 'p')
  local stored_w = tonumber(stored[1])
  local cur, prev = 0, 0
  if stored_w == w then
    cur, prev = tonumber(stored[2]) or 0, tonumber(stored[3]) or 0
  elseif stored_w == w - 1 then
    cur, prev = 0, tonumber(stored[2]) or 0
  end
  used = math.ceil(prev * (window - elapsed) / window + cur)
  if cur > 0 then
    reset_after = 2 * window - elapsed
  elseif prev > 0 then
    reset_after = window - elapsed
  end
else
  error('limit_inspect.lua: unknown algorithm ' .. tostring(algorithm))
end

local blocked, block_remaining = 0, 0
if block_key ~= nil and redis.call('EXISTS', block_key) == 1 then
  blocked = 1
  block_remaining = math.max(redis.call('PTTL', block_key), 0) * 1000
end
return {used, reset_after, blocked, block_remaining}
