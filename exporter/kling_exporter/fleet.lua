-- The fleet's one server-side script (kling_exporter/fleet.py runs it): publish this
-- exporter's entry of each budget, read the others', or decide a reservation, atomically.
--
-- KEYS: 1 epoch, 2 instances, 3 the hold's id, then one hash per budget
-- ARGV: 1 mode (publish | read | claim), 2 instance, 3 settle seconds, 4 stale seconds,
--       5 credits needed, 6 usd needed, 7 the hold's ttl, 8 "1" when an id is given,
--       then four per budget: credit limit (-1 none), usd limit (-1 none), seconds the
--       entry is kept, this instance's entry [used c, u, in flight c, u, held c, u,
--       seconds the holds last]
-- Entries are kept with the holds' end in Redis's own time, so that clocks of
-- exporters that disagree do not matter.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local mode, me = ARGV[1], ARGV[2]
local epoch = tonumber(redis.call('GET', KEYS[1]))
if not epoch then
  epoch = now
  redis.call('SET', KEYS[1], string.format('%.6f', now))
end
local settled = now >= epoch + tonumber(ARGV[3])
local n = #KEYS - 3
local others, mine = {}, {}
for i = 1, n do
  local o = {0, 0, 0, 0, 0, 0}
  local entries = redis.call('HGETALL', KEYS[3 + i])
  for j = 1, #entries, 2 do
    if entries[j] ~= me then
      local e = cjson.decode(entries[j + 1])
      for k = 1, 4 do o[k] = o[k] + e[k] end
      if e[7] > now then
        o[5] = o[5] + e[5]
        o[6] = o[6] + e[6]
      end
    end
  end
  others[i] = o
  mine[i] = cjson.decode(ARGV[8 + 4 * i])
end
local verdict, owner, refused_by = 'ok', '', 0
if mode == 'claim' then
  local holder = false
  if ARGV[8] == '1' then holder = redis.call('GET', KEYS[3]) end
  if not settled then
    verdict = 'settling'
  elseif holder and holder ~= me then
    verdict, owner = 'taken', holder
  else
    local nc, nu = tonumber(ARGV[5]), tonumber(ARGV[6])
    for i = 1, n do
      local lc, lu = tonumber(ARGV[5 + 4 * i]), tonumber(ARGV[6 + 4 * i])
      local o, m = others[i], mine[i]
      local c = o[1] + m[1] + o[3] + m[3] + o[5] + m[5] + nc
      local u = o[2] + m[2] + o[4] + m[4] + o[6] + m[6] + nu
      if verdict == 'ok' and ((lc >= 0 and c > lc + 1e-9) or (lu >= 0 and u > lu + 1e-9)) then
        verdict, refused_by = 'refused', i
      end
    end
    if verdict == 'ok' then
      local ttl = tonumber(ARGV[7])
      for i = 1, n do
        mine[i][5] = mine[i][5] + nc
        mine[i][6] = mine[i][6] + nu
        mine[i][7] = math.max(mine[i][7], ttl)
      end
      if ARGV[8] == '1' then
        redis.call('SET', KEYS[3], me, 'EX', math.max(1, math.ceil(ttl)))
      end
    end
  end
end
if mode ~= 'read' then
  for i = 1, n do
    local m = mine[i]
    m[7] = now + m[7]
    redis.call('HSET', KEYS[3 + i], me, cjson.encode(m))
    redis.call('EXPIRE', KEYS[3 + i], math.max(1, math.ceil(tonumber(ARGV[7 + 4 * i]))))
  end
  redis.call('ZADD', KEYS[2], now, me)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 7 * 86400)
end
local instances = redis.call('ZCOUNT', KEYS[2], now - tonumber(ARGV[4]), '+inf')
return cjson.encode({verdict = verdict, owner = owner, refused_by = refused_by,
                     settled = settled,
                     epoch = string.format('%.6f', epoch), instances = instances,
                     others = others})
