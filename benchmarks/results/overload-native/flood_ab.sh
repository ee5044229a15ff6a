#!/usr/bin/env bash
# The overload benchmark with its load generators alternating, 3 rounds at each rate
# (order A B C, C B A, A B C): the gRPC asyncio client ("python"), h2load over HTTP/2
# ("h2load"; Debian's nghttp2-client 1.52.0), and h2load against a gateway limit of
# 100 requests/s ("h2load-gw100"). Tiny model, one replica, interactive class, 64
# tokens, 10 s of flood each.
set -euo pipefail
cd "$(dirname "$0")/../../.."
OUT=benchmarks/results/overload-native/${RUN:-run}; mkdir -p "$OUT"
for rate in 300 900; do
  for round in 1 2 3; do
    if [ $((round % 2)) -eq 1 ]; then order="python h2load h2load-gw100"
    else order="h2load-gw100 h2load python"; fi
    for cfg in $order; do
      case $cfg in
        python) args="--client python" ;;
        h2load) args="--client h2load" ;;
        h2load-gw100) args="--client h2load --gateway-limit 100" ;;
      esac
      echo "== rate $rate round $round $cfg $(date -u +%T)"
      # shellcheck disable=SC2086
      .venv/bin/python -m llmesh.benchmarks.overload --rate "$rate" --duration 10 \
        --max-tokens 64 $args --json "$OUT/rate$rate-r$round-$cfg.json" \
        > "$OUT/rate$rate-r$round-$cfg.out" 2>&1 || echo "   (exit $?)"
    done
  done
done
echo "== done $(date -u +%T)"
