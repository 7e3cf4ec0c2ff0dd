-- The report every fnserve wrk script ends with: done() prints one JSON line that run_wrk
-- (loadtests/bench_embeddings.py) parses. Loaded with dofile() from the script beside it.
function done(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "errors_connect": %d, "errors_read": %d, "errors_timeout": %d, "errors_status": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read, summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99)))
end
