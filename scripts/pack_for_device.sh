#!/usr/bin/env bash
# Packs what a device session carries, beside vLLM's two archives (../shared/gpu/stage-vllm.sh ->
# .gpu/p1, .gpu/p2), each call under the 64 MiB limit together with the repo:
#   .gpu/tok           SmolLM2's tokenizer files (what the dummy-weight 7B/34B folders borrow)
#   .gpu/wa, wb, ...   SmolLM2 in bf16 (real weights, for quality), xz-packed and cut so that wa
#                      rides with p1 + tok, wb with p2, and the rest one per call (the last with the tier)
# On the device: cat /root/wx/* | xz -d | tar -x -C /root/smol (docs/gpu.md, "Reproducing the tables").
# Re-run it when the repo grows: the cuts leave MARGIN bytes (default 1 MB) for later commits.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .gpu/tok && cp .cache/smollm2-f32/{tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/tok/
[ -f .gpu/smol/model/model.safetensors ] || "$PY" -m helpers.embedded.model --bf16 .gpu/smol/model
[ -f .gpu/smol.tar.xz ] || tar -cf - -C .gpu/smol/model . | xz -6 -T2 > .gpu/smol.tar.xz
"$PY" - <<'PY'
import glob, os, shutil, string, subprocess
limit, margin = 64 << 20, int(os.environ.get("MARGIN", 1_000_000))
repo = sum(os.path.getsize(f) for f in subprocess.run(
    ["git", "ls-files", "--cached", "--others", "--exclude-standard"], capture_output=True, text=True,
    check=True).stdout.splitlines() if os.path.isfile(f))


def size(*dirs):  # bytes a call carries for these .gpu folders
    return sum(os.path.getsize(f) for d in dirs for f in glob.glob(f".gpu/{d}/*"))


free = limit - margin - repo
data = open(".gpu/smol.tar.xz", "rb").read()
for old in glob.glob(".gpu/w?"):
    shutil.rmtree(old)
start, rooms = 0, [free - size("p1", "tok"), free - size("p2")]
for name in string.ascii_lowercase:
    room = rooms.pop(0) if rooms else free
    end = min(len(data), start + max(room, 0))
    os.makedirs(f".gpu/w{name}")
    open(f".gpu/w{name}/part", "wb").write(data[start:end])
    print(f".gpu/w{name}/part: {end - start:,} bytes")
    if (start := end) == len(data):
        break
PY
