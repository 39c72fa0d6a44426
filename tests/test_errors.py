"""Each bad input: one line on stderr naming what is wrong, exit status 2, raised before expensive work,
and nothing written into the run directory."""

import json
import shutil

import pytest

from .helpers import SMOKE, run_cli, snapshot


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Tiny local 'pretrained' checkpoints with different vocabulary sizes (two padded beyond the tokenizer, one
    with fewer rows than it has tokens), and a tokenizer."""
    from transformers import AutoModelForCausalLM

    from distributed_distill import models
    from distributed_distill.config import ArchConfig
    from distributed_distill.tokenizer import train_bpe_tokenizer

    base = tmp_path_factory.mktemp("pretrained")
    tok = train_bpe_tokenizer(iter(["def f(x): return x\n"] * 20), 300, base / "tok")
    assert len(tok) > 256
    for name, vocab in (("v600", 600), ("v512", 512), ("v256", 256)):
        cfg = models.arch_config(
            ArchConfig(hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=64), vocab
        )
        AutoModelForCausalLM.from_config(cfg).save_pretrained(base / name)
        tok.save_pretrained(base / name)
    return base


@pytest.fixture(scope="module")
def previous_run(smoke_run):
    """A finished run (config, metrics, teacher record, export): a failed start in a copy of its directory must leave
    the copy exactly as it was. The session's smoke run (conftest.py), never written to here."""
    return smoke_run


@pytest.fixture(scope="module")
def stopped_run(smoke_run, tmp_path_factory):
    """The smoke run as if stopped before its export (no final/, no checkpoint): not a finished run, so a start over
    it meets the data and model checks (over a finished run, the finished-run rule answers first: another data.source
    or model is another run, tests/test_rundir.py); a failed start must leave it exactly as it was."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    shutil.copytree(smoke_run, out)
    shutil.rmtree(out / "final")
    return out


def _fails(tmp_path, *overrides, config=SMOKE, env=None, previous=None):
    out = tmp_path / "run"
    if previous is not None:
        shutil.copytree(previous, out)
    before = snapshot(out) if out.exists() else None
    proc = run_cli(["train", "--config", str(config), f"output_dir={out}", *overrides], check=False, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    if before is None:
        assert not out.exists(), "a failed start wrote into the run directory"
    else:
        assert snapshot(out) == before, "a failed start changed the previous run's files"
    return lines[0]


def _fails_over(previous, tmp_path, *overrides, **kwargs):
    return _fails(tmp_path, *overrides, previous=previous, **kwargs)


def test_typo_names_the_closest_key(tmp_path):
    assert "unknown config key 'train.max_stepz' (did you mean 'max_steps'?)" in _fails(tmp_path, "train.max_stepz=3")


def test_wrong_type(previous_run, tmp_path):
    assert "train.lr='fast' must be of type float" in _fails_over(previous_run, tmp_path, "train.lr=fast")


@pytest.mark.slow
def test_alpha_one_without_teacher(previous_run, tmp_path):
    assert "distill.alpha=1.0 needs a teacher" in _fails_over(
        previous_run, tmp_path, "distill.alpha=1.0", "teacher=null"
    )


@pytest.mark.slow
def test_missing_config_file(tmp_path):
    assert "does not exist" in _fails(tmp_path, config=tmp_path / "nope.yaml")


@pytest.mark.slow
def test_missing_model_path(previous_run, tmp_path):
    line = _fails_over(previous_run, tmp_path, "teacher.arch=null", f"teacher.path={tmp_path / 'no_such_model'}")
    assert f"teacher.path={tmp_path / 'no_such_model'}: no such model directory" in line


@pytest.mark.slow
def test_a_student_with_fewer_rows_than_the_tokenizer_is_refused(stopped_run, tmp_path, pretrained):
    """Different row counts are fine (compared over the tokenizer's rows, tests/test_vocab.py); too few are not."""
    line = _fails(
        tmp_path,
        "teacher.arch=null",
        f"teacher.path={pretrained / 'v600'}",
        "student.arch=null",
        f"student.path={pretrained / 'v256'}",
        previous=stopped_run,
    )
    assert "tokens but the student has only vocab_size=256 embedding rows" in line


@pytest.mark.slow
def test_seq_len_beyond_the_pretrained_maximum(stopped_run, tmp_path, pretrained):
    line = _fails_over(
        stopped_run, tmp_path, "teacher.arch=null", f"teacher.path={pretrained / 'v600'}", "data.seq_len=100"
    )
    assert "data.seq_len=100 exceeds the teacher's maximum positions (64)" in line


@pytest.mark.slow
def test_empty_data(stopped_run, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    assert "is empty" in _fails_over(stopped_run, tmp_path, f"data.source={tmp_path / 'empty.jsonl'}")


@pytest.mark.slow
def test_unreadable_data(stopped_run, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    assert "cannot read as json" in _fails_over(stopped_run, tmp_path, f"data.source={tmp_path / 'bad.jsonl'}")


@pytest.mark.slow
def test_missing_data(stopped_run, tmp_path):
    assert "no such file, directory or built-in corpus" in _fails_over(
        stopped_run, tmp_path, f"data.source={tmp_path / 'nothing'}"
    )


@pytest.mark.slow
def test_good_prompt_completion_data_trains(tmp_path):
    """The counterpart of the data errors: a valid prompt/completion JSONL file trains."""
    path = tmp_path / "pc.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"question {i}?", "a": f"answer {i} " * 30}) for i in range(60)))
    out = tmp_path / "ok"
    run_cli(
        [
            "train",
            "--config",
            str(SMOKE),
            f"output_dir={out}",
            f"data.source={path}",
            "data.prompt_field=q",
            "data.completion_field=a",
            "train.max_steps=2",
            "data.val_fraction=0.2",
        ]
    )
    assert (out / "final" / "model.safetensors").is_file()


def test_processes_that_would_train_alone_are_refused(tmp_path):
    """`srun -n 2 python train.py` (no torchrun) starts two processes that never form a process group: each
    would silently train its own student. The environment below is what srun gives each such task."""
    line = _fails(tmp_path, env={"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"})
    assert "Accelerate sees 1 process(es) but the launcher started SLURM_STEP_NUM_TASKS=2" in line


def test_repository_code_does_not_run_without_trust_remote_code(previous_run, tmp_path, pretrained):
    """A model directory whose config points at its own Python code (auto_map, unknown model_type): refused with a
    one-line error naming the switch, and the code never runs (no prompt either: stdin is not consulted)."""
    model = tmp_path / "custom"
    shutil.copytree(pretrained / "v512", model)
    witness = tmp_path / "code-ran"
    (model / "custom_code.py").write_text(f"open({str(witness)!r}, 'w').close()\n")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="custom", auto_map={"AutoConfig": "custom_code.Config"})
    (model / "config.json").write_text(json.dumps(config))
    line = _fails_over(
        previous_run, tmp_path, "student.arch=null", f"student.path={model}", "teacher=null", "distill.alpha=0"
    )
    assert f"student.path={model}: cannot load its config: it needs the repository's own code" in line
    assert "student.trust_remote_code=true" in line
    assert not witness.exists()
