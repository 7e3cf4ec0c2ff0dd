-- wrk script: POST one unique input per request to an OpenAI-style embeddings endpoint.
-- WRK_TEXT: the input, with one %d that is replaced by a per-request counter so no two bodies match.
-- done() prints one JSON line that bench_embeddings.py parses.
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  counter = 0
  template = os.getenv("WRK_TEXT") or "the quick brown fox jumps over the lazy dog %d"
  model = os.getenv("WRK_MODEL") or "all-minilm-l6-v2"
  wrk.method = "POST"
  wrk.path = "/v1/embeddings"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local text = string.format(template, tid * 100000000 + counter)
  return wrk.format(nil, nil, nil, '{"model": "' .. model .. '", "input": "' .. text .. '"}')
end

function done(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "errors_connect": %d, "errors_read": %d, "errors_timeout": %d, "errors_status": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read, summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99)))
end
