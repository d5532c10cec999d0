"""The Redis scripts of the ingest, in one place.

WRITE_SHARD stores one group commit of one shard atomically, in one round trip: the stream entry,
every agent's registry entry, and reads the fences of those agents and the tasks offered to them
(core/tasks.py writes both). The heartbeats arrive column-wise in a
handful of arguments (newline-joined ids and numbers, packed little-endian floats, one byte per status)
and the script builds the registry values itself: packing two arguments and formatting one string per
heartbeat was most of the ingest's CPU, while Redis had a core to spare. All four keys share the
shard's hash tag, so the script runs on one Redis Cluster node. The registry value format is the one
core.views.RegistryEntry documents and decodes.

KEYS: stream, latest (hash), fenced (hash), assigned (hash)
ARGV: minid, blob, count, newest receive time,
      agent ids, task ids, receive times, timestamps (newline-joined),
      statuses (one byte each), cpu, progress (float32 little-endian; NaN progress: not reported)
Returns: a flat list agent, fences, offers, agent, fences, offers ... for the agents that have either
(an empty string for the one they lack).
"""

WRITE_SHARD = """
local function split(s)
  local out, n, start = {}, 1, 1
  while true do
    local stop = string.find(s, '\\n', start, true)
    if not stop then
      out[n] = string.sub(s, start)
      return out
    end
    out[n] = string.sub(s, start, stop - 1)
    n = n + 1
    start = stop + 1
  end
end

redis.call('XADD', KEYS[1], 'MINID', '~', ARGV[1], '*', 'b', ARGV[2], 'n', ARGV[3], 'r', ARGV[4])
local agents, tasks, received, stamps = split(ARGV[5]), split(ARGV[6]), split(ARGV[7]), split(ARGV[8])
local statuses, cpus, progress = ARGV[9], ARGV[10], ARGV[11]
local args = {}
for i = 1, #agents do
  local cpu = struct.unpack('<f', cpus, 4 * i - 3)
  local done = struct.unpack('<f', progress, 4 * i - 3)
  local shown = '-'
  if done == done then shown = math.floor(done * 1000 + 0.5) end
  args[#args + 1] = agents[i]
  args[#args + 1] = received[i] .. ' ' .. string.byte(statuses, i) .. ' ' .. math.floor(cpu * 1000 + 0.5)
    .. ' ' .. stamps[i] .. ' ' .. shown .. ' ' .. tasks[i]
  if #args >= 1000 then
    redis.call('HSET', KEYS[2], unpack(args))
    args = {}
  end
end
if #args > 0 then redis.call('HSET', KEYS[2], unpack(args)) end
local out = {}
local has_fences, has_offers = redis.call('EXISTS', KEYS[3]) == 1, redis.call('EXISTS', KEYS[4]) == 1
if has_fences or has_offers then
  for first = 1, #agents, 500 do
    local chunk = {unpack(agents, first, math.min(first + 499, #agents))}
    local fences = has_fences and redis.call('HMGET', KEYS[3], unpack(chunk)) or {}
    local offers = has_offers and redis.call('HMGET', KEYS[4], unpack(chunk)) or {}
    for j = 1, #chunk do
      if fences[j] or offers[j] then
        out[#out + 1] = chunk[j]
        out[#out + 1] = fences[j] or ''
        out[#out + 1] = offers[j] or ''
      end
    end
  end
end
return out
"""
