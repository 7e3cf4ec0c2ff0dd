-- wrk script: POST one unique input per request to an embeddings endpoint.
-- Configure with env vars: WRK_PATH (route), WRK_TOKENS ("short" ~12 tokens or "long" ~128 tokens),
-- WRK_NATIVE=1 for BentoML's native {"texts": [...]} body instead of the OpenAI body.
local counter = 0
local thread_id = 0
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local short = "the quick brown fox jumps over the lazy dog near river bank %d"
local long_words = {}
for i = 1, 12 do
  table.insert(long_words, "serving models efficiently under concurrent load needs adaptive batching so that many small requests share one forward pass")
end
local long = table.concat(long_words, " ", 1, 1):rep(1) .. " " .. table.concat(long_words, " "):sub(1, 520) .. " %d"

function init(args)
  wrk.method = "POST"
  wrk.path = os.getenv("WRK_PATH") or "/v1/embeddings"
  wrk.headers["Content-Type"] = "application/json"
  template = (os.getenv("WRK_TOKENS") == "long") and long or short
  native = os.getenv("WRK_NATIVE") == "1"
end

function request()
  counter = counter + 1
  local text = string.format(template, tid * 100000000 + counter)
  local body
  if native then
    body = '{"texts": ["' .. text .. '"]}'
  else
    body = '{"model": "all-minilm-l6-v2", "input": "' .. text .. '"}'
  end
  return wrk.format(nil, nil, nil, body)
end

function done(summary, latency, requests)
  io.write(string.format('{"requests": %d, "errors_status": %d, "errors_connect": %d, "errors_timeout": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.errors.status, summary.errors.connect, summary.errors.timeout,
    summary.duration, latency:percentile(50), latency:percentile(99)))
end
