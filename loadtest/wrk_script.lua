-- The wrk script of the load test; loadtest/wrk.py fills in the specs, budget and marker.
-- POSTs prebuilt bodies and counts the answers by status; done() prints one JSON line.
local specs = {
@SPECS@
}
local budget = @BUDGET@
local think_ms = @THINK_MS@  -- mean pause before each request, exponential; 0: none

local function slurp(name)
  local f = assert(io.open(name, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

-- A monotonic clock through LuaJIT's ffi, to time threads that stop early on their budget
-- (wrk's own duration is always the whole -d); without ffi the budget still stops them.
local now = function() return nil end
do
  local ok, ffi = pcall(require, "ffi")
  if ok and pcall(ffi.cdef, [[
      typedef struct { long tv_sec; long tv_nsec; } escort_timespec;
      int clock_gettime(int clock, escort_timespec *ts);]]) then
    local ts = ffi.new("escort_timespec")
    now = function()
      ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
      return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) / 1e9
    end
  end
end

local prepared, n = {}, 0
if #specs == 1 then
  -- Static: wrk formats this request once per thread and resends the same buffer.
  wrk.method = "POST"
  wrk.path = specs[1].path
  for k, v in pairs(specs[1].headers) do wrk.headers[k] = v end
  wrk.body = slurp(specs[1].file)
else
  -- Several protocols or backends: rotate over requests formatted once, in init.
  function request()
    n = n % #prepared + 1
    return prepared[n]
  end
end

if think_ms > 0 then
  -- wrk waits delay() ms before sending a connection's next request.
  function delay()
    return -think_ms * math.log(1 - math.random())
  end
end

function init(args)
  escort_started = now()
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 100000)
  if #specs > 1 then
    for i, s in ipairs(specs) do
      prepared[i] = wrk.format("POST", s.path, s.headers, slurp(s.file))
    end
  end
end

-- Globals, so that done() can read them from each thread with thread:get().
escort_statuses, escort_bad, escort_answers = {}, 0, 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function response(status, headers, body)
  escort_statuses[status] = (escort_statuses[status] or 0) + 1
  escort_answers = escort_answers + 1
  -- A 2xx must carry a classification: V2 `probabilities` or v1 `predictions`.
  if status < 300 and not (body:find("probabilities", 1, true) or
                           body:find("predictions", 1, true)) then
    escort_bad = escort_bad + 1
  end
  if budget > 0 and escort_answers == budget then
    escort_stopped = now()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local statuses, bad = {}, 0
  local first, last, all_stopped = nil, nil, #threads > 0
  for _, t in ipairs(threads) do
    local started, stopped = t:get("escort_started"), t:get("escort_stopped")
    if started and stopped then
      first = first and math.min(first, started) or started
      last = last and math.max(last, stopped) or stopped
    else
      all_stopped = false
    end
    for code, count in pairs(t:get("escort_statuses") or {}) do
      statuses[tostring(code)] = (statuses[tostring(code)] or 0) + count
    end
    bad = bad + (t:get("escort_bad") or 0)
  end
  local codes = {}
  for code, count in pairs(statuses) do
    codes[#codes + 1] = string.format('"%s":%d', code, count)
  end
  local e = summary.errors
  local p = function(q) return latency:percentile(q) / 1e6 end
  -- Every thread spent its budget: the run lasted until the last one stopped.
  local duration = summary.duration / 1e6
  if all_stopped and first and last then duration = last - first end
  io.write(string.format(
    '@MARKER@{"requests":%d,"duration_s":%.6f,"budget_reached":%s,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d,"bad_answer":%d},' ..
    '"statuses":{%s},"latency_s":{"p50":%.9f,"p90":%.9f,"p95":%.9f,"p99":%.9f,' ..
    '"mean":%.9f,"max":%.9f}}\n',
    summary.requests, duration, tostring(all_stopped), summary.bytes,
    e.connect, e.read, e.write, e.timeout, e.status, bad,
    table.concat(codes, ","), p(50), p(90), p(95), p(99), latency.mean / 1e6, latency.max / 1e6))
end
