import sys, collections, re
incl = collections.Counter(); self_ = collections.Counter(); total = 0
for line in open(sys.argv[1]):
    line = line.rstrip()
    if not line: continue
    stack, n = line.rsplit(" ", 1); n = int(n); total += n
    frames = stack.split(";")
    short = [re.sub(r" \((.*/)?([^/]+)\)", r" (\2)", f) for f in frames]
    for f in set(short): incl[f] += n
    self_[short[-1]] += n
print("total samples", total)
print("-- inclusive"); [print(f"{c:5d} {100*c/total:5.1f}% {f}") for f, c in incl.most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 40)]
print("-- self"); [print(f"{c:5d} {100*c/total:5.1f}% {f}") for f, c in self_.most_common(20)]
