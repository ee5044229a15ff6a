# Per-process CPU (ticks of 10 ms, per ~1 s sample) while a command runs: python cpu_series.py CMD...
import subprocess, sys, time, os, collections
cmd = sys.argv[1:]
proc = subprocess.Popen(cmd, stdout=open("/tmp/s7/watch_cmd.log", "w"), stderr=subprocess.STDOUT)
series = []  # (t, {pid: ticks})
names = {}
def snap():
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit(): continue
        try:
            cl = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            if "llmesh" not in cl and "envoy" not in cl: continue
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            out[int(p)] = int(f[11]) + int(f[12])
            names[int(p)] = cl
        except OSError:
            pass
    return out
t0 = time.time()
while proc.poll() is None:
    series.append((time.time() - t0, snap()))
    time.sleep(0.25)
# active window: executor ticks rising after startup -> find by the total of all; print per-second deltas
pids = sorted({p for _, s in series for p in s})
short = {}
for p in pids:
    n = names[p]
    for key, label in (("mesh.xds", "xds"), ("envoy -c", "envoy"), ("services.executor", "executor"),
                       ("services.scheduler", "scheduler"), ("services.router", "router"),
                       ("services.tokenizer", "tokenizer"), ("services.kvcache", "kvcache"),
                       ("collector", "collector"), ("bench offline", "client"), ("cpu_series", "watcher")):
        if key in n: short[p] = label; break
    else: short[p] = n[:12]
print("t   " + " ".join(f"{short[p]:>9}" for p in pids))
prev = series[0]
for t, s in series[4::4]:
    print(f"{t:4.1f} " + " ".join(f"{s.get(p,0)-prev[1].get(p,0):9d}" for p in pids))
    prev = (t, s)
