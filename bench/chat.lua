-- wrk script: a non-streaming chat completion with the key from AFR_BENCH_KEY.
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello there"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("AFR_BENCH_KEY") or "none")
