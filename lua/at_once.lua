--[[
at_once.lua: the prelude of the scripts that make decisions inside
themselves (check_limits.lua, decide_batch.lua). Not a script by itself:
src/store/redis.rs (composed_script!) builds each such script as

  local function sliding_log(KEYS, ARGV, redis) <lua/sliding_log.lua> end
  local function sliding_counter(KEYS, ARGV, redis) <lua/sliding_counter.lua> end
  local function usage_increment(KEYS, ARGV, redis) <lua/usage_increment.lua> end
  <this file>
  local function check_limits(KEYS, ARGV, redis) <lua/check_limits.lua> end
                                                  (decide_batch.lua only)
  <the script>

so that every decision, alone or inside another script, is made by exactly
one source. This file reads Redis's TIME once and defines `at_once`: the
`redis` to hand those functions, with that one reply as `frozen_time`, so
that every decision of the script is made at the same moment. A decision
script reads the time as `redis.frozen_time or redis.call('TIME')` (alone,
`redis` is Redis's own table, which has no such field), never by TIME
alone: tests hold them to it (src/store/redis.rs, tests/batching.rs).
Everything else is Redis's own `redis`, `call` included: a wrapper that
caught TIME among every command cost a Lua call per command, 4 % of
Redis's work per batched decision (bench/script_cost.py).
]]

local at_once = setmetatable({ call = redis.call, frozen_time = redis.call('TIME') }, { __index = redis })
