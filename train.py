"""Distill a student: the same arguments as `distill train`.

CPU, one process (smoke test, seconds):
    python train.py --config configs/smoke.yaml
CPU, two processes (gloo):
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 train.py --config configs/smoke.yaml
    torchrun --nproc_per_node 2 train.py --config configs/smoke.yaml
One GPU node (8 GPUs, DDP):
    accelerate launch --config_file launch/accelerate/ddp.yaml train.py --config configs/demo.yaml
"""

from distributed_distill.cli import leave, train_main

if __name__ == "__main__":
    leave(train_main())
