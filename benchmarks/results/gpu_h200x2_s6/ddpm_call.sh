#!/bin/bash
# Session-6 DDPM call: the layer-library search alone on GPU 0; U-Net 10k rows, 4 streams on GPU 1.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD QSEARCH_ZOO=$PWD/.gpu/zoo PYTHONUNBUFFERED=1
R=/tmp/r; mkdir -p $R; U=benchmarks/recipes/unet_ptq; LIMIT=${LIMIT:-555}
rows() { local gpu=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout $((LIMIT - SECONDS)) python benchmarks/run_recipes.py "$@" --variant fp16 --out $R/$name.jsonl > $R/$name.log 2>&1; }
CUDA_VISIBLE_DEVICES=0 timeout $((LIMIT - SECONDS)) python benchmarks/search_study.py --space spaces/ddpm-cifar10-library.yaml \
  --out $R/search-library --variant fp16 --n-samples 1000 --audit 2 --trials 100 --max-minutes ${SEARCH_MIN:-7.0} > $R/search.log 2>&1 &
rows 1 u1 $U/w4a8_tfmq_dm.yaml $U/w4a8_qdiffusion.yaml $U/w8a8_ptqd.yaml &
rows 1 u2 $U/w4a8_eda_dm.yaml $U/w4a8_ptq4dm.yaml $U/w8a8_tfmq_dm.yaml &
rows 1 u3 $U/w4a8_d2dpm_det.yaml $U/w4a8_eda_dm_fbr.yaml $U/w8a8_qdiffusion.yaml &
rows 1 u4 $U/w4a6_ptqd.yaml $U/w4a6_eda_dm_fbr.yaml $U/w8a8_eda_dm.yaml &
wait
tar czf $OUT/ddpm_s6.tgz -C $R .
for f in $R/*.log; do echo "== $f"; tail -4 $f; done
