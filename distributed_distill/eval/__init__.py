"""Evaluation (docs/eval.md):

evaluate.py     validation during training and `distill eval`: loss, KL to the teacher, agreement, calibration,
                and the generation metrics of held-out prompts
metrics.py      the metrics as pure functions over sums that ranks add
report.py       `distill report`: plots and a Markdown summary of run directories
lm_eval_tasks/  the lm-evaluation-harness task `distill_heldout`
"""
