nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
timeout 330 python3 benchmarks/bench_model.py --device cuda --tasks train --modes no_grad --precisions fp32,bf16 --channels-last --reps 5 --warmup 3 --json $OUT/bench_gpu.json 2>&1 | tee $OUT/bench_gpu.txt | tail -30
