-- wrk script for bench/run.sh: POST /v1/chat/completions (non-streamed, max_tokens 16).
-- The same request bytes go to every target; the bare mock and nginx ignore the key.
-- Counts non-2xx responses in `response` and prints one machine-readable `WRK …` line.

local key = os.getenv("TG_KEY") or "none"
local model = os.getenv("TG_MODEL") or "gpt-4o-mini"

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. key
-- TG_HEADERS: extra headers, "Name: value" pairs separated by "|" (peer gateways route by them).
for pair in string.gmatch(os.getenv("TG_HEADERS") or "", "[^|]+") do
  local name, value = string.match(pair, "^%s*([^:]+):%s*(.-)%s*$")
  if name then wrk.headers[name] = value end
end
-- TG_PROMPT_BYTES: a conversation of about that many bytes instead of the one short line
-- (turns of prose with the escapes real chat histories carry: newlines, quotes, tabs).
local prompt_bytes = tonumber(os.getenv("TG_PROMPT_BYTES") or "")
if prompt_bytes then
  local turn = [[The gateway forwards each call upstream and charges its exact cost.\n]]
    .. [[A \"quoted\" phrase,\ta tab, and unicode: \u00e9t\u00e9. ]]
  local messages, size, i = {}, 0, 0
  while size < prompt_bytes do
    local role = (i % 2 == 0) and "user" or "assistant"
    local content = string.rep(turn, 8)
    local m = '{"role":"' .. role .. '","content":"' .. content .. '"}'
    table.insert(messages, m)
    size, i = size + #m + 1, i + 1
  end
  wrk.body = '{"model":"' .. model .. '","messages":[' .. table.concat(messages, ",")
    .. '],"max_tokens":16}'
else
  wrk.body = '{"model":"' .. model .. '","messages":[{"role":"user",'
    .. '"content":"Say hello to the benchmark please"}],"max_tokens":16}'
end

-- With TG_DELAY_MS set, each connection pauses that long between requests (paced runs).
local pause = tonumber(os.getenv("TG_DELAY_MS") or "")
if pause then
  function delay()
    return pause
  end
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  non2xx = 0
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  end
end

function done(summary, latency, requests)
  local n = 0
  for _, t in ipairs(threads) do
    n = n + (t:get("non2xx") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    "WRK requests=%d duration_us=%d rps=%.1f p50_us=%d p90_us=%d p99_us=%d max_us=%d "
      .. "non2xx=%d sock_connect=%d sock_read=%d sock_write=%d sock_timeout=%d\n",
    summary.requests, summary.duration, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    n, e.connect, e.read, e.write, e.timeout))
end
