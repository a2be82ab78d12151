#!/usr/bin/env bash
# What the multi-turn path costs beside single-turn rollouts generating the same tokens: GRPO on the embedded tiny
# model, 256 samples a step, single-turn (1 turn of 32 tokens) and multi-turn (2 turns of 16 tokens with a reply
# between them, tests/env_fixtures.py:Countdown), interleaved, REPEATS times each.
# Usage: benchmarks/multi_turn_overhead.sh OUT_DIR [REPEATS]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/multi_turn_overhead.sh OUT_DIR [REPEATS]}
repeats=${2:-2}
mkdir -p "$out"
export PYTHONPATH=$PWD  # the environment class lives in tests/
common=(model.path=tiny://model rollout.max_model_len=128 logging.progress_bar=false --steps 4 --warmup 1)
for ((rep = 0; rep < repeats; rep++)); do
  .venv/bin/rlft bench configs/grpo_tiny.yaml rollout.sampling.max_new_tokens=32 "${common[@]}" \
    --out "$out/single-$rep" > "$out/single-$rep.log" 2>&1
  .venv/bin/rlft bench configs/grpo_tiny.yaml rollout.sampling.max_new_tokens=16 \
    envs.name=tests.env_fixtures:Countdown 'envs.kwargs={turns: 2}' "${common[@]}" \
    --out "$out/multi-$rep" > "$out/multi-$rep.log" 2>&1
  grep -E '^\| (generate|env|update|\*\*step)' "$out/single-$rep/bench.md" "$out/multi-$rep/bench.md"
done
