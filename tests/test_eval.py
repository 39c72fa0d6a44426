"""`distill eval` and its metrics: each metric against a plain float64 reference, the constructed and hand-checked
cases, and 2-process evaluation equal to 1-process on splits that do not divide evenly (docs/eval.md)."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from distributed_distill.eval import metrics
from distributed_distill.losses import TeacherTargets

from .helpers import run_cli, torchrun


def _reference_token_metrics(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, bins: int) -> dict:
    """Per token, in float64, the definitions written out: KL both ways, same argmax, ECE by explicit bins."""
    kl_f = kl_r = agree = 0.0
    count = [0] * bins
    conf_sum = [0.0] * bins
    correct = [0] * bins
    n = 0
    for i in range(s.shape[0]):
        if labels[i] == -100:
            continue
        n += 1
        ps, pt = F.softmax(s[i].double(), -1), F.softmax(t[i].double(), -1)
        kl_f += float((pt * (pt.log() - ps.log())).sum())
        kl_r += float((ps * (ps.log() - pt.log())).sum())
        agree += int(ps.argmax() == pt.argmax())
        conf = float(ps.max())
        b = min(int(conf * bins), bins - 1)
        count[b] += 1
        conf_sum[b] += conf
        correct[b] += int(ps.argmax() == labels[i])
    ece = sum(count[b] / n * abs(correct[b] / count[b] - conf_sum[b] / count[b]) for b in range(bins) if count[b])
    return {"val_forward_kl": kl_f / n, "val_reverse_kl": kl_r / n, "val_top1_agreement": agree / n, "val_ece": ece}


def test_metric_functions_against_references_and_hand_checked_cases():
    """Default tier, in-process: token metrics (dense and top-k targets) vs float64 loops; ECE on a constructed
    case; ROUGE-L on hand-checked pairs; the parse check on good and bad completions; repetition."""
    torch.manual_seed(0)
    n, vocab, bins = 37, 11, 5
    s, t = torch.randn(n, vocab) * 2, torch.randn(n, vocab) * 2
    labels = torch.randint(0, vocab, (n,))
    labels[::4] = -100
    want = _reference_token_metrics(s, t, labels, bins)
    got = metrics.token_means(metrics.token_sums(s, labels, TeacherTargets(logits=t), bins).tolist(), bins)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-5), key
    # Top-k targets holding every id (k = V): the same KL as the dense targets.
    lp, ids = F.log_softmax(t, -1).sort(-1, descending=True)
    sparse = metrics.token_sums(s, labels, TeacherTargets(ids=ids, logprobs=lp), bins).tolist()
    got = metrics.token_means(sparse, bins)
    for key in ("val_forward_kl", "val_reverse_kl", "val_top1_agreement"):
        assert got[key] == pytest.approx(want[key], abs=1e-5), key

    # ECE, constructed: 10 tokens at confidence 0.8 of which 6 correct, 10 at 0.35 of which 5 correct:
    # ECE = 10/20 |0.6 - 0.8| + 10/20 |0.5 - 0.35| = 0.1 + 0.075.
    def rows(p: float, k: int, correct: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.tensor([[math.log(p)] + [math.log((1 - p) / 3)] * 3] * k)
        return logits, torch.tensor([0] * correct + [1] * (k - correct))

    (a, ya), (b, yb) = rows(0.8, 10, 6), rows(0.35, 10, 5)
    sums = metrics.token_sums(torch.cat([a, b]), torch.cat([ya, yb]), None, 10).tolist()
    assert metrics.token_means(sums, 10)["val_ece"] == pytest.approx(0.175, abs=1e-6)

    # ROUGE-L: LCS "the cat on the mat" (5 of 6 both ways); "a c" (P 2/4, R 2/3).
    assert metrics.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert metrics.rouge_l("a b c d", "a c e") == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert metrics.rouge_l("", "a") == metrics.rouge_l("x y", "a b") == 0.0

    head = 'Write the body of this function from `m.py`:\n\n```python\ndef f(x):\n    """Add one."""\n```'
    assert metrics.python_parses(head, "```python\n    y = x + 1\n    return y\n```")
    assert metrics.python_parses(head, "```python\n    return x + 1")  # cut at max_new_tokens before the fence
    assert not metrics.python_parses(head, "```python\n    return (x +\n```")
    assert not metrics.python_parses(head, "```python\nreturn x\n  y = 1\n```")  # bad indentation

    assert metrics.repeated_ngrams([1, 2, 1, 2, 1, 2], 2) == (3, 5)
    assert metrics.repeated_ngrams([1, 2, 3], 4) == (0, 0)


# ----------------------------------------------------------------------------------------------
# The real command on tiny models: 1 process, 2 processes, and a float64 reference

EVAL = [
    "data.val_fraction=0.3",
    "data.seq_len=64",
    "train.micro_batch_size=3",  # rows per rank per round: 2 ranks x 3 does not divide the split
    "eval.prompts=5",  # 5 prompts over 2 ranks
    "eval.max_new_tokens=8",
    "eval.prompt_tokens=16",
    "logging.progress=false",
]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> str:
    """24 short standard-library files as a text corpus (a validation split of a few hundred rows)."""
    from distributed_distill.data.documents import stdlib_files

    root = tmp_path_factory.mktemp("corpus")
    files = [f for f in stdlib_files() if 1500 < f.stat().st_size < 3000][:24]
    for i, f in enumerate(files):
        (root / f"{i:02d}.txt").write_text(f.read_text(encoding="utf-8", errors="replace"))
    return f"data.source={root}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, teacher_dir, student_dir):
    """The tiny teacher and student as exported `final/` directories are: weights, config and tokenizer."""
    root = tmp_path_factory.mktemp("exported")
    teacher = root / "teacher"
    shutil.copytree(teacher_dir, teacher)
    for f in student_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, teacher / f.name)
    return teacher, student_dir


@pytest.mark.slow
@pytest.mark.multiprocess
def test_eval_one_and_two_processes_agree_and_match_a_float64_reference(tmp_path, exported, small_corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distributed_distill.config import load_config
    from distributed_distill.data.documents import documents
    from distributed_distill.data.packed import build_datasets
    from distributed_distill.eval.evaluate import held_out_prompts
    from distributed_distill.models import model_inputs

    teacher_dir, student_dir = exported
    models = ["--model", f"teacher={teacher_dir}", "--model", f"student={student_dir}"]
    args = [*EVAL, small_corpus]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    # No --config: the exported directories alone (the model named teacher is the reference).
    proc = run_cli(["eval", *args, "--json", str(one), *models], timeout=300)
    assert "| student |" in proc.stdout and "fwd KL" in proc.stdout
    run_cli(["eval", *args, "--json", str(two), *models], launcher=torchrun(29940, "-m", "distributed_distill.cli"))
    rows1, rows2 = json.loads(one.read_text()), json.loads(two.read_text())
    for r1, r2 in zip(rows1, rows2, strict=True):
        assert r1["val_tokens"] == r2["val_tokens"] and r1["gen_samples"] == r2["gen_samples"] == 5
        assert r1["completions"] == r2["completions"]  # greedy, prompt by prompt: the same on any number of ranks
        for key, value in r1.items():
            if isinstance(value, float) and "per_second" not in key:
                assert r2[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (r1["model"], key)
    teacher_row, student_row = rows1
    assert teacher_row["val_forward_kl"] == pytest.approx(0, abs=1e-6) and teacher_row["val_top1_agreement"] == 1.0

    # The float64 reference, with nothing but transformers and the definitions.
    cfg = load_config(None, [f"student.path={student_dir}", f"teacher.path={teacher_dir}", "distill.alpha=0", *args])
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    vocab = len(tokenizer)
    student = AutoModelForCausalLM.from_pretrained(student_dir).double().eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).double().eval()
    docs = documents(cfg.data)
    _, val, _ = build_datasets(docs, tokenizer, cfg.data)
    assert len(val) % 6 and len(val) > 6  # rounds of 2 ranks x 3 rows: the last one is uneven
    s_all, t_all, y_all = [], [], []
    with torch.no_grad():
        for start in range(0, len(val), 16):
            rows = val[start : start + 16]
            batch = {"input_ids": rows["input_ids"].long(), "position_ids": rows["position_ids"].long()}
            s_all.append(student(**model_inputs(student, batch)).logits[:, :-1, :vocab].reshape(-1, vocab))
            t_all.append(teacher(**model_inputs(teacher, batch)).logits[:, :-1, :vocab].reshape(-1, vocab))
            y_all.append(rows["labels"].long()[:, 1:].reshape(-1))
    s, t, y = torch.cat(s_all), torch.cat(t_all), torch.cat(y_all)
    want = _reference_token_metrics(s, t, y, cfg.eval.calibration_bins)
    want["val_loss"] = float(F.cross_entropy(s, y, ignore_index=-100))
    assert student_row["val_tokens"] == int((y != -100).sum())
    for key, value in want.items():
        assert student_row[key] == pytest.approx(value, abs=1e-5), key

    # Generation: the teacher's NLL of the student's completions, and the text metrics of each.
    prompts = held_out_prompts(cfg, docs, tokenizer, 5).prompts
    nll, count, rouge, repeated, ngrams = 0.0, 0, 0.0, 0, 0
    with torch.no_grad():
        for c in student_row["completions"]:
            ids = prompts[c["prompt"]].ids + c["ids"]
            logp = F.log_softmax(teacher(torch.tensor([ids])).logits[0, :-1, :vocab], -1)
            cut = len(prompts[c["prompt"]].ids)
            nll -= float(logp[cut - 1 :].gather(-1, torch.tensor(ids[cut:])[:, None]).sum())
            count += len(c["ids"])
            rouge += metrics.rouge_l(c["text"], prompts[c["prompt"]].reference)
            r, g = metrics.repeated_ngrams([i for i in c["ids"] if i != tokenizer.eos_token_id], 4)
            repeated, ngrams = repeated + r, ngrams + g
    assert student_row["gen_teacher_nll"] == pytest.approx(nll / count, abs=1e-5)
    assert student_row["gen_rouge_l"] == pytest.approx(rouge / 5, abs=1e-9)
    assert student_row["gen_repetition"] == pytest.approx(repeated / max(ngrams, 1), abs=1e-9)
