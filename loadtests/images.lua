-- wrk script: POST one image (base64 JSON, read from WRK_BODY_FILE) per request to /v1/images/classifications.
-- done() prints one JSON line that bench_images.py parses.
function init(args)
  local file = assert(io.open(os.getenv("WRK_BODY_FILE"), "rb"))
  wrk.body = file:read("*a")
  file:close()
  wrk.method = "POST"
  wrk.path = "/v1/images/classifications"
  wrk.headers["Content-Type"] = "application/json"
end

function done(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "errors_connect": %d, "errors_read": %d, "errors_timeout": %d, "errors_status": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read, summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99)))
end
