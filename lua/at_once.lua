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
`redis` to hand those functions, which answers TIME with that one instant,
so that every decision of the script is made at the same moment. Every
other command goes to Redis.
]]

local frozen = redis.call('TIME')
local at_once = setmetatable({
  call = function(command, ...)
    if command == 'TIME' then
      return frozen
    end
    return redis.call(command, ...)
  end,
}, { __index = redis })
