"""lm-evaluation-harness runs the shipped local task (`distributed_distill/eval/lm_eval_tasks/distill_heldout.yaml`)
on an exported student as it is (`lm_eval --model hf`), on CPU, with no download (docs/eval.md)."""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from .helpers import ROOT, run_cli

pytestmark = pytest.mark.slow


def test_lm_eval_scores_an_exported_student_on_the_local_task(tmp_path, student_dir):
    lm_eval = shutil.which("lm_eval", path=str(Path(sys.executable).parent))
    assert lm_eval, "lm_eval is not installed next to this interpreter: pip install -e '.[eval]'"
    from distributed_distill.data.documents import stdlib_files

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, f in enumerate([f for f in stdlib_files() if 1500 < f.stat().st_size < 3000][:24]):
        (corpus / f"{i:02d}.txt").write_text(f.read_text(encoding="utf-8", errors="replace"))
    out = tmp_path / "results"
    proc = run_cli(
        [
            "--model", "hf",
            "--model_args", f"pretrained={student_dir},dtype=float32",
            "--device", "cpu",
            "--include_path", str(ROOT / "distributed_distill" / "eval" / "lm_eval_tasks"),
            "--tasks", "distill_heldout",
            "--metadata", json.dumps({"source": str(corpus), "val_fraction": 0.3}),
            "--output_path", str(out),
        ],
        launcher=[lm_eval],
        timeout=300,
    )  # fmt: skip
    assert "distill_heldout" in proc.stdout and "bits_per_byte" in proc.stdout
    (results,) = out.rglob("results_*.json")
    scores = json.loads(results.read_text())["results"]["distill_heldout"]
    bits = scores["bits_per_byte,none"]
    # A random tiny model: about log2(vocab 512) = 9 bits per token, spread over a few bytes per token.
    assert math.isfinite(bits) and 0.5 < bits < 9, scores
    assert scores["byte_perplexity,none"] == pytest.approx(2**bits, rel=1e-6)
