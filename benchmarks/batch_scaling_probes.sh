#!/usr/bin/env bash
# Run from anywhere: bash benchmarks/batch_scaling_probes.sh
# Grid-edge probes of the batch-scaling suite: one step past the edge of each grid whose best
# point sat on it, seed 0 (the tuning seed), everything else as in the suite. The run folders go
# to the git-ignored benchmarks/results/batch_scaling/probes/; their outcomes are recorded under
# "probes" in benchmarks/results/batch_scaling/results.json.
set -u
cd "$(dirname "$0")/.."  # the repository root
BASE="model=cnn1d data=mnist1d data.num_samples=200000 trainer.max_micro_batch=4096 trainer.eval_every=5 trainer.log_every=5 trainer.threads=2 trainer.lr_schedule.warmup_steps=5 trainer.target.metric=eval_accuracy trainer.target.value=0.9 trainer.seed=0 logger=none trainer.progress=false data.progress=false"
cap() { case $1 in 256|1024) echo 1500;; 4096) echo 600;; 16384) echo 300;; 32768) echo 200;; esac; }
probe() { # name batch overrides...
  local name=$1 b=$2; shift 2
  local dir=benchmarks/results/batch_scaling/probes/$name/batch_size$b
  mkdir -p "$(dirname "$dir")"
  echo "probe $name b=$b: $*"
  .venv/bin/python -m secondorder.train $BASE data.batch_size=$b trainer.max_steps=$(cap $b) "$@" "trainer.run_dir=$dir" > "$dir.log" 2>&1
  python3 -c "import json;s=json.load(open('$dir/summary.json'));print('  ->',s['steps_to_target'],s['steps'])"
}
probe lars_lr30 256 optimizer=lars optimizer.lr=30.0
probe lars_lr30 1024 optimizer=lars optimizer.lr=30.0
probe adamw_lr0.1 4096 optimizer=adamw optimizer.lr=0.1
probe adamw_lr0.1 32768 optimizer=adamw optimizer.lr=0.1
probe lamb_lr0.1 4096 optimizer=lamb optimizer.lr=0.1
probe lamb_lr0.1 32768 optimizer=lamb optimizer.lr=0.1
probe kfac_lr0.01 4096 optimizer=kfac optimizer.factor_update_every=1 optimizer.inverse_update_every=5 optimizer.lr=0.01
probe kfac_lr0.01 32768 optimizer=kfac optimizer.factor_update_every=1 optimizer.inverse_update_every=5 optimizer.lr=0.01
