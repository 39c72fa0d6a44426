#!/usr/bin/env bash
# Every CUDA path, for the first machine with 1 or more GPUs (a few minutes on one H100):
#     bash benchmarks/gpu_check.sh            # uses .venv/bin/python; PY=python bash benchmarks/gpu_check.sh
#     PEERS_PY=.venv-peers/bin/python bash benchmarks/gpu_check.sh    # section 6 also times Liger's loss
#     DEVICE=cpu bash benchmarks/gpu_check.sh # the CPU fallback: every section at a tiny size (tests/test_benchmarks.py)
# 1. the equivalence test with NCCL and bf16: the zero3 teacher (and zero3 + CPU offload) against the
#    replicated one, on min(2, GPUs) ranks (two ranks cannot share one GPU under NCCL); CUDA only;
# 2. teacher tokens/s per engine (forward + targets, bf16, batch 8 x 512) on a ~110M-parameter Llama;
# 3. student tokens/s and peak memory: short bf16 training runs with each teacher engine, then on-policy steps
#    (distill.on_policy=0.5), hints (distill.hidden) and, where flash-attn is installed, flash_attention_2;
# 4. teacher samples: `distill generate` tokens/s (benchmarks/generate.py, bf16) against transformers' generate;
# 5. the offline store: `distill precompute` and an offline run reading it;
# 6. the chunked KD loss against Liger's (benchmarks/loss_memory.py --device cuda: fwd+bwd time, peak memory).
# A served teacher (issue 26) is not built yet, so it has no section. Prints one JSON object per figure and a
# table; record the tables in docs/distributed.md and docs/losses.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEERS_PY=${PEERS_PY:-$PY}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$(mktemp -d)}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export DISTILL_CACHE="$OUT/cache"
if [ "$DEVICE" = cuda ]; then
  NGPU=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
  if [ "$NGPU" -lt 1 ]; then echo "gpu_check: no CUDA device on this machine (DEVICE=cpu runs the CPU fallback)" >&2; exit 1; fi
  NPROC=$(( NGPU >= 2 ? 2 : 1 ))
  export OMP_NUM_THREADS=4
  # ~110M-parameter teacher, 512-token rows, bf16 everywhere
  TEACHER=(teacher.arch.hidden_size=768 teacher.arch.num_layers=12 teacher.arch.num_heads=12
           teacher.arch.max_position_embeddings=512 data.seq_len=512 student.arch.max_position_embeddings=512)
  STUDENT=(student.arch.hidden_size=256 student.arch.num_layers=4 student.arch.num_heads=4)
  STEPS=30 BATCH=8 DOCS=400 PRECISION=bf16 TDTYPE=bfloat16 CHAT_LEN=512
  LOSS=(--tokens 8192 --hidden 2048 --vocab 128256 --repeats 3)
  GEN=(--prompts 64 --batch 16 --max-new-tokens 64 --repeats 3 --teacher-hidden 768 --teacher-layers 12)
else
  NGPU=0 NPROC=2
  TEACHER=(teacher.arch.hidden_size=64 teacher.arch.num_layers=2 teacher.arch.num_heads=4
           teacher.arch.max_position_embeddings=64 data.seq_len=32 student.arch.max_position_embeddings=64)
  STUDENT=(student.arch.hidden_size=32 student.arch.num_layers=2 student.arch.num_heads=4)
  STEPS=4 BATCH=2 DOCS=40 PRECISION=fp32 TDTYPE=float32 CHAT_LEN=128
  LOSS=(--tokens 256 --hidden 64 --vocab 4000 --repeats 1)
  GEN=(--prompts 4 --batch 2 --max-new-tokens 4 --repeats 1 --teacher-hidden 32 --teacher-layers 2)
fi
COMMON=(--config configs/smoke.yaml "train.device=$DEVICE" "train.max_steps=$STEPS" train.warmup_steps=1
        "train.micro_batch_size=$BATCH" train.eval_batches=2 "data.max_documents=$DOCS" "teacher.dtype=$TDTYPE"
        "train.precision=$PRECISION" logging.progress=false "${TEACHER[@]}" "${STUDENT[@]}")
LAUNCH=("$PY" -m torch.distributed.run --nproc_per_node "$NPROC")

echo "== 1. equivalence, NCCL + bf16, $NPROC rank(s) on $NGPU GPU(s)"
if [ "$DEVICE" = cuda ]; then
  $PY -m pytest tests/test_teacher_engines.py -m gpu -q -rs -p no:cacheprovider
else
  echo "(CUDA only: tests/test_teacher_engines.py runs the same check with gloo on CPU)"
fi

