-- The fleet's one server-side script (kling_exporter/guard/fleet.py runs it): hold this
-- exporter's lease on its instance name, publish its entry of each budget (writing back
-- what Redis lost of the others'), read the others', decide a reservation, or write
-- back the ids of its live holds, atomically.
--
-- KEYS: 1 epoch, 2 instances, 3 the hold's id, 4 the instance's lease, then one hash
--       per budget (ids: one key per hold's id)
-- ARGV: 1 mode (lease | release | ids | publish | read | claim), 2 instance, 3 the lease's
--       token, 4 the lease's milliseconds, 5 settle seconds, 6 stale seconds, 7 credits
--       needed, 8 usd needed, 9 the hold's ttl, 10 "1" when an id is given, 11 entries
--       of other instances to write back ([[budget key, instance, entry]...], publish
--       only), then four per budget: credit limit (-1 none), usd limit (-1 none),
--       seconds the entry is kept, this instance's entry [used c, u, in flight c, u,
--       held c, u, seconds the holds last] (ids: one per hold, the seconds it lasts)
-- Entries are kept with the holds' end in Redis's own time, so that clocks of
-- exporters that disagree do not matter.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local mode, me, token = ARGV[1], ARGV[2], ARGV[3]
local FIXED, K = 11, 4

-- The lease: one running exporter per instance name. Every write renews it; an
-- exporter that finds another's token in it writes nothing.
local lessee = redis.call('GET', KEYS[4])
if mode == 'release' then
  if lessee == token then redis.call('DEL', KEYS[4]) end
  return cjson.encode({verdict = 'ok'})
end
if mode ~= 'read' then
  if lessee and lessee ~= token then
    return cjson.encode({verdict = 'conflict'})
  end
  redis.call('SET', KEYS[4], token, 'PX', tonumber(ARGV[4]))
end

-- A Redis that started afresh lost which instance holds which id: each gives back its
-- own, unless another instance took one meanwhile.
if mode == 'ids' then
  for i = K + 1, #KEYS do
    local ttl = math.max(1, math.ceil(tonumber(ARGV[FIXED + i - K])))
    redis.call('SET', KEYS[i], me, 'EX', ttl, 'NX')
  end
  return cjson.encode({verdict = 'ok'})
end

local epoch = tonumber(redis.call('GET', KEYS[1]))
if not epoch then
  epoch = now
  redis.call('SET', KEYS[1], string.format('%.6f', now))
end
local settled = now >= epoch + tonumber(ARGV[5])
local n = #KEYS - K

-- What each instance used in a period only grows (a G-counter): an entry Redis lost is
-- written back whole (its holds still end when they did), one it holds lower gets the
-- higher used; in flight and held are the instance's own to lower.
if mode == 'publish' then
  local declared = {}
  for i = 1, n do declared[KEYS[K + i]] = true end
  for _, r in ipairs(cjson.decode(ARGV[11])) do
    local key, who, e = r[1], r[2], r[3]
    if declared[key] and who ~= me then
      local found = redis.call('HGET', key, who)
      if found then
        local c = cjson.decode(found)
        if e[1] > c[1] or e[2] > c[2] then
          c[1], c[2] = math.max(c[1], e[1]), math.max(c[2], e[2])
          redis.call('HSET', key, who, cjson.encode(c))
        end
      else
        redis.call('HSET', key, who, cjson.encode(e))
      end
    end
  end
end

local others, mine, seen = {}, {}, {}
for i = 1, n do
  local o, all, stored = {0, 0, 0, 0, 0, 0}, {}, nil
  local entries = redis.call('HGETALL', KEYS[K + i])
  for j = 1, #entries, 2 do
    local e = cjson.decode(entries[j + 1])
    if entries[j] == me then
      stored = e
    else
      all[entries[j]] = e
      for k = 1, 4 do o[k] = o[k] + e[k] end
      if e[7] > now then
        o[5] = o[5] + e[5]
        o[6] = o[6] + e[6]
      end
    end
  end
  others[i] = o
  seen[i] = all
  local m = cjson.decode(ARGV[FIXED + 4 * i])
  if stored then
    m[1], m[2] = math.max(m[1], stored[1]), math.max(m[2], stored[2])
  end
  mine[i] = m
end

local verdict, owner, refused_by = 'ok', '', 0
if mode == 'claim' then
  local holder = false
  if ARGV[10] == '1' then holder = redis.call('GET', KEYS[3]) end
  if not settled then
    verdict = 'settling'
  elseif holder and holder ~= me then
    verdict, owner = 'taken', holder
  else
    local nc, nu = tonumber(ARGV[7]), tonumber(ARGV[8])
    for i = 1, n do
      local lc, lu = tonumber(ARGV[FIXED + 4 * i - 3]), tonumber(ARGV[FIXED + 4 * i - 2])
      local o, m = others[i], mine[i]
      local c = o[1] + m[1] + o[3] + m[3] + o[5] + m[5] + nc
      local u = o[2] + m[2] + o[4] + m[4] + o[6] + m[6] + nu
      if verdict == 'ok' and ((lc >= 0 and c > lc + 1e-9) or (lu >= 0 and u > lu + 1e-9)) then
        verdict, refused_by = 'refused', i
      end
    end
    if verdict == 'ok' then
      local ttl = tonumber(ARGV[9])
      for i = 1, n do
        mine[i][5] = mine[i][5] + nc
        mine[i][6] = mine[i][6] + nu
        mine[i][7] = math.max(mine[i][7], ttl)
      end
      if ARGV[10] == '1' then
        redis.call('SET', KEYS[3], me, 'EX', math.max(1, math.ceil(ttl)))
      end
    end
  end
end
if mode == 'publish' or mode == 'claim' then
  for i = 1, n do
    local m = mine[i]
    m[7] = now + m[7]
    redis.call('HSET', KEYS[K + i], me, cjson.encode(m))
    redis.call('EXPIRE', KEYS[K + i], math.max(1, math.ceil(tonumber(ARGV[FIXED + 4 * i - 1]))))
  end
  redis.call('ZADD', KEYS[2], now, me)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 7 * 86400)
end
local instances = redis.call('ZCOUNT', KEYS[2], now - tonumber(ARGV[6]), '+inf')
local answer = {verdict = verdict, owner = owner, refused_by = refused_by,
                settled = settled, epoch = string.format('%.6f', epoch),
                instances = instances, others = others}
if mode == 'publish' then answer.entries = seen end
return cjson.encode(answer)
