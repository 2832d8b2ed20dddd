-- wrk script: cycle through pre-computed requests (signed webhooks, authenticated sends).
-- BENCH_REQUESTS names a file with one request per line: method TAB path TAB headers TAB body,
-- headers joined by \x1f as "Name: value". Each wrk thread starts at its own offset in the list.
-- done() prints one line "BENCH_JSON {...}" that bench/common.py parses.

local counter = 0
local threads = {}

function setup(thread)
  thread:set("id", counter)
  table.insert(threads, thread)
  counter = counter + 1
end

function init(args)
  requests = {}
  local f = assert(io.open(os.getenv("BENCH_REQUESTS"), "r"))
  for line in f:lines() do
    local method, path, head, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
    local headers = {}
    for pair in string.gmatch(head, "[^\31]+") do
      local name, value = pair:match("^([^:]+): (.*)$")
      headers[name] = value
    end
    table.insert(requests, wrk.format(method, path, headers, body))
  end
  f:close()
  local nthreads = tonumber(os.getenv("BENCH_THREADS") or "2")
  index = math.floor(#requests * id / nthreads)
end

function request()
  index = index + 1
  if index > #requests then index = 1 end
  return requests[index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d}, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
