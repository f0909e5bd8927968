#!/usr/bin/env bash
# The distributed bench matrix on a 2-GPU machine: each strategy on 1 and on 2 GPUs, then the
# 2-GPU adapter loaded and merged on one GPU. Usage: bench/run_dist.sh [ddp fsdp zero2 zero3]
# Results are appended to $OUT/dist.jsonl and $OUT/merge_check.jsonl (default bench/results/).
set -uo pipefail
OUT=${OUT:-bench/results}; mkdir -p "$OUT"
STEPS1=${STEPS1:-25}; STEPS2=${STEPS2:-120}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
tags=("$@"); [ ${#tags[@]} -gt 0 ] || tags=(ddp fsdp zero2 zero3)
for tag in "${tags[@]}"; do
  case $tag in
    ddp|fsdp) args="--strategy $tag" ;;
    zero2|zero3) args="--strategy deepspeed --zero-stage ${tag#zero}" ;;
  esac
  for n in 1 2; do
    steps=$([ "$n" = 1 ] && echo "$STEPS1" || echo "$STEPS2")
    timeout 400 python3 -m torch.distributed.run --standalone --nproc-per-node "$n" bench/dist_bench.py $args \
      --steps "$steps" --workdir "/tmp/db-$tag-$n" --out "$OUT/dist.jsonl" > "/tmp/db-$tag-$n.log" 2>&1
    echo "$tag x$n: exit $?"; grep -E '^\{' "/tmp/db-$tag-$n.log" || tail -25 "/tmp/db-$tag-$n.log"
  done
  python3 bench/dist_bench.py --merge-check "/tmp/db-$tag-2/adapter" 2>&1 | grep -E '^\{|Error' | tail -3 \
    | tee -a "$OUT/merge_check.jsonl"
done
