# Service-level A/B at the 8B shape (issue 18): head (d781d45) vs main before the prefill work.
# Sourced from the repo root on the device. Everything lands in /tmp/res, tarred into $OUT after each step.
R=/tmp/res; mkdir -p $R
pack() { tar czf $OUT/results.tgz -C /tmp res; }
left() { echo $(( ${LIMIT:-585} - SECONDS )); }
date -u +%FT%TZ | tee $R/date.txt
source .stage_prefill/setup.sh > $R/setup.log 2>&1 || { cat $R/setup.log; pack; return 1; }
cat $R/setup.log; nvidia-smi > $R/nvidia-smi.txt 2>&1; pack
COMMON="--sizes 8b --models-dir $MODELS --methods none,ngram --modes batch1,burst --concurrency 32 --batch1-repeats 3"
step() {  # tree path prompts budget hardcap
  local tree=$1 path=$2 prompts=$3 b=$4 cap=$5 t
  t=$(left); [ $t -lt 60 ] && { echo "SKIP $tree $path ($t s left)"; return; }
  [ $t -gt $cap ] && t=$cap
  [ ! -f $MODELS/llama-3.1-8b/config.json ] && { echo "model missing"; return; }
  echo "=== $tree $path $prompts start $(date +%T) at ${SECONDS}s, timeout $t"
  (cd $ROOT/.stage_prefill/$tree && timeout $t python3 -m bench.service_decode $COMMON --paths $path --prompts $prompts --budget-s $b --out $R/${tree}_$path.json > $R/${tree}_$path.log 2>&1); echo "$tree $path rc=$? $(date +%T) at ${SECONDS}s"
  tail -14 $R/${tree}_$path.log; pack
}