echo "== 2. teacher tokens/s"
$PY -c "
from distributed_distill import models; from distributed_distill.config import load_config
cfg = load_config('configs/smoke.yaml', ['${TEACHER[0]}', '${TEACHER[1]}', '${TEACHER[2]}', '${TEACHER[3]}'])
c = models.model_config(cfg.teacher, 512, 'teacher')
models.load_model(cfg.teacher, c, seed=1).save_pretrained('$OUT/tiny-teacher')"
"${LAUNCH[@]}" --master_port 29690 tests/teacher_worker.py equivalence "$OUT/speed" "$OUT/tiny-teacher" \
    teacher.dtype=$TDTYPE "${TEACHER[@]}"

echo "== 3. student tokens/s: teacher engines, on-policy steps, hints, flash attention"
run() {  # run NAME [overrides...]: one short training run into $OUT/train-NAME
  local name=$1; shift
  "${LAUNCH[@]}" --master_port 29691 train.py "${COMMON[@]}" output_dir="$OUT/train-$name" "$@"
}
run replicated teacher.engine=replicated
run zero3 teacher.engine=zero3
# chat data: one prompt per row, whole first turns (at least 128 tokens of row even on the CPU fallback)
run on_policy distill.on_policy=0.5 data.packing=false data.source=python-stdlib-chat data.max_documents=400 \
    distill.sampling.max_new_tokens=16 "data.seq_len=$CHAT_LEN" "student.arch.max_position_embeddings=$((CHAT_LEN * 2))" \
    "teacher.arch.max_position_embeddings=$((CHAT_LEN * 2))"
run hints 'distill.hidden.layers=[[0,0],[final,final]]'
FLASH=$($PY -c "import importlib.util as u; print(int(u.find_spec('flash_attn') is not None))")
if [ "$DEVICE" = cuda ] && [ "$FLASH" = 1 ]; then
  run flash student.attn_implementation=flash_attention_2 teacher.attn_implementation=flash_attention_2
else
  echo "(flash_attention_2: flash-attn not installed, or not on CUDA)"
fi

echo "== 4. teacher samples: distill generate against transformers' generate"
$PY benchmarks/generate.py --device "$DEVICE" --dtype $TDTYPE "${GEN[@]}" > "$OUT/generate.txt"
tail -n 8 "$OUT/generate.txt"

echo "== 5. the offline store: precompute, then an offline run"
"${LAUNCH[@]}" --master_port 29692 -m distributed_distill.cli precompute "${COMMON[@]}" output_dir="$OUT/pre" \
    distill.store="$OUT/store" distill.top_k=64
run offline distill.signal=offline distill.store="$OUT/store"

echo "== 6. the chunked KD loss against Liger's"
PATHS=chunked,matmuls
if $PEERS_PY -c "import liger_kernel" 2>/dev/null; then PATHS=chunked,liger,matmuls; fi
$PEERS_PY benchmarks/loss_memory.py --device "$DEVICE" --paths $PATHS "${LOSS[@]}" > "$OUT/loss.txt"
tail -n 6 "$OUT/loss.txt"

$PY - "$OUT" "$NPROC" "$DEVICE" <<'PY'
import json, sys, pathlib, statistics
out, nproc, device = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
import torch
where = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
rank0 = json.loads((out / "speed" / "rank-0.json").read_text())["engines"]
rows = []
for name, r in rank0.items():
    if name.startswith("arch/"):
        rows.append({"figure": "teacher_tokens_per_second_per_rank", "engine": name[5:], "value": r["tokens_per_second"],
                     "param_ratio": r["local_bytes"] / r["full_bytes"], "max_abs_diff": r["max_abs_diff"]})
runs = sorted(p.name[len("train-"):] for p in out.glob("train-*"))
for run in runs:
    m = [json.loads(l) for l in (out / f"train-{run}" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in m if "tokens_per_second" in r]
    rows.append({"figure": "student_tokens_per_second_total", "engine": run,
                 "value": statistics.median(r["tokens_per_second"] for r in steps[len(steps) // 4:]),
                 "last_loss": steps[-1]["loss"]})
for r in rows:
    print(json.dumps({"device": where, "ranks": nproc, **r}))
print(f"\n| figure ({where}, {nproc} rank(s)) | replicated | zero3 | zero3 + offload |\n|---|---:|---:|---:|")
t = {r["engine"]: r["value"] for r in rows if r["figure"].startswith("teacher")}
s = {r["engine"]: r["value"] for r in rows if r["figure"].startswith("student")}
print(f"| teacher tokens/s per rank | {t['replicated']:,.0f} | {t['zero3']:,.0f} | {t.get('zero3_offload', float('nan')):,.0f} |")
print(f"| student tokens/s, all ranks | {s['replicated']:,.0f} | {s['zero3']:,.0f} | - |")
print("\n| student run | tokens/s, all ranks | last loss |\n|---|---:|---:|")
for r in rows:
    if r["figure"].startswith("student"):
        print(f"| {r['engine']} | {r['value']:,.0f} | {r['last_loss']:.4f} |")
PY
