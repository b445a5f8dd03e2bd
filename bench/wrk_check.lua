-- wrk's script for the benchmark (bench/loadgen.py runs it): one Check-shaped request per
-- pre-signed subject token, counting what completes inside the measured window.
--
--   wrk -t T -c C -d D -s bench/wrk_check.lua http://127.0.0.1:PORT/ -- \
--       TOKENS_FILE MODE BEGIN_NS END_NS METHOD PATH HOST
--
-- TOKENS_FILE: one token per line. MODE "repeat" cycles them (warm: cached after first use);
-- "fresh" sends each once (cold) and counts every request sent before END_NS that had to reuse
-- one ("reused": then the cold figure is invalid). Threads take every T-th token, so two
-- threads never share one. BEGIN_NS/END_NS are CLOCK_MONOTONIC nanoseconds (Python's
-- time.monotonic_ns()): only responses completing inside [BEGIN_NS, END_NS) are counted, and
-- only a 200 counts as completed; everything before BEGIN_NS is warm-up. The parent stops wrk
-- with SIGINT just after END_NS; done() prints one line "BENCH-RESULT {json}".
--
-- The requests are built once, before the run: request() only hands out the next string.

local ffi = require("ffi")
ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]])
local CLOCK_MONOTONIC = 1
local ts = ffi.new("bench_timespec")

local function now_ns()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1e9 + tonumber(ts.tv_nsec)
end

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  local file, nthreads = args[1], #threads
  fresh = args[2] == "fresh"
  begin_ns, end_ns = tonumber(args[3]), tonumber(args[4])
  local head = args[5] .. " " .. args[6] .. " HTTP/1.1\r\nHost: " .. args[7] ..
      "\r\nAccept: */*\r\nAuthorization: Bearer "
  if nthreads == 0 then nthreads = 1 end
  reqs = {}
  local i = 0
  for line in io.lines(file) do
    if line ~= "" then
      if i % nthreads == (tid or 0) then
        reqs[#reqs + 1] = head .. line .. "\r\n\r\n"
      end
      i = i + 1
    end
  end
  pool, sent, ok, bad, reused, first_ns = #reqs, 0, 0, 0, 0, 0
  codes = {}
  codes_text = ""
end

function request()
  sent = sent + 1
  if sent > pool and fresh and now_ns() < end_ns then
    reused = reused + 1
  end
  return reqs[(sent - 1) % pool + 1]
end

function response(status, headers, body)
  local t = now_ns()
  if first_ns == 0 then first_ns = t end
  if t >= begin_ns and t < end_ns then
    if status == 200 then
      ok = ok + 1
    else
      bad = bad + 1
      codes[status] = (codes[status] or 0) + 1
      local parts = {}
      for code, n in pairs(codes) do parts[#parts + 1] = '"' .. code .. '":' .. n end
      codes_text = table.concat(parts, ",")
    end
  end
end

function done(summary, latency, requests)
  local total = {ok = 0, bad = 0, reused = 0, pool = 0, sent = 0}
  local first, codes_all = nil, {}
  for _, thread in ipairs(threads) do
    for key, _ in pairs(total) do total[key] = total[key] + (thread:get(key) or 0) end
    local f = thread:get("first_ns") or 0
    if f > 0 and (first == nil or f > first) then first = f end  -- the last thread to start
    local text = thread:get("codes_text") or ""
    if text ~= "" then codes_all[#codes_all + 1] = text end
  end
  local e = summary.errors
  local statuses = ""
  if #codes_all > 0 then statuses = "{" .. table.concat(codes_all, "},{") .. "}" end
  io.write(string.format(
    'BENCH-RESULT {"completed":%d,"not_200":%d,"reused":%d,"pool":%d,"sent":%d,' ..
    '"first_response_ns":%.0f,"statuses":[%s],"socket_errors":{"connect":%d,"read":%d,' ..
    '"write":%d,"timeout":%d},"wrk_requests":%d,"wrk_duration_us":%d,' ..
    '"p50_us":%.1f,"p99_us":%.1f,"mean_us":%.1f}\n',
    total.ok, total.bad, total.reused, total.pool, total.sent, first or 0,
    statuses, e.connect, e.read, e.write, e.timeout,
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean))
end
