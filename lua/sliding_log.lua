--[[
sliding_log.lua: an exact sliding-window rate limit, with optional lock-out
and optional request-id records (retries are not charged twice).

KEYS[1]  the log: a sorted set with one member per counted call, whatever
         its cost, plus one base member at rank 0. Its score is the running
         total of hits counted in this log up to and including the call
         ("total after"); its member is "<time_us>:<tag>", the call's time
         in microseconds (Redis's clock) and a tag that keeps members of one
         microsecond apart (the running total before the call when it was
         added, with ".<n>" should that name be taken), then "+" (see
         Expiry; members written before that rule lack it). A call's cost
         is its score minus the score of the member ranked just before it,
         so a settle (lua/settle_log.lua) can change one call's cost by
         shifting the scores on one side of it, never renaming a member.
         Rank 0 is the base: the newest call that has left the window (or
         "0:0", scored 0, when the log is made), never a live call; hits in
         the window = newest score - base score.
KEYS[2]  the block key: present while the subject is locked out. Passed
         only when ARGV[5] block_us > 0 (and then required): a rule without
         a lock-out sends one key.
KEYS[#KEYS]  the request record, when ARGV[6] = 1: a string holding this
         call's answer, the limit, its cost and its member (see Records).
         Every key shares one hash tag, so the script runs on one Cluster
         slot.

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

Semantics (the memory store implements the same; keep them in step):
- The clock is Redis's own TIME, so every tollgate instance agrees.
- With a record key: if the record exists, its answer is returned as it
  was first given, with replayed = 1, and nothing else is read or written.
- If block_us > 0 and the block key exists: denied, blocked, remaining 0,
  retry_after = the block's PTTL, reset_after = time until the log is empty
  (newest + window - now, or 0). Nothing is written but the record.
- Otherwise calls with time <= now - window are trimmed, oldest first (the
  newest of them stays as the base), and count = the hits of the calls left.
- count + cost <= limit: allowed. Unless a dry run, one member for the call
  is added and the log lives at least one window after it (see Expiry).
  remaining = limit - count - cost, retry_after = 0, reset_after = window if
  counted, else time until the log is empty.
- Otherwise denied and nothing is counted. remaining = max(limit - count, 0);
  reset_after = newest + window - now; retry_after = when the call holding
  the need-th oldest hit (need = count + cost - limit) leaves the window,
  that is its time + window - now, or reset_after when cost > limit (it
  never fits). If block_us > 0 and not a dry run, the denial starts a block
  of block_us (PX rounded up to whole ms): blocked = 1 and retry_after =
  block_us.

Records: "<allowed> <remaining> <retry_after_us> <reset_after_us> <blocked>
<limit> <cost> <member>" (member "-" when denied), expiring one window
(PX rounded up to whole ms) after the decision: the window in which the
call's hits count. A denial is remembered too: a retry of a denied call
gets the same denial until its record expires.

Worked example: limit 4, window 2 s, block 0. Calls at t = 0 s (cost 2) and
t = 1.5 s (cost 2) fill the log: {"0:0" -> 0, "0:0+" -> 2, "1500000:2+" -> 4}
(times relative; the first is the base). At t = 1.5 s a fifth hit is
denied: {0, 0, 500000, 2000000, 0}, since the hits from t = 0 leave at
t = 2 s and the newest at t = 3.5 s; a cost of 3 is denied with {0, 0,
2000000, 2000000, 0}, since the third-oldest hit is in the call at t = 1.5
s. At t = 2.2 s the first call has left (it is the base now): two more hits
are allowed ({1, 1, 0, 2000000, 0} then {1, 0, 0, 2000000, 0}) and a third
is denied ({0, 0, 1300000, 2000000, 0}: the t = 1.5 s call leaves at 3.5 s).

Expiry: the log must outlive its newest call by one window, and a PEXPIRE
on every counted call was a tenth of Redis's work per decision. So time is
cut into stretches of window / 8 (at least 1 us), and the first counted call
of a stretch sets the expiry to the stretch's end + window: the later calls
of that stretch are already covered. A call skips the PEXPIRE only when
the newest member is of its own stretch and ends in "+", i.e. was written
under this rule; a member written by an older tollgate (which set the
expiry to its own time + window) lacks the "+", so a fleet being upgraded
never shortens a log's life. An idle log lives at most window / 8 longer
than it must. (After a rule's window grows, the calls of the stretch that
was current then keep the old window's expiry, as every earlier call
does.)

Bounded work: a call that is counted adds one member, whatever its cost,
and is trimmed once, by the first call after it leaves the window; every
other step is O(log n) in the calls in the window (ZRANGE by rank at either
end, one ZRANGEBYSCORE LIMIT 0 1, one GET and SET of the record). So a call
costs amortised O(log n) Redis work and one member of memory (plus the
base, one per log), never work or memory in proportion to its cost. n is
at most `limit` while nothing is refunded (every counted call spends at
least one hit); a refund (lua/settle_log.lua) lets more calls in, each a
request of its own paying for its one member, as it pays for its record.

Running totals are Lua doubles, exact to 2^53: they restart at 0 whenever
the log empties, and move by at most `limit` (plus settled hits) per window
while it does not.
A call's time is never before the newest member's, so the log stays in
time order even if Redis's clock steps back (a failover to a node whose
clock is behind): such calls are held a little longer, never less. Members
of equal score (calls settled to 0) are ordered by name, which is time
order: every time has 16 digits (until the year 2286), and "0:0" sorts first.
]]

-- Lean by design: after its redis.call()s, Redis spends most on the Lua
-- around them (callgrind, instructions per decision). Each closure made per
-- call costs about 1,000, each number handed to redis.call about 2,500
-- (Redis 7.0 formats it with %.17g), each string.format about 800, and each
-- tonumber() of a string about 1,000 (it runs strtod twice). So the path of
-- a decision makes no closure, hands redis.call strings, formats only what
-- it sends, and turns strings (its arguments, TIME, scores, member times)
-- into numbers by arithmetic: s + 0 runs strtod once. (The last two took
-- 11 % off Redis's work per decision in a batch of 20, 14 % alone:
-- bench/script_cost.py.)
if not (#ARGV == 5 or #ARGV == 6) then error('sliding_log.lua: expected 5 or 6 ARGV (limit, window_us, cost, dry_run, block_us[, record]), got ' .. #ARGV, 0) end

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
    if not (value >= 0 and value % 1 == 0) then error('sliding_log.lua: ' .. arg[2] .. ' must be a non-negative integer', 0) end
  end
end
if recorded and dry_run then error('sliding_log.lua: a dry run keeps no record', 0) end

-- The block key comes only with a lock-out. On a slot that is migrating, a
-- script whose keys are only partly on the source node gets TRYAGAIN, and
-- the block key rarely exists: with it, every hit on an existing log would
-- wait out the migration.
local want_keys = 1 + (block_us > 0 and 1 or 0) + (recorded and 1 or 0)
if not (#KEYS == want_keys) then error('sliding_log.lua: expected ' .. want_keys .. ' KEYS (log' .. (block_us > 0 and ', block' or '') .. (recorded and ', record' or '') .. ') for block_us ' .. block_us .. ', got ' .. #KEYS, 0) end
local log_key, block_key = KEYS[1], KEYS[2]
local record_key = recorded and KEYS[#KEYS] or nil

-- Lua numbers are doubles and print as 1.7e+15 past 14 digits; every number
-- sent to Redis is formatted with %d, so it is an exact integer string.
local format = string.format

if recorded then
  local seen = redis.call('GET', record_key)
  if seen then
    local a, r, retry, reset, b = string.match(seen, '^(%d+) (%d+) (%d+) (%d+) (%d+) ')
    if not (a) then error('sliding_log.lua: unexpected record in ' .. record_key, 0) end
    return {tonumber(a), tonumber(r), tonumber(retry), tonumber(reset), tonumber(b), 1}
  end
end

-- A member's time is string.sub(m, 1, string.find(m, ':', 1, true) - 1) + 0,
-- written out where it is needed: as a function it would be a closure made
-- on every call. A member of another form (this script never writes one)
-- fails the script with Lua's arithmetic error, as a corrupt log should.

-- Inside a batch every decision is made at the batch's one instant
-- (lua/at_once.lua).
local time = redis.frozen_time or redis.call('TIME')
local now = time[1] * 1000000 + time[2]

-- The answer, and the member counted for the call (nil when none was).
local allowed, remaining, retry_after, reset_after, blocked, member

if block_us > 0 and redis.call('EXISTS', block_key) == 1 then
  local block_ms = math.max(redis.call('PTTL', block_key), 0)
  local last = redis.call('ZRANGE', log_key, '-1', '-1')
  allowed, remaining, retry_after, blocked = 0, 0, block_ms * 1000, 1
  -- Until the newest call leaves the window, i.e. the log is empty.
  reset_after = last[1] and math.max(string.sub(last[1], 1, string.find(last[1], ':', 1, true) - 1) + 0 + window - now, 0) or 0
else
  -- Trim the calls that left the window, oldest first, a batch at a time,
  -- from rank 1 (rank 0 is the base): the newest of them becomes the base.
  -- The first read is the base and the oldest call only, with their
  -- scores, so that the base's score costs no command of its own: most
  -- calls find nothing to trim, and every member read costs Redis a score
  -- formatted and Lua a string (reading 17 where 2 do was a quarter of
  -- Redis's CPU per decision). Only if the oldest call has left are the
  -- rest read, 16 at a time.
  local cutoff = now - window
  local base = nil
  local span, span_arg = 1, '1'
  while true do
    local oldest = redis.call('ZRANGE', log_key, '0', span_arg, 'WITHSCORES')
    if oldest[1] == nil then
      break
    end
    base = oldest[2] + 0
    local gone = 0
    for i = 3, #oldest, 2 do
      local name = oldest[i]
      if string.sub(name, 1, string.find(name, ':', 1, true) - 1) + 0 > cutoff then
        break
      end
      gone = gone + 1
      base = oldest[i + 1] + 0
    end
    if gone > 0 then
      redis.call('ZREMRANGEBYRANK', log_key, '0', format('%d', gone - 1))
    end
    if gone < span then
      break
    end
    span, span_arg = 16, '16'
  end

  -- The newest member's time and score (the running total); for an empty
  -- log, nil and 0: its running total starts again from 0.
  local newest_name, newest_at, total = nil, nil, 0
  if base ~= nil then
    local last = redis.call('ZRANGE', log_key, '-1', '-1', 'WITHSCORES')
    newest_name = last[1]
    newest_at = string.sub(newest_name, 1, string.find(newest_name, ':', 1, true) - 1) + 0
    total = last[2] + 0
  end
  local count = total - (base or 0)
  -- Until the newest call leaves the window, i.e. the log is empty.
  reset_after = newest_at and math.max(newest_at + window - now, 0) or 0

  if count + cost <= limit then
    allowed, remaining, retry_after, blocked = 1, limit - count - cost, 0, 0
    if dry_run then
      return {allowed, remaining, retry_after, reset_after, blocked}
    end
    if base == nil then
      redis.call('ZADD', log_key, '0', '0:0')
    end
    local at = math.max(now, newest_at or now)
    member = format('%d:%d+', at, total)
    local n = 0
    -- Only a member of the newest call's microsecond can hold the name, and
    -- only after a settle brought the total back down: rare, and each round
    -- is one ZSCORE.
    while at == newest_at and redis.call('ZSCORE', log_key, member) do
      n = n + 1
      member = format('%d:%d.%d+', at, total, n)
    end
    reset_after = at + window - now
    redis.call('ZADD', log_key, format('%d', total + cost), member)
    -- The expiry (see Expiry) is moved only when the call is the first of
    -- its stretch, or the newest member predates the rule ('+').
    -- Integers all (exact as doubles), with operators rather than math.*
    -- calls: this runs on every counted call.
    local stretch = (window - window % 8) / 8
    if stretch < 1 then stretch = 1 end
    local start = at - at % stretch
    if not (newest_at and newest_at >= start and string.byte(newest_name, -1) == 43) then
      redis.call('PEXPIRE', log_key, format('%d', math.ceil((start + stretch + window - now) / 1000)))
    end
  else
    allowed, remaining, retry_after, blocked = 0, math.max(limit - count, 0), reset_after, 0
    if cost <= limit then
      -- The call whose running total first reaches base + need holds the
      -- need-th oldest hit: once it leaves, cost more hits fit.
      local need = count + cost - limit
      local call = redis.call('ZRANGEBYSCORE', log_key, format('%d', (base or 0) + need), '+inf', 'LIMIT', '0', '1')
      retry_after = math.max(string.sub(call[1], 1, string.find(call[1], ':', 1, true) - 1) + 0 + window - now, 0)
    end
    if block_us > 0 and not dry_run then
      redis.call('SET', block_key, '1', 'PX', format('%d', math.ceil(block_us / 1000)))
      blocked = 1
      retry_after = block_us
    end
  end
end

if recorded then
  redis.call('SET', record_key,
    format('%d %d %d %d %d %d %d %s', allowed, remaining, retry_after, reset_after, blocked, limit, cost, member or '-'),
    'PX', format('%d', math.ceil(window / 1000)))
  return {allowed, remaining, retry_after, reset_after, blocked, 0}
end
return {allowed, remaining, retry_after, reset_after, blocked}
