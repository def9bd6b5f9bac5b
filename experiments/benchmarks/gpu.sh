#!/usr/bin/env bash
# One script for a GPU machine: seed scaling, step times, memory per seed and a small
# lottery run, all written into one directory. About 10 minutes on one H200.
#
#   bash experiments/benchmarks/gpu.sh                 # writes to $OUT if set, else runs/gpu
#   QUICK=1 bash experiments/benchmarks/gpu.sh         # tiny sizes: checks the script on a CPU
#   bash experiments/benchmarks/gpu.sh --quick         # the same
#
# Needs lottojax's dependencies with a CUDA jaxlib (pip install -e . "jax[cuda12]");
# the repository's src/ is put on PYTHONPATH, so no install of lottojax itself is needed.
# Outputs in the directory:
#   gpu_bench.json     per-seed cost at 1/8/64/512 vmapped seeds (LeNet-300-100, Conv-2),
#                      XLA memory per seed, Conv-2 / ResNet-20 step times (native conv vs patches)
#   lottery/           the IMP run of experiments/lottery.py --seed-strategy vmap (small config)
#   nvidia-smi.txt, env.txt, log.txt, timings.txt
set -uo pipefail

QUICK="${QUICK:-0}"
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    *) echo "unknown argument: $arg (use --quick or QUICK=1)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="${OUT:-$ROOT/runs/gpu}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export LOTTOJAX_CACHE="${LOTTOJAX_CACHE:-$DIR/cache}"
PYTHON="${PYTHON:-python}"

exec > >(tee -a "$DIR/log.txt") 2>&1
echo "gpu.sh: quick=$QUICK, writing to $DIR, started $(date -Is)"
{ command -v nvidia-smi >/dev/null && nvidia-smi || echo "no nvidia-smi"; } > "$DIR/nvidia-smi.txt" 2>&1
"$PYTHON" -c "import jax, sys; print('python', sys.version.split()[0]); print('jax', jax.__version__); print(jax.devices())" > "$DIR/env.txt" 2>&1
cat "$DIR/env.txt"

status=0
timed() {  # timed NAME COMMAND...: runs it, appends "NAME rc seconds" to timings.txt
  local name="$1"; shift
  local start end rc
  start=$(date +%s)
  "$@"; rc=$?
  end=$(date +%s)
  echo "$name rc=$rc $((end - start)) s" | tee -a "$DIR/timings.txt"
  [ "$rc" -eq 0 ] || status=1
}

if [ "$QUICK" = "1" ]; then
  timed bench "$PYTHON" experiments/benchmarks/gpu_bench.py --quick --out "$DIR"
  timed lottery "$PYTHON" experiments/lottery.py --seed-strategy vmap --seeds 2 --rounds 1 \
    --num-steps 20 --eval-every 10 --out "$DIR/lottery"
else
  timed bench "$PYTHON" experiments/benchmarks/gpu_bench.py --out "$DIR"
  # MNIST-1D MLP (generated locally, no download), 8 seeds in one vmapped program, 5 levels.
  timed lottery "$PYTHON" experiments/lottery.py --seed-strategy vmap --seeds 8 --rounds 4 \
    --num-steps 3000 --eval-every 100 --out "$DIR/lottery"
fi

echo "gpu.sh: finished $(date -Is), status $status; results in $DIR"
exit $status
