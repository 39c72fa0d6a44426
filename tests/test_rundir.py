"""The run directory's config.yaml repeats the run (docs/design.md, the run directory): `distill train --config
RUN/config.yaml` on an interrupted run resumes it, online, offline (whose recorded config has no teacher: the store
replaced it) and with on-policy steps, and ends bit-identical to the uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from distributed_distill import cli

from .helpers import SMOKE, STORE_OVERRIDES, precomputed_store
from .test_resume import assert_same_student

RUN = [
    "train.max_steps=4", "train.save_every=2", "train.keep_last=0", "train.eval_every=0", "train.eval_batches=2",
    "logging.progress=false",
]  # fmt: skip


def overrides(kind: str, prompt_pairs: Path, tokenizer: Path) -> list[str]:
    if kind == "offline":
        return ["distill.signal=offline", f"distill.store={precomputed_store(*STORE_OVERRIDES)}"]
    if kind == "on_policy":
        return [
            f"data.source={prompt_pairs}", "data.prompt_field=prompt", "data.completion_field=completion",
            "data.max_documents=null", f"tokenizer.path={tokenizer}", "data.packing=false", "distill.on_policy=0.5",
            "distill.sampling.max_new_tokens=8",
        ]  # fmt: skip
    return []


@pytest.mark.parametrize(
    "kind",
    ["online", pytest.param("offline", marks=pytest.mark.slow), pytest.param("on_policy", marks=pytest.mark.slow)],
)
def test_an_interrupted_run_resumes_from_its_own_config_yaml(kind, prompt_pairs, smoke_tokenizer, tmp_path, capsys):
    ref = tmp_path / "ref"
    assert (
        cli.main(
            [
                "train",
                "--config",
                str(SMOKE),
                f"output_dir={ref}",
                *RUN,
                *overrides(kind, prompt_pairs, smoke_tokenizer),
            ]
        )
        == 0
    )
    recorded = (ref / "config.yaml").read_text()
    if kind == "offline":
        assert "teacher: null" in recorded  # the store replaced the teacher; config.yaml says so
    # The run as a kill after step 2's checkpoint leaves it: no step-4 checkpoint, no export.
    out = tmp_path / "out"
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("step-0000004", "final"))
    (out / "config.yaml").write_text(recorded.replace(str(ref), str(out)))
    capsys.readouterr()
    assert cli.main(["train", "--config", str(out / "config.yaml")]) == 0
    assert f"resume: continuing from {out / 'step-0000002'} (step 2)" in capsys.readouterr().out
    assert_same_student(ref, out)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    if kind == "online":  # then finished: the same command is a no-op, a longer run continues from step 4
        before = sha256_tree(out)
        assert cli.main(["train", "--config", str(out / "config.yaml")]) == 0
        assert sha256_tree(out) == before
        assert cli.main(["train", "--config", str(out / "config.yaml"), "train.max_steps=5"]) == 0
        assert f"resume: continuing from {out / 'step-0000004'} (step 4)" in capsys.readouterr().out
        assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 5


# ----------------------------------------------------------------------------------------------
# A finished run is never restarted silently (issue 23)


def sha256_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def finished(smoke_run, tmp_path) -> Path:
    """A copy of the session's finished smoke run (5 steps, no checkpoint: train.save_every is larger)."""
    out = tmp_path / "finished"
    shutil.copytree(smoke_run, out)
    return out


# Another split of the same global batch (2 x 2 x 1 for 4 x 1 x 1) is the same run.
@pytest.mark.parametrize("split", [[], ["train.micro_batch_size=2", "train.grad_accum_steps=2"]], ids=["same", "split"])
def test_the_same_command_on_a_finished_run_reports_it_and_changes_nothing(finished, capsys, split):
    before = sha256_tree(finished)
    assert cli.main(["train", "--config", str(SMOKE), f"output_dir={finished}", "logging.progress=false", *split]) == 0
    out = capsys.readouterr().out
    assert f"output_dir {finished} holds this run, finished at step 5: nothing to do" in out
    result = json.loads(out.strip().splitlines()[-1])
    last = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()][-1]
    assert result["output_dir"] == str(finished) and result["val_loss"] == last["val_loss"]
    assert sha256_tree(finished) == before  # metrics.jsonl, final/, config.yaml: byte for byte


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["distill.alpha=0.7"],
            "holds a finished run written with distill.alpha=0.5 but this run has distill.alpha=0.7",
        ),
        (["train.max_steps=7"], "holds a finished run of 5 steps without a checkpoint to continue from"),
        # The split of the global batch may change, the global batch may not (the smoke run: 4 x 1 x 1 process).
        (
            ["train.micro_batch_size=2"],
            "holds a finished run that was trained with a global batch of 4 sequences (4 x 1 x 1 process(es)), but "
            "train.micro_batch_size=2 on 1 process(es) gives 2",
        ),
    ],
)
def test_another_config_or_more_steps_without_a_checkpoint_are_refused(finished, capsys, overrides, message):
    before = sha256_tree(finished)
    assert cli.main(["train", "--config", str(SMOKE), f"output_dir={finished}", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0] and "delete" in err[0], err
    assert sha256_tree(finished) == before
