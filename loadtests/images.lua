-- wrk script: POST one image (base64 JSON, read from WRK_BODY_FILE) per request to /v1/images/classifications.
function init(args)
  local file = assert(io.open(os.getenv("WRK_BODY_FILE"), "rb"))
  wrk.body = file:read("*a")
  file:close()
  wrk.method = "POST"
  wrk.path = "/v1/images/classifications"
  wrk.headers["Content-Type"] = "application/json"
end

-- done(): the shared report, from the file beside this one.
dofile((debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "") .. "wrk_report.lua")
