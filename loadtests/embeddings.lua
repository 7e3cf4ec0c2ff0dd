-- wrk script: POST one unique input per request to an OpenAI-style embeddings endpoint.
-- WRK_TEXT: the input, with one %d that is replaced by a per-request counter so no two bodies match.
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

-- done(): the shared report, from the file beside this one.
dofile((debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "") .. "wrk_report.lua")
