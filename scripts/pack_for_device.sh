#!/usr/bin/env bash
# Packs what a device session carries, beside vLLM's two archives (../shared/gpu/stage-vllm.sh ->
# .gpu/p1, .gpu/p2), each call under the 64 MiB limit together with the repo:
#   .gpu/tok           SmolLM2's tokenizer files (what the dummy-weight 7B/34B folders borrow)
#   .gpu/w{a,b,c,d}    SmolLM2 in bf16 (real weights, for quality), xz-packed and cut so that
#                      wa rides with p1, wb with p2, wc alone and wd with the run
# On the device: cat /root/wx/{a,b,c,d} | xz -d | tar -x -C /root/smol (docs/gpu.md, Reproduce).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .gpu/tok && cp .cache/smollm2-f32/{tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/tok/
[ -f .gpu/smol/model/model.safetensors ] || "$PY" -m helpers.embedded.model --bf16 .gpu/smol/model
[ -f .gpu/smol.tar.xz ] || tar -cf - -C .gpu/smol/model . | xz -6 -T2 > .gpu/smol.tar.xz
"$PY" - <<'PY'
import os, subprocess
limit, margin = 64 << 20, 400_000
repo = sum(os.path.getsize(f) for f in subprocess.run(
    ["git", "ls-files", "--cached", "--others", "--exclude-standard"], capture_output=True, text=True,
    check=True).stdout.splitlines() if os.path.isfile(f))
room = [limit - margin - repo - os.path.getsize(f".gpu/{p}/{p}.tar.xz") for p in ("p1", "p2")]
room.append(limit - margin - repo)
data = open(".gpu/smol.tar.xz", "rb").read()
cuts = [0, room[0], room[0] + room[1], room[0] + room[1] + room[2], len(data)]
for name, a, b in zip("abcd", cuts, cuts[1:]):
    os.makedirs(f".gpu/w{name}", exist_ok=True)
    open(f".gpu/w{name}/part", "wb").write(data[a:b])
    print(f".gpu/w{name}/part: {b - a:,} bytes")
PY
