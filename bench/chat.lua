-- wrk script: a non-streaming chat completion. AFR_BENCH_AUTH, when set, is the whole
-- Authorization header value (e.g. "Bearer afr_..."); bench/run.py sets it per target.
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello there"}]}'
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("AFR_BENCH_AUTH")
if auth and auth ~= "" then
  wrk.headers["Authorization"] = auth
end
