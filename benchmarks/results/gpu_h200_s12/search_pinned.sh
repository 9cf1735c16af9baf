# The pinned-space study after the layer-library fix, alone on one H200, in one device call.
# Writes OUT/search (studies.db, summary JSON, plot) and OUT/search.log. A database carried in .gpu/db
# (the previous call's OUT/search/studies.db) is resumed: the study of the same name continues.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD QSEARCH_ZOO=$PWD/.gpu/zoo PYTHONUNBUFFERED=1
mkdir -p $OUT/search && { [ -f .gpu/db/studies.db ] && cp .gpu/db/studies.db $OUT/search/ || true; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > $OUT/gpu.txt
python3 benchmarks/search_study.py --space spaces/ddpm-cifar10-pinned.yaml --out $OUT/search \
  --variant fp16 --n-samples 1000 --audit 2 --trials 100 --max-minutes ${MAX_MINUTES:-6.5} \
  --set seed_trials.descent_rounds=6 --set sampler_options.crossover_prob=0.1 > $OUT/search.log 2>&1
echo "exit $?" >> $OUT/search.log
