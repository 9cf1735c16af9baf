#!/bin/bash
# Session-7 DDPM call: U-Net table rows from a shared queue, STREAMS processes per GPU, one process per row.
# Usage: [STREAMS=6 THREADS=32 PROFILE=1 LIMIT=565] ddpm_queue.sh QUEUE_FILE  (lines "STEPS RECIPE_NAME", longest first). A stream takes the first row whose
# estimated seconds still fit before LIMIT, so no row is started that the call's time limit would kill.
set -u; QUEUE=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD QSEARCH_ZOO=$PWD/.gpu/zoo PYTHONUNBUFFERED=1
# 10-12 processes on 32 cores: bound their CPU threads (calibration is launch-bound; 32 threads each thrash)
export OMP_NUM_THREADS=${THREADS:-32} MKL_NUM_THREADS=${THREADS:-32}
R=/tmp/r; rm -rf $R; mkdir -p $R; U=benchmarks/recipes/unet_ptq; LIMIT=${LIMIT:-565}; STREAMS=${STREAMS:-6}
cp $QUEUE $R/queue.txt; : > $R/started.txt
nvidia-smi --query-gpu=name,memory.used --format=csv
pop() {  # the first queued row that fits in the time left (estimates: seconds under STREAMS-way sharing)
  flock $R/queue.lock python3 - "$R/queue.txt" $((LIMIT - SECONDS)) <<'PY'
import sys
path, left = sys.argv[1], int(sys.argv[2])
rows = [l.split() for l in open(path) if l.strip()]
est = lambda steps, name: {("50", True): 120, ("100", True): 220, ("50", False): 350, ("100", False): 520}[steps, "rtn" in name]
for i, (steps, name) in enumerate(rows):
    if est(steps, name) <= left:
        open(path, "w").writelines(" ".join(r) + "\n" for r in rows[:i] + rows[i + 1:])
        print(steps, name); break
PY
}
stream() { local gpu=$1 k=$2 row
  while row=$(pop) && [ -n "$row" ]; do set -- $row
    echo "$SECONDS gpu$gpu s$k $row" >> $R/started.txt
    CUDA_VISIBLE_DEVICES=$gpu timeout $((LIMIT - SECONDS)) python benchmarks/run_recipes.py $U/$2.yaml --steps $1 \
      --variant fp16 --out $R/s$k.jsonl >> $R/s$k.log 2>&1
  done; }
NGPU=$(nvidia-smi -L | wc -l)  # one or two GPUs, whichever kind was lent
[ "$NGPU" -gt 1 ] && for k in $(seq 1 $STREAMS); do stream 1 b$k & done
if [ "${PROFILE:-1}" = 1 ]; then CUDA_VISIBLE_DEVICES=0 timeout 120 python benchmarks/profile_sampling.py $U/w4a8_rtn.yaml \
  --variant fp16 --out $R/profile.json > $R/profile.log 2>&1; fi
for k in $(seq 1 $STREAMS); do stream 0 a$k & done
wait
nvidia-smi --query-gpu=name,memory.used --format=csv
tar czf $OUT/ddpm_s7.tgz -C $R .
cat $R/profile.json 2>/dev/null; cat $R/started.txt; echo "left in queue:"; cat $R/queue.txt
for f in $R/s*.log; do echo "== $f"; grep -v Warning $f | tail -3; done
