"""Trimming a work stream on Redis, as one script so that it sees one state of the stream's groups.

Every trim_interval_ms each consumer runs it over its stream: consumers unseen for stale_consumer_ms with nothing
pending are deleted, a group none of whose consumers is fresh stops counting (and is destroyed once it has no
consumer left, if the stream has a live group), and the stream is trimmed (XTRIM MINID, exact) below the first entry
some live group still needs: its oldest pending entry, or the one after the last it was handed. A stream nobody
reads yet is left alone (MAXLEN bounds it).
"""

# KEYS: stream. ARGV: stale_consumer_ms. Returns {entries trimmed, consumers pruned, groups destroyed}.
MAINTAIN = """
local key, stale = KEYS[1], tonumber(ARGV[1])
if redis.call('EXISTS', key) == 0 then return {0, 0, 0} end
local function fields(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
local function parse(id)
  local ms, seq = string.match(id, '(%d+)-(%d+)')
  return tonumber(ms), tonumber(seq)
end
local function before(a_ms, a_seq, b_ms, b_seq)
  return a_ms < b_ms or (a_ms == b_ms and a_seq < b_seq)
end
local keep_ms, keep_seq, pruned, dead = nil, nil, 0, {}
for _, g in ipairs(redis.call('XINFO', 'GROUPS', key)) do
  g = fields(g)
  local fresh, left = false, 0
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', key, g['name'])) do
    c = fields(c)
    if c['idle'] < stale then
      fresh, left = true, left + 1
    elseif c['pending'] == 0 then
      redis.call('XGROUP', 'DELCONSUMER', key, g['name'], c['name'])
      pruned = pruned + 1
    else
      left = left + 1
    end
  end
  if fresh then
    local ms, seq
    if g['pending'] > 0 then
      ms, seq = parse(redis.call('XPENDING', key, g['name'])[2])
    else
      ms, seq = parse(g['last-delivered-id'])
      seq = seq + 1
    end
    if keep_ms == nil or before(ms, seq, keep_ms, keep_seq) then keep_ms, keep_seq = ms, seq end
  elseif left == 0 then
    dead[#dead + 1] = g['name']
  end
end
if keep_ms == nil then return {0, pruned, 0} end
for _, name in ipairs(dead) do redis.call('XGROUP', 'DESTROY', key, name) end
local trimmed = redis.call('XTRIM', key, 'MINID', keep_ms .. '-' .. keep_seq)
return {trimmed, pruned, #dead}
"""

