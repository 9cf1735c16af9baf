#!/bin/bash
# Session-6 DiT call: compiled export bench alone on GPU 0, then DiT 10k rows; 4 streams on GPU 1. Usage: gpu_s6_dit.sh PHASE
set -u; PHASE=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD QSEARCH_ZOO=$PWD/.gpu/zoo PYTHONUNBUFFERED=1
R=/tmp/r; mkdir -p $R; D=benchmarks/recipes/dit_ptq; LIMIT=${LIMIT:-555}
nvidia-smi --query-gpu=name,memory.used --format=csv
rows() { local gpu=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout $((LIMIT - SECONDS)) python benchmarks/run_recipes.py "$@" --variant fp16 --out $R/$name.jsonl > $R/$name.log 2>&1; }
if [ "$PHASE" = 1 ]; then
  ( CUDA_VISIBLE_DEVICES=0 timeout 300 python benchmarks/export_bench.py --models zoo:dit-cifar10 --out $R/export_compile.jsonl \
      --variant fp16 --compile --configs W8A8-int8 W8A8-fp8 W4 --backends int_mm scaled_mm fake --batch-sizes 1 256 > $R/export_compile.log 2>&1
    rows 0 a5 $D/vidit_q_w4a4.yaml $D/bitsfusion_w3.yaml $D/bitsfusion_w2p5.yaml &
    rows 0 a6 $D/q_dit_w8a8.yaml $D/rtn_w4a4.yaml &
    rows 0 a7 $D/hq_dit_w4a4_fp4.yaml $D/rtn_w4a8.yaml & wait ) &
  rows 1 a1 $D/q_dit_w4a8.yaml $D/rtn_w8a8.yaml &
  rows 1 a2 $D/svdquant_w4a8.yaml $D/ptq4dit_w8a8.yaml &
  rows 1 a3 $D/q_dit_w4a4.yaml $D/ditas_w4a8.yaml &
  rows 1 a4 $D/hq_dit_w8a8_fp8.yaml $D/ditas_w4a4.yaml &
  wait
else
  shift; i=0  # PHASE 2: the recipes named on the command line, spread round-robin over 3 streams per GPU
  declare -a S=("" "" "" "" "" ""); for f in "$@"; do S[$((i % 6))]+=" $D/$f.yaml"; i=$((i + 1)); done
  for k in 0 1 2 3 4 5; do [ -n "${S[$k]}" ] && rows $((k % 2)) b$k ${S[$k]} & done; wait
fi
nvidia-smi --query-gpu=name,memory.used --format=csv
tar czf $OUT/dit_s6_$PHASE.tgz -C $R .
for f in $R/*.log; do echo "== $f"; tail -4 $f; done
