import collections, sys
path, want = sys.argv[1], sys.argv[2]
tot=collections.Counter(); leaf=collections.Counter(); threads=collections.Counter()
for line in open(path):
    stack, n = line.rstrip().rsplit(" ", 1); n=int(n)
    fr = stack.split(";")
    threads[fr[0][:60]] += n
    if want not in fr[0]: continue
    tot['all'] += n
    key = None
    for f in fr:
        if "llmesh" in f or "/work/main" in f: key = f
    leaf[(key or "")[:100] + " || " + fr[-1][:80]] += n
print(threads)
T = tot['all']; print(want, "samples", T)
for k, n in leaf.most_common(int(sys.argv[3]) if len(sys.argv) > 3 else 25): print(f"{100*n/T:5.1f}% {k}")
