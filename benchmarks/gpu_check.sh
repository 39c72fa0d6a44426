#!/usr/bin/env bash
# The CUDA half of the teacher-engine checks, for a machine with 1 or more GPUs (a few minutes):
#     bash benchmarks/gpu_check.sh            # uses .venv/bin/python; PY=python bash benchmarks/gpu_check.sh
# 1. the equivalence test with NCCL and bf16: the zero3 teacher (and zero3 + CPU offload) against the
#    replicated one, on min(2, GPUs) ranks (two ranks cannot share one GPU under NCCL);
# 2. teacher tokens/s per engine (forward + targets, bf16, batch 8 x 512) on a ~110M-parameter Llama;
# 3. student tokens/s: a short bf16 training run with each teacher engine (metrics.jsonl tokens_per_second).
# Prints one JSON object per figure and a table; record the table in docs/distributed.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d)}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$NGPU" -lt 1 ]; then echo "gpu_check: no CUDA device on this machine" >&2; exit 1; fi
NPROC=$(( NGPU >= 2 ? 2 : 1 ))
export OMP_NUM_THREADS=4 HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export DISTILL_CACHE="$OUT/cache"

echo "== 1. equivalence, NCCL + bf16, $NPROC rank(s) on $NGPU GPU(s)"
$PY -m pytest tests/test_teacher_engines.py -m gpu -q -rs -p no:cacheprovider

echo "== 2. teacher tokens/s"
TEACHER=(teacher.arch.hidden_size=768 teacher.arch.num_layers=12 teacher.arch.num_heads=12
         teacher.arch.max_position_embeddings=512 data.seq_len=512 student.arch.max_position_embeddings=512)
$PY -c "
from distributed_distill import models; from distributed_distill.config import load_config
cfg = load_config('configs/smoke.yaml'); c = models.model_config(cfg.teacher, 512, 'teacher')
models.load_model(cfg.teacher, c, seed=1).save_pretrained('$OUT/tiny-teacher')"
$PY -m torch.distributed.run --nproc_per_node $NPROC --master_port 29690 tests/teacher_worker.py equivalence \
    "$OUT/speed" "$OUT/tiny-teacher" teacher.dtype=bfloat16 "${TEACHER[@]}"

echo "== 3. student tokens/s"
for ENGINE in replicated zero3; do
  $PY -m torch.distributed.run --nproc_per_node $NPROC --master_port 29691 train.py --config configs/smoke.yaml \
      output_dir="$OUT/train-$ENGINE" teacher.engine=$ENGINE teacher.dtype=bfloat16 train.precision=bf16 \
      train.max_steps=30 train.warmup_steps=1 train.micro_batch_size=8 train.eval_batches=2 \
      data.max_documents=400 distill.chunk_size=1024 "${TEACHER[@]}" student.arch.hidden_size=256 \
      student.arch.num_layers=4 student.arch.num_heads=4
done

$PY - "$OUT" "$NPROC" <<'PY'
import json, sys, pathlib, statistics
out, nproc = pathlib.Path(sys.argv[1]), int(sys.argv[2])
import torch
gpu = torch.cuda.get_device_name(0)
rank0 = json.loads((out / "speed" / "rank-0.json").read_text())["engines"]
rows = []
for name, r in rank0.items():
    if name.startswith("arch/"):
        rows.append({"figure": "teacher_tokens_per_second_per_rank", "engine": name[5:], "value": r["tokens_per_second"],
                     "param_ratio": r["local_bytes"] / r["full_bytes"], "max_abs_diff": r["max_abs_diff"]})
for engine in ("replicated", "zero3"):
    m = [json.loads(l) for l in (out / f"train-{engine}" / "metrics.jsonl").read_text().splitlines()]
    rows.append({"figure": "student_tokens_per_second_total", "engine": engine,
                 "value": statistics.median(r["tokens_per_second"] for r in m[5:])})
for r in rows:
    print(json.dumps({"gpu": gpu, "ranks": nproc, **r}))
print(f"\n| figure ({gpu}, {nproc} rank(s), bf16) | replicated | zero3 | zero3 + offload |\n|---|---:|---:|---:|")
t = {r["engine"]: r["value"] for r in rows if r["figure"].startswith("teacher")}
s = {r["engine"]: r["value"] for r in rows if r["figure"].startswith("student")}
print(f"| teacher tokens/s per rank | {t['replicated']:,.0f} | {t['zero3']:,.0f} | {t['zero3_offload']:,.0f} |")
print(f"| student tokens/s, all ranks | {s['replicated']:,.0f} | {s['zero3']:,.0f} | - |")
PY
