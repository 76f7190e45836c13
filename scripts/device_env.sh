# Sourced by device commands (see docs/gpu.md, "Reproducing the tables"): the environment every vLLM process on the
# lent GPU machine needs (../shared/gpu/NOTES.md), with the wheels unpacked in /root/site, and the
# tokenizer the dummy-weight 7B/34B folders borrow, taken from the carried SmolLM2 weights in
# /root/smol (or carried on its own as .gpu/tok, see scripts/pack_for_device.sh). The launcher adds
# the telemetry and kernel switches itself (helpers/gpu/launch.py: BASE_ENV).
export PYTHONPATH=/root/site HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 KVBLEND_SHARE_GPU=1 \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p .cache
if [ -d /root/smol ]; then ln -sfn /root/smol .cache/smollm2-f32; elif [ -d .gpu/tok ]; then ln -sfn "$PWD/.gpu/tok" .cache/smollm2-f32; fi
