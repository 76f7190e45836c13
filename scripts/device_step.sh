#!/usr/bin/env bash
# One call of a GPU device session (docs/gpu.md, "Reproducing the tables"), so that each `run` is one short line.
# Back to back on one warm machine, `carry` in brackets (the weight parts as scripts/pack_for_device.sh
# cut them to fit each 64 MiB call beside the repo; every step keeps any part it carries):
#   [.gpu/p1, .gpu/tok, .gpu/wa]  bash scripts/device_step.sh unpack p1
#   [.gpu/p2, .gpu/wb]            bash scripts/device_step.sh unpack p2
#   [.gpu/wc]                     bash scripts/device_step.sh part
#   [.gpu/wd]                     bash scripts/device_step.sh tier  (joins the parts, runs the quality tier)
#   []                  bash scripts/device_step.sh conformance  (the tiny checkpoints against the CPU
#                       reference; needs the wheels and the tokenizer only: may follow `unpack p2` in
#                       its call, `... unpack p2 && bash scripts/device_step.sh conformance`)
#   []                  bash scripts/device_step.sh flex [--variants 1]  (the attention and gather A/Bs)
#   []                  bash scripts/device_step.sh 7b|34b [more bench_ttft.py options]
# Each step tees its log into $OUT and ends inside the call's 600 s, so a long run still returns it.
# The 7b/34b runs need a tokenizer: the weights (after `tier`) or, for timings alone, `.gpu/tok`
# (device_env.sh links it where the dummy-weight folders look): [.gpu/p1, .gpu/tok] unpack p1;
# [.gpu/p2] unpack p2; 7b.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
steps="unpack p1|p2, part, tier, conformance, flex, 7b or 34b"
step=${1:-}
case $step in
  unpack | part | tier | conformance | flex | 7b | 34b) shift; mkdir -p "$OUT" /root/site /root/wx ;;
  *) echo "device_step.sh: unknown step '$step' ($steps)" >&2; exit 2 ;;
esac
for part in .gpu/w?/part; do  # a carried weight part (.gpu/wX/part): keep it as /root/wx/X for the tier
  if [ -f "$part" ]; then cp "$part" "/root/wx/${part:6:1}"; fi
done
case $step in
  unpack)
    python3 -c "import tarfile,sys; tarfile.open(sys.argv[1],'r:xz').extractall('/root/site',filter='fully_trusted')" \
      ".gpu/$1/$1.tar.xz"
    # a carried tokenizer (timings without weights) goes where device_env.sh looks for SmolLM2
    if [ -d .gpu/tok ]; then mkdir -p /root/smol && cp .gpu/tok/* /root/smol/; fi ;;
  part) ;;
  tier)
    mkdir -p /root/smol && cat /root/wx/* | xz -d | tar -x -C /root/smol
    source scripts/device_env.sh
    KVBLEND_GPU_MODEL=/root/smol KVBLEND_GPU_OUT="$OUT/q" timeout 540 \
      python3 -m pytest -m gpu tests/gpu/test_gpu_quality.py -rs -q 2>&1 | tee "$OUT/tier.log" ;;
  conformance)  # rows print as each checkpoint is scored; OUT/c/conformance/ keeps the CSV of every wave done
    source scripts/device_env.sh
    KVBLEND_GPU_OUT="$OUT/c" timeout "${CONFORMANCE_TIMEOUT:-540}" \
      python3 -m pytest -m gpu tests/gpu/test_conformance.py -rs -q 2>&1 | tee "$OUT/conformance.log" ;;
  flex)
    source scripts/device_env.sh
    timeout 560 python3 scripts/bench_attention.py "$OUT/flex.json" "$@" 2>&1 | tee "$OUT/flex.log" ;;
  7b | 34b)
    source scripts/device_env.sh
    if [ "$step" = 7b ]; then size=(--store-gb 6 --profile 32768); else size=(--store-gb 12 --cpu-gb 16); fi
    timeout 570 python3 scripts/bench_ttft.py --shape "$step" --out "$OUT/r$step" --paths fast,upstream \
      --one-at-a-time "${size[@]}" "$@" 2>&1 | tee "$OUT/run_$step.log" ;;
esac
