#!/usr/bin/env python3
"""Exchange latency and broker CPU per exchange, against a running `ephemera serve --dev`.

A smoke measurement until scripts/bench exists (issue 7): sequential exchanges over one
keep-alive connection, latency percentiles from the client, and the broker's own CPU time per
exchange from /proc (utime + stime), so the number does not depend on the client's speed.

    target/release/ephemera serve --dev &
    scripts/exchange-latency.py [--n 3000] [--pid PID]
"""
import argparse, http.client, json, os, statistics, subprocess, time

def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--pid", type=int, help="broker pid (default: pgrep 'ephemera serve')")
    a = ap.parse_args()
    pid = a.pid or int(subprocess.check_output(["pgrep", "-f", "ephemera serve"]).split()[0])
    conn = http.client.HTTPConnection(a.host, a.port)
    # Replay protection: a token serves one exchange per policy, so each exchange gets its own
    # token, fetched before the timed loop.
    tokens = []
    for _ in range(a.n + 200):
        conn.request("POST", "/dev/token", body="{}")
        tokens.append(conn.getresponse().read().decode().strip())
    headers = lambda t: {"Authorization": f"Bearer {t}", "Content-Type": "application/json"}
    body = json.dumps({"policy": "dev"})
    for t in tokens[a.n:]:  # warm-up
        conn.request("POST", "/v1/exchange", body=body, headers=headers(t))
        conn.getresponse().read()
    lat = []
    cpu0 = cpu_seconds(pid)
    t0 = time.perf_counter()
    for t in tokens[: a.n]:
        s = time.perf_counter()
        conn.request("POST", "/v1/exchange", body=body, headers=headers(t))
        r = conn.getresponse()
        r.read()
        assert r.status == 201, r.status
        lat.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1e6
    print(f"exchanges: {a.n} sequential, one keep-alive connection, {a.n / wall:.0f}/s")
    print(f"latency µs: p50 {q(0.50):.0f}  p90 {q(0.90):.0f}  p99 {q(0.99):.0f}  mean {statistics.mean(lat) * 1e6:.0f}")
    print(f"broker CPU per exchange: {cpu / a.n * 1e6:.0f} µs (utime+stime over the run)")

if __name__ == "__main__":
    main()
