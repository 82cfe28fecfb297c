"""The Lua side of ``gate.sharedlimits``: the three scripts Redis runs for it.

Each runs atomically on Redis's own clock (``TIME``, in microseconds), so however
many nodes call them at once, every check-and-take of a request's scopes happens as
if alone. They keep gate.limiter's GCRA: per scope one hash (``rt``/``tt``: the
theoretical arrival times of the request and token buckets, ``ri``/``ti``: µs per
unit they were taken with) and one sorted set of in-flight slots (member: the
request's ticket, score: when it expires unless renewed). Numbers are stored with
%.17g: Lua's own conversion keeps 14 digits, which rounds a µs timestamp to 10 µs.
"""

from __future__ import annotations

from flintproxy.store.redislink import Script

__all__ = ["ADMIT", "RELEASE", "RENEW"]

# KEYS: per scope, its bucket hash and its slots zset (scope 1 the key, 2 the account).
# ARGV: tokens, slot member, slot ttl µs; per scope: riv, tiv (µs per unit; 0 none),
# rlim, tlim (0: unlimited), conc (-1: unlimited).
# Reply: ok (1/0), failing scope, failing dimension ("r" | "t" | "c"); per scope:
# rs, ts (µs in use before), nrs, nts (after taking), busy (slots before).
ADMIT = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tokens = tonumber(ARGV[1])
local member, ttl = ARGV[2], tonumber(ARGV[3])
local TOL = 1e-6
local n = #KEYS / 2
local st, fail, what = {}, 0, ''
for i = 1, n do
  local o = 3 + (i - 1) * 5
  local riv, tiv = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2])
  local rlim, tlim, conc = tonumber(ARGV[o + 3]), tonumber(ARGV[o + 4]), tonumber(ARGV[o + 5])
  local h = redis.call('HMGET', KEYS[2 * i - 1], 'rt', 'ri', 'tt', 'ti')
  local rt, ri, tt, ti = tonumber(h[1]) or 0, tonumber(h[2]) or 0, tonumber(h[3]) or 0,
    tonumber(h[4]) or 0
  -- a changed limit keeps the units in use, not the seconds (as gate.limiter)
  if ri ~= riv and rt > now then rt = (ri > 0) and (now + (rt - now) / ri * riv) or now end
  if ti ~= tiv and tt > now then tt = (ti > 0) and (now + (tt - now) / ti * tiv) or now end
  local busy = 0
  if conc >= 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2 * i], '-inf', now)
    busy = redis.call('ZCARD', KEYS[2 * i])
  end
  local nrt = math.max(rt, now) + riv
  local ntt = math.max(tt, now) + tokens * tiv
  st[i] = {rt, tt, nrt, ntt, busy, riv, tiv, conc}
  if fail == 0 then
    if rlim > 0 and nrt - now > (rlim + TOL) * riv then fail, what = i, 'r'
    elseif tlim > 0 and ntt - now > (tlim + TOL) * tiv then fail, what = i, 't'
    elseif conc >= 0 and busy >= conc then fail, what = i, 'c' end
  end
end
local out = {fail == 0 and 1 or 0, fail, what}
for i = 1, n do
  local s = st[i]
  if fail == 0 then
    local f = '%.17g'
    redis.call('HSET', KEYS[2 * i - 1], 'rt', string.format(f, s[3]), 'ri',
      string.format(f, s[6]), 'tt', string.format(f, s[4]), 'ti', string.format(f, s[7]))
    local left = math.max(s[3], s[4]) - now
    redis.call('PEXPIRE', KEYS[2 * i - 1], math.floor(left / 1000) + 1000)
    if s[8] >= 0 then
      redis.call('ZADD', KEYS[2 * i], string.format(f, now + ttl), member)
      redis.call('PEXPIRE', KEYS[2 * i], math.floor(ttl / 1000) * 2)
    end
  end
  for j, v in ipairs({s[1] - now, s[2] - now, s[3] - now, s[4] - now}) do
    out[#out + 1] = tostring(v)
  end
  out[#out + 1] = s[5]
end
return out
""")

# KEYS: per released scope, its bucket and its slots. ARGV: per release: scope count,
# token difference (actual - reserved), member; then per scope its tiv.
RELEASE = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local k, a = 1, 1
while a <= #ARGV do
  local n, diff, member = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), ARGV[a + 2]
  a = a + 3
  for i = 1, n do
    local tiv = tonumber(ARGV[a])
    a = a + 1
    redis.call('ZREM', KEYS[k + 1], member)
    if diff ~= 0 and tiv > 0 then
      local tt = tonumber(redis.call('HGET', KEYS[k], 'tt')) or now
      -- more than reserved: charged from now if refilled meanwhile; a refund can at
      -- most refill the bucket
      if diff > 0 then tt = math.max(tt, now) + diff * tiv else tt = tt + diff * tiv end
      if tt > now then
        redis.call('HSET', KEYS[k], 'tt', string.format('%.17g', tt), 'ti',
          string.format('%.17g', tiv))
        redis.call('PEXPIRE', KEYS[k], math.floor((tt - now) / 1000) + 1000)
      else
        redis.call('HSET', KEYS[k], 'tt', string.format('%.17g', tt))
      end
    end
    k = k + 2
  end
end
return 1
""")

# KEYS: slots zsets; ARGV: ttl µs, then one member per key.
RENEW = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', string.format('%.17g', now + ttl), ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], math.floor(ttl / 1000) * 2)
end
return 1
""")
