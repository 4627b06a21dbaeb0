--[[
settle_counter.lua: pay after use on a sliding counter: the call counted
with a request id (by lua/sliding_counter.lua, whose header describes the
counter) now counts `actual` hits, in the fixed window it was counted in.

KEYS[1]  the counter: a hash {w, c, p} (see lua/sliding_counter.lua)
KEYS[2]  the request's record, as sliding_counter.lua wrote it:
         "<allowed> <remaining> <retry_after_us> <reset_after_us> <blocked>
         <limit> <cost> <window index>" (index -1 for a denial). Both keys
         share one hash tag.

ARGV[1]  window_us  the rule's window, in microseconds (>= 1000)
ARGV[2]  actual     what the call counts from now on (>= 0)

Returns {found, remaining}: found is 0 or 1; remaining = max(floor(limit -
estimate), 0) now, after the settle, under the limit the call was counted
with (0 when not found).

Semantics (the memory store implements the same; keep them in step):
- Not found, and nothing written, when the record is gone (unknown or
  expired id), records a denial, or the hash no longer holds the call's
  window (stored index neither the record's nor the next one).
- d = actual - the record's cost (the figure last settled, or reserved),
  added to the field that holds the call's window: c when the stored index
  is the record's, p when it is the next one (the hash is read as stored,
  never rolled forward: only sliding_counter.lua rolls it). The field never
  goes below 0. The record's cost becomes `actual` (KEEPTTL), so settling
  twice applies the last figure.
- The estimate for `remaining` is read at now, as sliding_counter.lua reads
  it (p weighted by the share of the previous window still covered).

Worked example: limit 10, window 60 s, a call of cost 8 counted in window
w: {w, c = 8, p = 0}, record "... 10 8 w". Settled to 3 in the same window:
c = 3, {1, 7}. Settled to 12 half-way through window w + 1 (no call since,
so the hash still says w): c = 12, estimate 12 * 0.5 = 6, {1, 4}.

Bounded work: O(1): one GET, one HMGET, one HSET, one SET.
]]

assert(#KEYS == 2, 'settle_counter.lua: expected 2 KEYS (counter, record), got ' .. #KEYS)
assert(#ARGV == 2, 'settle_counter.lua: expected 2 ARGV (window_us, actual), got ' .. #ARGV)
local counter_key, record_key = KEYS[1], KEYS[2]
local window = tonumber(ARGV[1])
local actual = tonumber(ARGV[2])
assert(window and window > 0 and window == math.floor(window), 'settle_counter.lua: window_us must be a positive integer')
assert(actual and actual >= 0 and actual == math.floor(actual), 'settle_counter.lua: actual must be a non-negative integer')

local function int(x)
  return string.format('%d', x)
end

local seen = redis.call('GET', record_key)
if not seen then
  return {0, 0}
end
local head, limit, settled, rec_w = string.match(seen, '^(%d+ %d+ %d+ %d+ %d+) (%d+) (%d+) (%-?%d+)$')
assert(head, 'settle_counter.lua: unexpected record in ' .. record_key)
limit, settled, rec_w = tonumber(limit), tonumber(settled), tonumber(rec_w)
if rec_w < 0 then
  return {0, 0}
end

local stored = redis.call('HMGET', counter_key, 'w', 'c', 'p')
local stored_w = tonumber(stored[1])
local c, p = tonumber(stored[2]) or 0, tonumber(stored[3]) or 0
local field
if stored_w == rec_w then
  field = 'c'
elseif stored_w == rec_w + 1 then
  field = 'p'
else
  return {0, 0}
end

local d = actual - settled
if d ~= 0 then
  if field == 'c' then
    c = math.max(c + d, 0)
    redis.call('HSET', counter_key, 'c', int(c))
  else
    p = math.max(p + d, 0)
    redis.call('HSET', counter_key, 'p', int(p))
  end
  redis.call('SET', record_key, head .. ' ' .. int(limit) .. ' ' .. int(actual) .. ' ' .. int(rec_w), 'KEEPTTL')
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local w = math.floor(now / window)
local elapsed = now - w * window
local cur, prev = 0, 0
if stored_w == w then
  cur, prev = c, p
elseif stored_w == w - 1 then
  cur, prev = 0, c
end
local estimate = prev * (window - elapsed) / window + cur
return {1, math.max(math.floor(limit - estimate), 0)}
