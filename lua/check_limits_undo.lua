--[[
check_limits_undo.lua: takes back what check_limits.lua counted for a group
that a later slot denied (Redis Cluster only; see src/store/redis/group.rs).

KEYS[i]  the counter the i-th entry was counted in (all in one slot)
ARGV     three per key, from check_limits.lua's undo entries:
           'sliding_log', member, score: remove the member that call added
           'sliding_counter', w, cost: take cost back from window w

Returns the number of entries taken back (an entry already gone, because
its hits left the window or the counter expired, counts nothing).

Semantics:
- sliding_log (see lua/sliding_log.lua for the layout): a member's name
  never changes, so the call is found by name; its cost is its score minus
  the score of the member ranked just before it. Gone, or at rank 0 (it
  has left the window and is the base), counts nothing. Otherwise it is
  removed, and the side of it with fewer members is shifted so that no
  other call's cost changes: every later member's score lowered by the
  cost, or every earlier member's (the base included) raised by it; both
  keep scores in time order, as settle_log.lua explains. A side holds at
  most K = 64 members to be shifted: past that on both sides (the call deep
  inside over 129 calls of one window, which an undo made moments after
  the count never meets in practice) nothing is taken back, and the hits
  stay counted until they leave: never over-admitting. The score argument
  is the call's score when counted, unused but for the entry's shape.
  The TTL is left as it was (it may outlive the hits by a little, never the
  other way).
- sliding_counter (see lua/sliding_counter.lua): if the stored window is w,
  c -= cost; if it has moved on to w + 1, p -= cost; never below 0;
  anything older has already left the estimate.

Worked example: log {"0:0" -> 0, "100:0" -> 1, "200:1" -> 3, "300:3" -> 4}
(costs 1, 2, 1), undo ("200:1", 3): cost 3 - 1 = 2; one member after it,
two before: "300:3" is lowered to 2, leaving {"0:0" -> 0, "100:0" -> 1,
"300:3" -> 2}: 2 hits, as if the call never came.

Bounded work: per entry O(K log n): a ZRANK, two lookups by rank, and at
most K + 1 writes.
]]

assert(#ARGV == 3 * #KEYS, 'check_limits_undo.lua: expected 3 ARGV per key, got ' .. #ARGV .. ' for ' .. #KEYS .. ' keys')

local function int(x)
  return string.format('%d', x)
end

-- The most scores one take-back shifts besides removing the call.
local K = 64

local undone = 0
for i = 1, #KEYS do
  local key, kind, a, b = KEYS[i], ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  if kind == 'sliding_log' then
    local rank = redis.call('ZRANK', key, a)
    if rank and rank > 0 then
      local own = tonumber(redis.call('ZSCORE', key, a))
      local prev = redis.call('ZRANGE', key, rank - 1, rank - 1, 'WITHSCORES')
      local cost = own - tonumber(prev[2])
      local after = redis.call('ZCARD', key) - rank - 1
      local first, last, by = nil, nil, 0
      if after <= rank and after <= K then
        first, last, by = rank + 1, -1, -cost
      elseif rank <= K then
        first, last, by = 0, rank - 1, cost
      end
      if first then
        local side = redis.call('ZRANGE', key, first, last, 'WITHSCORES')
        for j = 1, #side, 2 do
          redis.call('ZADD', key, int(tonumber(side[j + 1]) + by), side[j])
        end
        redis.call('ZREM', key, a)
        undone = undone + 1
      end
    end
  elseif kind == 'sliding_counter' then
    local w, cost = tonumber(a), tonumber(b)
    assert(w and cost, 'check_limits_undo.lua: malformed counter entry')
    local stored = redis.call('HMGET', key, 'w', 'c', 'p')
    local stored_w = tonumber(stored[1])
    if stored_w == w then
      redis.call('HSET', key, 'c', int(math.max((tonumber(stored[2]) or 0) - cost, 0)))
      undone = undone + 1
    elseif stored_w == w + 1 then
      redis.call('HSET', key, 'p', int(math.max((tonumber(stored[3]) or 0) - cost, 0)))
      undone = undone + 1
    end
  else
    error('check_limits_undo.lua: unknown kind ' .. tostring(kind))
  end
end
return undone
