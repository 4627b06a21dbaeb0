--[[
sliding_counter.lua: an approximate sliding-window rate limit in constant
memory, with optional lock-out and optional request-id records.

KEYS[1]  the counter: a hash with three short fields, kept small so that it
         stays listpack-encoded (under 200 bytes per subject):
           w  index of the current fixed window, floor(now_us / window_us)
           c  hits counted in window w
           p  hits counted in window w - 1
KEYS[2]  the block key: present while the subject is locked out. Passed
         only when ARGV[5] block_us > 0 (and then required): a rule without
         a lock-out sends one key.
KEYS[#KEYS]  the request record, when ARGV[6] = 1: "<allowed> <remaining>
         <retry_after_us> <reset_after_us> <blocked> <limit> <cost> <w>",
         w the window index the call was counted in (-1 for a denial),
         expiring one window (PX rounded up to whole ms) after the decision.
         lua/settle_counter.lua reads it. Every key shares one hash tag, so
         the script runs on one Cluster slot.

ARGV[1]  limit      hits allowed per window (>= 0)
ARGV[2]  window_us  the window, in microseconds (>= 1000)
ARGV[3]  cost       hits this call spends (>= 1)
ARGV[4]  dry_run    1: decide without writing anything; 0: count if allowed
ARGV[5]  block_us   lock the subject out this long after a denial; 0: never
ARGV[6]  record     optional; 1: the last key is the request's record (never
                    with a dry run)

Returns {allowed, remaining, retry_after_us, reset_after_us, blocked}, all
integers; allowed and blocked are 0 or 1; with ARGV[6] = 1 a sixth,
replayed (0 or 1).

Semantics (the memory store implements the same, in f64 and in this order
of operations so that both round alike; keep them in step):
- With a record key: if the record exists, its answer is returned as it
  was first given, with replayed = 1, and nothing else is read or written;
  otherwise the answer below is also written to the record.
- now = Redis's TIME in microseconds; w = floor(now / window);
  elapsed = now - w * window.
- Stored index w: keep c and p; w - 1: p = c, c = 0; anything else (or no
  hash): p = c = 0.
- estimate = p * (window - elapsed) / window + c, the previous window
  weighted by the share of it the sliding window still covers.
- If block_us > 0 and the block key exists: denied, blocked, remaining 0,
  retry_after = the block's PTTL, reset_after as below. Nothing is written.
- estimate + cost <= limit: allowed; unless a dry run, c += cost and the
  hash is stored. It expires when window w + 1 ends, after which its hits
  count nothing (PEXPIRE rounded up to whole ms): set by the first call
  counted in window w only, since a PEXPIRE on every call was a tenth of
  Redis's work per decision.
  remaining = max(floor(limit - estimate - cost), 0); retry_after = 0.
- Otherwise denied and nothing is counted; remaining =
  max(floor(limit - estimate), 0); retry_after = the earliest wait after
  which the estimate (decaying, with no new hits) leaves room for cost:
    c + cost <= limit: within this window,
      ceil(window - (limit - cost - c) * window / p - elapsed);
    cost <= limit < c + cost: in the next window, where c becomes p,
      ceil(2 * window - elapsed - (limit - cost) * window / c);
    cost > limit: it never fits; retry_after = reset_after.
  If block_us > 0 and not a dry run, the denial starts a block of block_us
  (PX rounded up to whole ms): blocked = 1 and retry_after = block_us.
- reset_after = time until the estimate is 0: 2 * window - elapsed if c > 0
  (after counting), window - elapsed if only p > 0, else 0.

Worked example: limit 10, window 60 s, stored {w, c = 2, p = 6} and 15 s into
window w. estimate = 6 * 45 / 60 + 2 = 6.5. A hit of cost 1 is allowed:
{1, 2, 0, 105000000, 0} and c becomes 3. A hit of cost 4 is then denied:
estimate 7.5 + 4 > 10, remaining floor(2.5) = 2, and at 30 s into the window
6 * 30 / 60 + 3 + 4 = 10 fits, so {0, 2, 15000000, 105000000, 0}.

Bounded work: O(1) whatever the cost or the traffic: three hash fields and
the block key (and the record), never more.
]]

