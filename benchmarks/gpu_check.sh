#!/usr/bin/env bash
# The GPU check, prepared on CPU to run once on a lent H100/H200 machine in under 8 minutes:
#   1. installs what the machine's image lacks (wandb, jsonargparse, ...) from carried wheels in ./wheels;
#   2. unpacks the carried data (cifar10-jpeg.tar.gz and mnist.tar.gz, if present) into $DATA;
#   3. runs the tests marked gpu (resident data on the device, bf16, compile, deterministic mode);
#   4. runs the throughput benchmark (assignment loop, bare loops, fit) on the card;
#   5. trains the GPU recipes (configs cifar10_gpu and mnist_gpu) and reads their run reports;
# and writes every figure to $OUT/gpu_results.md. `--dry-run` does the same on any machine with tiny settings,
# so the script is exercised by the test suite (tests/test_gpu.py) and cannot rot.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine: OUT=$OUT (the device tool's folder)
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: DATA=<fake data root> OUT=<folder>
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-gpu_results}
DATA=${DATA:-data}
mkdir -p "$OUT" "$DATA"
RESULTS="$OUT/gpu_results.md"
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true

say() { echo "$*" | tee -a "$RESULTS"; }
: > "$RESULTS"
say "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)$([ $DRY = 1 ] && echo ' (dry run)')"
say ""
say '```'
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi") | tee -a "$RESULTS"
python -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" | tee -a "$RESULTS"
say '```'

# 1. what the image lacks, from carried wheels (no network there)
if [ -d wheels ] && [ $DRY = 0 ]; then
  pip install --quiet --no-index --find-links wheels wandb jsonargparse[signatures] torchmetrics lightning
  pip install --quiet --no-deps --no-build-isolation -e .
fi

# 2. the carried data
for archive in cifar10-jpeg.tar.gz mnist.tar.gz; do
  [ -f "$archive" ] && tar xzf "$archive" -C "$DATA"
done

# 3. the tests marked gpu (they skip cleanly without CUDA)
say ""
say "## Tests marked gpu"
say '```'
python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tail -5 | tee -a "$RESULTS"
say '```'

# 4. throughput: assignment loop, bare loops, fit (in one invocation)
say ""
say "## Throughput"
if [ $DRY = 1 ]; then BENCH=(--batches 3 --repeats 1 --workers 0); else BENCH=(--batches 300 --repeats 3 --workers 8); fi
python benchmarks/train_throughput.py --data-dir "$DATA" "${BENCH[@]}" 2>&1 | tail -15 | tee -a "$RESULTS"

# 5. the GPU recipes, timed by their run reports
say ""
say "## Recipes"
say "| config | test acc | train seconds | of which first step (compile) | fit seconds | train images/s | precision |"
say "|---|---:|---:|---:|---:|---:|---|"
for config in mnist_gpu cifar10_gpu; do
  extra=()
  [ $DRY = 1 ] && extra=(--trainer.max_epochs 1 --trainer.limit_train_batches 2 --trainer.limit_val_batches 1 --trainer.limit_test_batches 1)
  python -m lightning_cnn fit --config "$config" --data.data_dir "$DATA" --trainer.enable_progress_bar false \
    --trainer.default_root_dir "$OUT/runs/$config" "${extra[@]}" > "$OUT/$config.log" 2>&1 || say "| $config | FAILED (see $config.log) | | | | | |"
  python - "$OUT/runs/$config/latest/summary.json" "$config" <<'PY' | tee -a "$RESULTS"
import json, sys
from pathlib import Path
path, config = Path(sys.argv[1]), sys.argv[2]
if path.is_file():
    s = json.loads(path.read_text())
    acc = s.get("test", {}).get("test/acc")
    print(f"| {config} | {100 * acc:.2f}% | {s['train_seconds']} | {s['first_step_seconds']} | {s['fit_seconds']} | "
          f"{s['train_images_per_second']:,.0f} | {s['precision']} |" if acc is not None else f"| {config} | no test |")
PY
done
echo "Wrote $RESULTS"
