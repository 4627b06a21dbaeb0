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
- sliding_log (see lua/sliding_log.lua for the layout): the call is found
  by its time and cost (score - total before), newest first: an undo of an
  earlier call may have rewritten it since, lowering its totals, never its
  time or cost; two calls with the same time and cost are the same to
  every decision, so either may go. If it is still there it is removed,
  and every later member (score above it) is rewritten with its running
  totals lowered by the cost, so hits in the window = newest score - oldest
  total before stays exact. Times are unchanged, so
  the log stays in time order; the TTL is left as it was (it may outlive
  the hits by a little, never the other way).
- sliding_counter (see lua/sliding_counter.lua): if the stored window is w,
  c -= cost; if it has moved on to w + 1, p -= cost; never below 0;
  anything older has already left the estimate.

Worked example: log {"100:0" -> 1, "200:1" -> 3, "300:3" -> 4}, undo
("200:1", 3): cost 2; "300:3" -> 4 becomes "300:1" -> 2, leaving
{"100:0" -> 1, "300:1" -> 2}: 2 hits, as if the call never came.

Bounded work: per entry O(k log n), k the calls counted after it (at most
the rule's limit, in practice the few made while the group was in flight):
they are read once to find the call and once to rewrite them.
]]

assert(#ARGV == 3 * #KEYS, 'check_limits_undo.lua: expected 3 ARGV per key, got ' .. #ARGV .. ' for ' .. #KEYS .. ' keys')

local function int(x)
  return string.format('%d', x)
end

-- A member's time, total before, and whatever it holds after them.
local function parse(key, member)
  local at, before, tail = string.match(member, '^(%d+):(%d+)(.*)$')
  assert(at, 'check_limits_undo.lua: unexpected member ' .. tostring(member) .. ' in ' .. key)
  return tonumber(at), tonumber(before), tail
end

local BATCH = 16
local undone = 0
for i = 1, #KEYS do
  local key, kind, a, b = KEYS[i], ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  if kind == 'sliding_log' then
    local at, before = string.match(a, '^(%d+):(%d+)')
    at, before = tonumber(at), tonumber(before)
    local cost = tonumber(b) and before and tonumber(b) - before
    assert(at and cost, 'check_limits_undo.lua: malformed log entry ' .. tostring(a))
    -- Newest first, down to the first call older than ours: the member may
    -- have been rewritten since (another undo lowers later totals), but its
    -- time and cost stay.
    local found, found_score = nil, nil
    local offset, older = 0, false
    while found == nil and not older do
      local batch = redis.call('ZREVRANGE', key, offset, offset + BATCH - 1, 'WITHSCORES')
      for j = 1, #batch, 2 do
        local t, was = parse(key, batch[j])
        local s = tonumber(batch[j + 1])
        if t < at then
          older = true
          break
        end
        if t == at and s - was == cost then
          found, found_score = batch[j], s
          break
        end
      end
      if #batch < 2 * BATCH then
        break
      end
      offset = offset + BATCH
    end
    if found then
      local later = redis.call('ZRANGEBYSCORE', key, '(' .. int(found_score), '+inf', 'WITHSCORES')
      redis.call('ZREM', key, found)
      for j = 1, #later, 2 do
        local t, was, tail = parse(key, later[j])
        redis.call('ZREM', key, later[j])
        redis.call('ZADD', key, int(tonumber(later[j + 1]) - cost), int(t) .. ':' .. int(was - cost) .. tail)
      end
      undone = undone + 1
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