-- Lean by design, as lua/sliding_log.lua (see there): no closure made per
-- call, strings handed to redis.call, one string.format per value sent,
-- strings made numbers by s + 0 (one strtod; tonumber() runs two).
if not (#ARGV == 5 or #ARGV == 6) then error('sliding_counter.lua: expected 5 or 6 ARGV (limit, window_us, cost, dry_run, block_us[, record]), got ' .. #ARGV, 0) end

-- Numbers by s + 0, not tonumber() (see above): an argument that is not a
-- number fails here, Lua's error naming its local.
local limit, window, cost, block_us = ARGV[1], ARGV[2], ARGV[3], ARGV[5]
limit, window, cost, block_us = limit + 0, window + 0, cost + 0, block_us + 0
local dry_run = ARGV[4] == '1'
local recorded = ARGV[6] == '1'
if not (limit >= 0 and limit % 1 == 0 and window >= 0 and window % 1 == 0
    and cost >= 0 and cost % 1 == 0 and block_us >= 0 and block_us % 1 == 0) then
  for _, arg in ipairs({ { limit, 'limit' }, { window, 'window_us' }, { cost, 'cost' }, { block_us, 'block_us' } }) do
    local value = arg[1]
    if not (value >= 0 and value % 1 == 0) then error('sliding_counter.lua: ' .. arg[2] .. ' must be a non-negative integer', 0) end
  end
end
if recorded and dry_run then error('sliding_counter.lua: a dry run keeps no record', 0) end

-- The block key comes only with a lock-out. On a slot that is migrating, a
-- script whose keys are only partly on the source node gets TRYAGAIN, and
-- the block key rarely exists: with it, every hit on an existing log would
-- wait out the migration.
local want_keys = 1 + (block_us > 0 and 1 or 0) + (recorded and 1 or 0)
if not (#KEYS == want_keys) then error('sliding_counter.lua: expected ' .. want_keys .. ' KEYS (counter' .. (block_us > 0 and ', block' or '') .. (recorded and ', record' or '') .. ') for block_us ' .. block_us .. ', got ' .. #KEYS, 0) end
local counter_key, block_key = KEYS[1], KEYS[2]
local record_key = recorded and KEYS[#KEYS] or nil
if not (window > 0) then error('sliding_counter.lua: window_us must be positive', 0) end

-- Lua numbers are doubles and print as 1.7e+15 past 14 digits; every number
-- sent to Redis is formatted with %d, so it is an exact integer string.
local format = string.format

if recorded then
  local seen = redis.call('GET', record_key)
  if seen then
    local a, r, retry, reset, b = string.match(seen, '^(%d+) (%d+) (%d+) (%d+) (%d+) ')
    if not (a) then error('sliding_counter.lua: unexpected record in ' .. record_key, 0) end
    return {tonumber(a), tonumber(r), tonumber(retry), tonumber(reset), tonumber(b), 1}
  end
end

-- Inside a batch every decision is made at the batch's one instant
-- (lua/at_once.lua).
local time = redis.frozen_time or redis.call('TIME')
local now = time[1] * 1000000 + time[2]
local w = math.floor(now / window)
local elapsed = now - w * window

local stored = redis.call('HMGET', counter_key, 'w', 'c', 'p')
-- Fields this script wrote (or false, when missing): numbers by s + 0.
local stored_w = stored[1] and stored[1] + 0
local cur, prev = 0, 0
if stored_w == w then
  cur, prev = stored[2] and stored[2] + 0 or 0, stored[3] and stored[3] + 0 or 0
elseif stored_w == w - 1 then
  cur, prev = 0, stored[2] and stored[2] + 0 or 0
end

local estimate = prev * (window - elapsed) / window + cur

-- The answer; counted_in is the window index the call was counted in, or -1.
local allowed, remaining, retry_after, reset_after, blocked, counted_in

if block_us > 0 and redis.call('EXISTS', block_key) == 1 then
  local block_ms = math.max(redis.call('PTTL', block_key), 0)
  allowed, remaining, retry_after, blocked, counted_in = 0, 0, block_ms * 1000, 1, -1
elseif estimate + cost <= limit then
  allowed, remaining, retry_after, blocked, counted_in = 1, math.max(math.floor(limit - estimate - cost), 0), 0, 0, w
  if not dry_run then
    cur = cur + cost
    redis.call('HSET', counter_key, 'w', format('%d', w), 'c', format('%d', cur), 'p', format('%d', prev))
    -- The first call counted in window w sets the expiry for every later
    -- one: w's hits matter until w + 1 ends. (An older tollgate set now +
    -- 2 * window on every call, never less.)
    if stored_w ~= w then
      redis.call('PEXPIRE', counter_key, format('%d', math.ceil(((w + 2) * window - now) / 1000)))
    end
  end
else
  allowed, remaining, blocked, counted_in = 0, math.max(math.floor(limit - estimate), 0), 0, -1
  retry_after = nil
  if cur + cost <= limit then
    -- Denied although c alone leaves room, so p > 0: wait for it to decay.
    retry_after = math.ceil(window - (limit - cost - cur) * window / prev - elapsed)
  elseif cost <= limit then
    -- c alone leaves no room: wait until it has become p and decayed enough.
    retry_after = math.ceil(2 * window - elapsed - (limit - cost) * window / cur)
  end
  if block_us > 0 and not dry_run then
    redis.call('SET', block_key, '1', 'PX', format('%d', math.ceil(block_us / 1000)))
    blocked = 1
    retry_after = block_us
  end
end

-- Time until the estimate is 0 (after counting).
if cur > 0 then
  reset_after = 2 * window - elapsed
elseif prev > 0 then
  reset_after = window - elapsed
else
  reset_after = 0
end
-- A denial that never fits waits for the estimate to empty.
retry_after = math.max(retry_after or reset_after, 0)

if recorded then
  redis.call('SET', record_key,
    format('%d %d %d %d %d %d %d %d', allowed, remaining, retry_after, reset_after, blocked, limit, cost, counted_in),
    'PX', format('%d', math.ceil(window / 1000)))
  return {allowed, remaining, retry_after, reset_after, blocked, 0}
end
return {allowed, remaining, retry_after, reset_after, blocked}
