"""docs/robustness.md's bad-input table, row by row, through the real CLI.

Each row has a recipe here (what to set up, what to run) and the message fragment to look for; the fragment must
appear in the row's message column and in what the command printed. A row without a recipe, or a recipe whose
fragment the table does not show, fails: the table and the program cannot drift apart. Errors must be one line
(`error: ...`), exit status 2, no traceback; rows that are "not an error" must end with status 0.

The command runs in-process (`cli.main`, its output captured) unless it needs a launcher (torchrun: a real
multi-process job); the rows that cost well under a second run in the default tier (`Row.default`), the rest in
the slow tier."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .helpers import ROOT, SMOKE, TOP_K, error_line, precomputed_store, run_cli, tmpfs, torchrun
from .helpers import cli_in_process as _cli

DOC = ROOT / "docs" / "robustness.md"


FEWER_ROWS = (
    "a model with fewer embedding rows than the tokenizer (different row counts above it are fine: [data.md](data.md))"
)


def table_rows() -> dict[str, str]:
    """case -> message column of the bad-input table."""
    text = DOC.read_text().split("## Bad input", 1)[1]
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 3 and cells[0] not in ("case", "---"):
            rows[cells[0]] = cells[1]
    return rows


@dataclass
class Row:
    fragments: list[str]  # each must be in the table's message column and in the output
    run: object  # (tmp_path, fixtures) -> CompletedProcess
    ok: bool = False  # "not an error": the command succeeds
    status: int = 2  # a launcher (torchrun) reports a worker's error as its own status 1
    covered_by: str | None = None  # "file::test": a row whose harness another test owns (two node launchers, ...)
    default: bool = False  # in the default tier: refused at config load or before the tokenizer (well under a second)


def _train(out: Path, *overrides: str, config=SMOKE, env=None, launcher=None) -> subprocess.CompletedProcess:
    args = ["--config", str(config), f"output_dir={out}", *overrides]
    if launcher is not None:  # a real multi-process job
        return run_cli(args, check=False, env=env, launcher=launcher, timeout=600)
    return _cli(["train", *args], env)


def _finished(fx, tmp: Path) -> Path:
    """A copy of a finished 6-step run with checkpoints step-0000004 and step-0000006."""
    out = tmp / "run"
    shutil.copytree(fx["finished"], out)
    return out


RUN = ["train.max_steps=6", "train.save_every=2", "train.keep_last=2"]


def _truncate(path: Path, size: int = 1000) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _tamper(ckpt: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    (ckpt / "optimizer.bin").write_bytes(pickle.dumps(Payload()))
    marker = json.loads((ckpt / "checkpoint.json").read_text())
    data = (ckpt / "optimizer.bin").read_bytes()
    marker["files"]["optimizer.bin"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "checkpoint.json").write_text(json.dumps(marker))


def _model(fx, tmp: Path, name: str = "model") -> Path:
    model = tmp / name
    shutil.copytree(fx["student_dir"], model)
    return model


def _as_student(model: Path) -> list[str]:
    return ["student.arch=null", f"student.path={model}", "teacher=null", "distill.alpha=0"]


def _v600_teacher(fx, tmp: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from distributed_distill import models
    from distributed_distill.config import ArchConfig

    teacher = tmp / "v600"
    arch = ArchConfig(hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(models.arch_config(arch, 600)).save_pretrained(teacher)
    for f in fx["student_dir"].glob("tokenizer*"):
        shutil.copy(f, teacher)
    return teacher


def _custom_code(fx, tmp: Path) -> Path:
    model = _model(fx, tmp)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="custom", auto_map={"AutoConfig": "custom_code.Config"})
    (model / "config.json").write_text(json.dumps(config))
    return model


def _flip_header(model: Path) -> Path:
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[10] ^= 0xFF
    weights.write_bytes(bytes(data))
    return model


def _other_vocab(model: Path) -> Path:
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 600
    (model / "config.json").write_text(json.dumps(config))
    return model


def _holding(path: Path, what: str, then):
    """Run `then()` while another process holds the lock on `path`."""
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from distributed_distill import lock; lock.acquire({str(path)!r}, {what!r});"
         "import time; print('held', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        return then()
    finally:
        holder.kill()
        holder.communicate()


def _full_disk(tmp: Path) -> subprocess.CompletedProcess:
    with tmpfs(tmp / "small", "1000k"):
        return _train(tmp / "small" / "run", "train.max_steps=4", "train.save_every=2", "train.keep_last=1")


def _no_room(tmp: Path) -> subprocess.CompletedProcess:
    with tmpfs(tmp / "small", "256k"):
        return _train(tmp / "small" / "run")


def _write(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


TEXT_ROWS = b"".join(b'{"text": "document number %d"}\n' % i for i in range(40))
BAD_JSONL = b'{"text": "a"}\n{"text": "b"}\n{broken\n'
LATIN1 = b"hello\nd\xe9j\xe0 vu\n" * 3
TINY = "".join(json.dumps({"text": f"def f{i}(x): return x + {i}"}) + "\n" for i in range(8)).encode()


def _on_data(tmp: Path, name: str, data: bytes, *overrides: str) -> subprocess.CompletedProcess:
    return _train(tmp / "run", f"data.source={_write(tmp, name, data)}", *overrides)


def _damaged_store(tmp: Path) -> Path:
    store = tmp / "store"
    shutil.copytree(precomputed_store(f"distill.store_top_k={TOP_K}"), store)
    shard = store / "train" / "shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return store


def _other_store(fx, tmp: Path) -> subprocess.CompletedProcess:
    a = precomputed_store(f"distill.store_top_k={TOP_K}")
    b = precomputed_store(f"distill.store_top_k={TOP_K}", "distill.store_shard_rows=1000", name="shards-1000")
    out = tmp / "run"
    offline = ["distill.signal=offline", "train.save_every=2"]
    assert _train(out, *offline, f"distill.store={a}", "train.max_steps=2").returncode == 0
    return _train(out, *offline, f"distill.store={b}", "train.max_steps=4")


def _torn_metrics(fx, tmp: Path) -> subprocess.CompletedProcess:
    out = _finished(fx, tmp)
    metrics = out / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 7, "loss": 4.1')
    return _train(out, *RUN, "train.max_steps=8")


def _torchrun_on_finished(fx, tmp: Path) -> subprocess.CompletedProcess:
    # (a longer run: the same one again would have nothing to do)
    return _train(_finished(fx, tmp), *RUN, "train.max_steps=8", launcher=torchrun(29661, "train.py"))


def _generate(tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`distill generate` on configs/generate.yaml into tmp/s."""
    config = str(ROOT / "configs" / "generate.yaml")
    return _cli(["generate", "--config", config, f"generate.store={tmp / 's'}", *overrides])


def _with_pkl(fx, tmp: Path) -> subprocess.CompletedProcess:
    out = _finished(fx, tmp)
    _tamper(out / "step-0000006")
    return _train(out, *RUN, "train.max_steps=8")


# ----------------------------------------------------------------------------------------------
# Issue 23's cases


def _smoke_copy(fx, tmp: Path) -> Path:
    """A copy of the session's finished smoke run: 5 steps, exported, no checkpoint."""
    out = tmp / "run"
    shutil.copytree(fx["smoke"], out)
    return out


def _chat(*conversations) -> bytes:
    good = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(30)]
    rows = good[:7] + list(conversations) + good[7:]
    return b"".join(json.dumps({"messages": m}).encode() + b"\n" for m in rows)


ASSISTANT_FIRST = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}]


def _samples(fx, tmp: Path) -> Path:
    """A small sample store of configs/generate.yaml (made once per module), copied."""
    if "samples" not in fx:
        made = fx.tmp_path_factory.mktemp("samples")
        small = ["generate.max_prompts=4", "generate.sampling.max_new_tokens=8", f"generate.store={made / 's'}"]
        run_cli(["generate", "--config", str(ROOT / "configs" / "generate.yaml"), *small])
        fx["samples"] = made / "s"
    shutil.copytree(fx["samples"], tmp / "samples")
    return tmp / "samples"


def _edit_tokenizer(store: Path) -> Path:
    """The store's tokenizer/ changed after generate (its BPE model told to ignore merges: it still loads)."""
    path = store / "tokenizer" / "tokenizer.json"
    tok = json.loads(path.read_text())
    tok["model"]["ignore_merges"] = not tok["model"].get("ignore_merges", False)
    path.write_text(json.dumps(tok))
    return store


def _other_tokenizer(fx, tmp: Path) -> Path:
    """The tiny student with a tokenizer of its own (300 tokens, trained here), as an exported run of another data
    set would be."""
    from distributed_distill.tokenizer import train_bpe_tokenizer

    model = _model(fx, tmp)
    for f in model.glob("*token*"):
        f.unlink()
    train_bpe_tokenizer((f"text number {i} of another corpus" for i in range(200)), 300, tmp / "tok")
    for f in (tmp / "tok").iterdir():
        shutil.copy(f, model)
    return model


def _small_vocab_model(tmp: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from distributed_distill import models
    from distributed_distill.config import ArchConfig

    model = tmp / "v256"
    arch = ArchConfig(hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(models.arch_config(arch, 256)).save_pretrained(model)
    return model


LONG_PAIRS = "".join(
    json.dumps({"prompt": f"def function_number_{i}(argument):", "completion": " return argument * " + "7 + " * 60})
    + "\n"
    for i in range(40)
).encode()


ROWS: dict[str, Row] = {
    "unknown key / typo": Row(
        ["unknown config key 'train.max_stepz' (did you mean 'max_steps'?)"],
        lambda fx, tmp: _train(tmp / "run", "train.max_stepz=3"),
        default=True,
    ),
    "wrong type": Row(
        ["train.lr='fast' must be of type float"], lambda fx, tmp: _train(tmp / "run", "train.lr=fast"), default=True
    ),
    "a key that moved (distill generate's sampling keys)": Row(
        ["config key generate.temperature moved to generate.sampling.temperature"],
        lambda fx, tmp: _generate(tmp, "generate.temperature=0.5"),
        default=True,
    ),
    "conflicting values": Row(
        ["distill.alpha=1.0 needs a teacher; set teacher.path / teacher.arch, or distill.alpha=0"],
        lambda fx, tmp: _train(tmp / "run", "distill.alpha=1.0", "teacher=null"),
        default=True,
    ),
    "missing config file": Row(
        ["does not exist"], lambda fx, tmp: _train(tmp / "run", config=tmp / "nope.yaml"), default=True
    ),
    "missing model path": Row(
        [": no such model directory"],
        lambda fx, tmp: _train(tmp / "run", "teacher.arch=null", f"teacher.path={tmp / 'no_such_model'}"),
        default=True,
    ),
    "repository code without trust": Row(
        ["cannot load its config: it needs the repository's own code, which runs only with student.trust_remote_code"],
        lambda fx, tmp: _train(tmp / "run", *_as_student(_custom_code(fx, tmp))),
        default=True,
    ),
    # Rows of the real-workloads features, each refused by the unit or CLI test that owns its harness.
    "LoRA with a sharded student": Row(
        ["student.lora with a ZeRO-3 student is not supported"],
        None,
        covered_by="tests/test_student.py::test_lora_under_zero3_is_refused_at_startup",
    ),
    FEWER_ROWS: Row(
        ["tokens but the student has only vocab_size="],
        None,
        covered_by="tests/test_vocab.py::test_a_model_with_fewer_rows_than_the_tokenizer_is_refused",
    ),
    "a package the config needs": Row(
        ["teacher.attn_implementation=flash_attention_2 needs the flash-attn"],
        None,
        covered_by="tests/test_student.py::test_teacher_dtype_auto_is_bf16_on_cuda_only_and_attention_is_configurable",
    ),
    "conversations without a chat template": Row(
        ["has no chat template; set tokenizer.chat_template: PATH"],
        None,
        covered_by="tests/test_chat.py::test_conversational_data_without_a_chat_template_names_the_key",
    ),
    "missing split": Row(
        ["no split 'nope'"],
        None,
        covered_by="tests/test_sources.py::test_repository_and_save_to_disk_directories",
    ),
    "teacher and student tokenizers differ": Row(
        ["tokenizers differ: token id 300"],
        None,
        covered_by="tests/test_vocab.py::test_different_tokenizers_are_refused_naming_the_token",
    ),
    "seq_len beyond the model": Row(
        ["data.seq_len=100 exceeds the teacher's maximum positions (64)"],
        lambda fx, tmp: _train(
            tmp / "run", "teacher.arch=null", f"teacher.path={_v600_teacher(fx, tmp)}", "data.seq_len=100"
        ),
    ),
    "on-policy steps without prompts": Row(
        ["distill.on_policy=0.5 needs prompts, but data.source=", "is plain text"],
        lambda fx, tmp: _train(
            tmp / "run",
            "distill.on_policy=0.5",
            "data.packing=false",
            f"data.source={_write(tmp, 't.jsonl', TEXT_ROWS)}",
        ),
    ),
    "hints with an offline store": Row(
        ["distill.hidden with distill.signal=offline: a store holds the teacher's output distribution only"],
        lambda fx, tmp: _train(tmp / "run", "distill.hidden.loss=mse", "distill.signal=offline", "distill.store=/s"),
    ),
    "a hint layer the model does not have": Row(
        ["distill.hidden.layers: student layer 3 does not exist: the student has 1 block, so its layers are 0"],
        lambda fx, tmp: _train(tmp / "run", "distill.hidden.layers=[[3,1]]"),
    ),
    "on-policy rows beyond the model": Row(
        ["data.seq_len=64 + distill.sampling.max_new_tokens=100", "exceeds the student's maximum positions (128)"],
        lambda fx, tmp: _train(
            tmp / "run",
            "distill.on_policy=0.5",
            "data.packing=false",
            "distill.sampling.max_new_tokens=100",
            "data.source=python-stdlib-chat",
            f"tokenizer.path={fx['student_dir']}",
        ),  # fmt: skip
    ),
    "missing data": Row(
        ["no such file, directory or built-in corpus (try 'python-stdlib')"],
        lambda fx, tmp: _train(tmp / "run", f"data.source={tmp / 'nothing'}"),
    ),
    "text data for distill generate": Row(
        ["holds plain text, not prompts: set generate.prefix_tokens"],
        lambda fx, tmp: _generate(tmp, "data.source=python-stdlib"),
    ),
    "empty data": Row(["is empty"], lambda fx, tmp: _train(tmp / "run", f"data.source={_write(tmp, 'e.jsonl', b'')}")),
    "unreadable data": Row(
        ["cannot read as parquet: "],
        lambda fx, tmp: _train(tmp / "run", f"data.source={_write(tmp, 'bad.parquet', b'not parquet at all')}"),
    ),
    "processes that would train alone": Row(
        ["Accelerate sees 1 process(es) but the launcher started SLURM_STEP_NUM_TASKS=2; "],
        lambda fx, tmp: _train(tmp / "run", env={"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"}),
        default=True,
    ),
    "output_dir holds another run's checkpoints (`resume: false`)": Row(
        ["holds checkpoints of an earlier run (step-0000006, step-0000004); set train.resume=auto to continue it"],
        lambda fx, tmp: _train(_finished(fx, tmp), *RUN, "train.resume=false"),
    ),
    "checkpoint of a different run": Row(
        [
            "was written with student.arch.hidden_size=32 but this run has student.arch.hidden_size=48; only logging, "
            "evaluation, checkpointing and the step budget may change on resume"
        ],
        lambda fx, tmp: _train(_finished(fx, tmp), *RUN, "student.arch.hidden_size=48"),
    ),
    "a process count that cannot keep the global batch": Row(
        [
            "was trained with a global batch of 4 sequences (4 x 1 x 1 process(es)), but train.grad_accum_steps=1 "
            "on 2 process(es) gives 8; the global batch cannot change on resume"
        ],
        _torchrun_on_finished,
        status=1,
    ),
    "other store": Row(["was trained from store", "holds store"], _other_store),
    "truncated / corrupted checkpoint, `resume: auto`": Row(
        ["resume: skipping", "is damaged: model.safetensors has 1000 bytes, 198208 were written", "(step 4)"],
        lambda fx, tmp: (
            _truncate(_finished(fx, tmp) / "step-0000006" / "model.safetensors"),
            _train(tmp / "run", *RUN, "train.max_steps=8"),
        )[1],
        ok=True,
    ),
    "no usable checkpoint": Row(
        ["holds no usable checkpoint (", "; delete the damaged step directories or choose another output_dir"],
        lambda fx, tmp: (
            [(p / "checkpoint.json").unlink() for p in _finished(fx, tmp).glob("step-*")],
            _train(tmp / "run", *RUN, "train.max_steps=8"),  # (longer: the same run again has nothing to do)
        )[1],
    ),
    "damaged checkpoint given as `resume: <path>`": Row(
        ["is damaged: model.safetensors has 1000 bytes, 198208 were written"],
        lambda fx, tmp: (
            _truncate(_finished(fx, tmp) / "step-0000006" / "model.safetensors"),
            _train(tmp / "run", *RUN, f"train.resume={tmp / 'run' / 'step-0000006'}"),
        )[1],
    ),
    "tampered checkpoint file": Row(["cannot be loaded: Weights only load failed."], _with_pkl),
    "store that does not fit the run": Row(
        ["has top_k 16 but distill.top_k is 8"],
        lambda fx, tmp: _train(
            tmp / "run",
            "distill.signal=offline",
            f"distill.store={precomputed_store(f'distill.store_top_k={TOP_K}')}",
            "distill.top_k=8",
        ),  # fmt: skip
    ),
    "too many non-finite steps": Row(
        ["consecutive steps (up to step", "had a non-finite loss or gradient (train.max_bad_steps=3)"],
        # An absurd learning rate: the weights overflow after one step, every later step is non-finite.
        lambda fx, tmp: _train(
            tmp / "run", "train.lr=1e30", "train.warmup_steps=0", "train.max_bad_steps=3", "train.max_steps=20"
        ),
    ),
    "second run on the same `output_dir`": Row(
        ["is in use by another job (host", "; wait for it to end or stop it, or choose another output_dir"],
        lambda fx, tmp: _holding(tmp / "run", "output_dir", lambda: _train(tmp / "run")),
    ),
    "second precompute of the same store": Row(
        ["distill.store=", "is in use by another job (host"],
        lambda fx, tmp: _holding(
            tmp / "s",
            "distill.store",
            lambda: _cli(["precompute", "--config", str(SMOKE), f"distill.store={tmp / 's'}"]),
        ),  # fmt: skip
    ),
    "`output_dir` that cannot be written": Row(
        ["cannot be written: not a directory; choose a writable directory"],
        lambda fx, tmp: _train(_write(tmp, "file", b"x") / "run"),
        default=True,
    ),
    "no room for one checkpoint": Row(
        ["but one checkpoint of the student (49,248 parameters x 12 bytes: fp32 weights and AdamW's two moments)"],
        lambda fx, tmp: _no_room(tmp),
    ),
    "truncated model weights": Row(
        ["model.safetensors is truncated (", "re-download or re-export the model"],
        lambda fx, tmp: _train(
            tmp / "run", *_as_student((lambda m: (_truncate(m / "model.safetensors", 197208), m)[1])(_model(fx, tmp)))
        ),
    ),
    "damaged model header": Row(
        ["model.safetensors is damaged: its header is not valid JSON ("],
        lambda fx, tmp: _train(tmp / "run", *_as_student(_flip_header(_model(fx, tmp)))),
    ),
    "config that disagrees with the weights": Row(
        [
            "the weights do not match config.json: lm_head.weight has shape [512, 32] but the config "
            "(vocab_size=600, hidden_size=32) gives [600, 32]"
        ],
        lambda fx, tmp: _train(tmp / "run", *_as_student(_other_vocab(_model(fx, tmp)))),
    ),
    "model directory without a model": Row(
        ["no config.json in this directory (it is empty), so it is not a saved model"],
        lambda fx, tmp: (
            (tmp / "empty").mkdir(),
            _train(tmp / "run", "teacher.arch=null", f"teacher.path={tmp / 'empty'}"),
        )[1],
        default=True,
    ),
    "NaN or infinity": Row(
        ["train.lr=nan: NaN and infinity are not allowed here; give a finite number (e.g. 1e-3)"],
        lambda fx, tmp: _train(tmp / "run", "train.lr=nan"),
        default=True,
    ),
    "`--config` given a directory": Row(
        ["is a directory; give a YAML file (this looks like a run directory: --config "],
        lambda fx, tmp: _cli(["train", "--config", str(fx["smoke"])]),
        default=True,
    ),
    "no `--config`": Row(
        ["no --config given and no student set: give --config FILE (e.g. configs/smoke.yaml), "],
        lambda fx, tmp: _cli(["train", f"output_dir={tmp / 'run'}"]),
        default=True,
    ),
    "a path where an override goes (`distill eval runs/x`)": Row(
        ["is a run directory, not a section.key=value override; its config is --config "],
        lambda fx, tmp: _cli(["eval", str(fx["smoke"])]),
        default=True,
    ),
    "`distill eval --model` not NAME=DIR": Row(
        ["must look like NAME=DIR"],
        lambda fx, tmp: _cli(["eval", "--model", str(fx["smoke"] / "final")]),
        default=True,
    ),
    "`distill eval --model` of a missing directory": Row(
        [": no such model directory"],
        lambda fx, tmp: _cli(["eval", "--model", f"kd={tmp / 'none' / 'final'}"]),
        default=True,
    ),
    "bad JSON line": Row(
        [":3: not a JSON value (Expecting property name enclosed in double quotes at column 2); one JSON object per"],
        lambda fx, tmp: _on_data(tmp, "bad.jsonl", BAD_JSONL),
    ),
    "text that is not UTF-8": Row(
        [":2: not UTF-8 text (byte 2 of the line is 0xe9); re-encode the file as UTF-8"],
        lambda fx, tmp: _on_data(tmp, "latin1.txt", LATIN1),
    ),
    "corpus smaller than one global batch": Row(
        [
            "gives 1 training sequence(s) of 64 tokens, fewer than one global batch (4 micro_batch_size x 1 "
            "grad_accum_steps x 1 process(es) = 4); add data, or lower train.micro_batch_size or data.seq_len"
        ],
        lambda fx, tmp: _on_data(tmp, "tiny.jsonl", TINY, "data.val_fraction=0.5"),
    ),
    "damaged store shard (offline training)": Row(
        ["shard train/shard-00000.parquet does not match its sha256 (checksum mismatch); run"],
        lambda fx, tmp: _train(
            tmp / "run", "distill.signal=offline", f"distill.store={_damaged_store(tmp)}", "distill.shuffle_buffer=0"
        ),
    ),
    "full disk at a checkpoint / the export / a store shard": Row(
        ["no space left on device while writing checkpoint", "step-0000004; the newest complete checkpoint is"],
        lambda fx, tmp: _full_disk(tmp),
    ),
    "a node lost mid-run": Row(
        ["lost rank 1"],
        None,
        covered_by="tests/test_multinode.py::test_a_node_lost_mid_step_ends_the_job_naming_the_rank",
    ),
    "a finished run, the same command again": Row(
        ["holds this run, finished at step 5: nothing to do"],
        lambda fx, tmp: _train(_smoke_copy(fx, tmp)),
        ok=True,
        default=True,
    ),
    "a finished run, another config": Row(
        ["holds a finished run written with distill.alpha=0.5 but this run has distill.alpha=0.7; choose another"],
        lambda fx, tmp: _train(_smoke_copy(fx, tmp), "distill.alpha=0.7"),
        default=True,
    ),
    "a finished run, more steps without a checkpoint": Row(
        ["holds a finished run of 5 steps without a checkpoint to continue from (it saved every train.save_every="],
        lambda fx, tmp: _train(_smoke_copy(fx, tmp), "train.max_steps=7"),
        default=True,
    ),
    "`train.resume: false` on a finished run": Row(
        ["holds an earlier run, finished at step 5; choose another output_dir, or delete"],
        lambda fx, tmp: _train(_smoke_copy(fx, tmp), "train.resume=false"),
        default=True,
    ),
    "`distill eval --json` that cannot be written": Row(
        ["cannot be written: ", "is a file, not a directory"],
        lambda fx, tmp: _cli(
            ["eval", "--model", f"s={fx['smoke'] / 'final'}", "--json", str(_write(tmp, "file", b"x") / "eval.json")]
        ),
        default=True,
    ),
    "`distill report --out` onto a file": Row(
        ["--out ", "cannot be written: ", "is a file, not a directory"],
        lambda fx, tmp: _cli(["report", str(fx["smoke"]), "--out", str(_write(tmp, "file", b"x"))]),
        default=True,
    ),
    "`distill eval --model` trained with another tokenizer": Row(
        ["was trained with another tokenizer than this evaluation's (token id "],
        lambda fx, tmp: _cli(["eval", "--config", str(SMOKE), "--model", f"other={_other_tokenizer(fx, tmp)}"]),
    ),
    "`distill eval --model` whose vocabulary is too small": Row(
        ["tokens but --model ce=", "has only vocab_size=256 embedding rows"],
        lambda fx, tmp: _cli(["eval", "--config", str(SMOKE), "--model", f"ce={_small_vocab_model(tmp)}"]),
    ),
    "an offline run with a `data.source` naming other data": Row(
        ["distill.signal=offline trains on the rows of distill.store=", "names other data; set data.source="],
        lambda fx, tmp: _train(
            tmp / "run",
            "distill.signal=offline",
            f"distill.store={precomputed_store(f'distill.store_top_k={TOP_K}')}",
            f"data.source={_write(tmp, 't.jsonl', TEXT_ROWS)}",
        ),  # fmt: skip
    ),
    "a malformed conversation": Row(
        [":8: turn 0 is an assistant turn before any user turn; 1 of 31 conversations are malformed"],
        lambda fx, tmp: _on_data(tmp, "chat.jsonl", _chat(ASSISTANT_FIRST)),
    ),
    "a conversation that is not a list of turns": Row(
        [":8: turn 0 (user) has content None, not text; 1 of 31 conversations are malformed"],
        lambda fx, tmp: _on_data(tmp, "chat.jsonl", _chat([{"role": "user", "content": None}])),
        default=True,
    ),
    "a chat template that does not parse": Row(
        ["is not valid Jinja: line 1: "],
        lambda fx, tmp: _train(
            tmp / "run",
            f"tokenizer.chat_template={_write(tmp, 'bad.jinja', b'{% for m in messages %}{{ m.content }')}",
            f"tokenizer.path={fx['student_dir']}",
        ),
    ),
    "LoRA target modules that match nothing": Row(
        ["student.lora.target_modules=['qq_proj'] matches no module of the student (", "its linear layers are"],
        lambda fx, tmp: _train(tmp / "run", "student.lora.target_modules=[qq_proj]"),
        default=True,
    ),
    "conversations all cut at `data.seq_len`": Row(
        ["has no tokens to learn from: ", "conversations were dropped because their first assistant turn ends beyond"],
        lambda fx, tmp: _on_data(tmp, "chat.jsonl", _chat(), "data.seq_len=8", "data.val_fraction=0.2"),
    ),
    "prompts with no room for `max_new_tokens` (`distill generate`)": Row(
        ["no usable prompt in the train split: of ", "generate.sampling.max_new_tokens=255"],
        lambda fx, tmp: _generate(tmp, "generate.sampling.max_new_tokens=255"),
    ),
    "a sample store emptied by a small `data.seq_len`": Row(
        ["has no completion tokens to learn from: ", "samples were dropped, their prompts at least data.seq_len=4"],
        lambda fx, tmp: _train(
            tmp / "run", f"data.source={_samples(fx, tmp)}", "data.seq_len=4", "teacher=null", "distill.alpha=0"
        ),
    ),
    "a mistyped `data.messages_field`": Row(
        ["no conversation field 'mesages' (data.messages_field); columns are ['messages'] (did you mean 'messages'?)"],
        lambda fx, tmp: _on_data(tmp, "chat.jsonl", _chat(), "data.messages_field=mesages"),
        default=True,
    ),
    "a store given as `data.source`": Row(
        ["is a logit store, not documents: a logit store is read with distill.signal=offline distill.store="],
        lambda fx, tmp: _train(tmp / "run", f"data.source={precomputed_store(f'distill.store_top_k={TOP_K}')}"),
    ),
    "a store another job is writing": Row(
        ["(`distill precompute` is writing it now (host"],
        lambda fx, tmp: _holding(
            tmp / "s",
            "distill.store",
            lambda: _train(tmp / "run", "distill.signal=offline", f"distill.store={tmp / 's'}"),
        ),  # fmt: skip
    ),
    "a sample store whose tokenizer was edited": Row(
        ["tokenizer/ is not the tokenizer the samples were made with", "it was changed after `distill generate`"],
        lambda fx, tmp: _train(
            tmp / "run", f"data.source={_edit_tokenizer(_samples(fx, tmp))}", "teacher=null", "distill.alpha=0"
        ),
    ),
    "on-policy rows that start mid-completion": Row(
        ["training rows start mid-completion: their documents are longer than data.seq_len=64 tokens"],
        lambda fx, tmp: _on_data(
            tmp,
            "long.jsonl",
            LONG_PAIRS,
            "data.prompt_field=prompt",
            "data.completion_field=completion",
            "data.packing=false",
            "distill.on_policy=0.5",
            "distill.sampling.max_new_tokens=8",
        ),  # fmt: skip
    ),
    "a refusal on 2 processes": Row(
        ["fewer than one global batch"],  # error_line: one `error:` line for the whole job
        lambda fx, tmp: _train(tmp / "run", "train.micro_batch_size=5000", launcher=torchrun(29662, "train.py")),
        status=1,
    ),
    "Ctrl-C during the last step's final validation": Row(
        ["interrupted at step 2: checkpoint"],
        None,
        covered_by="tests/test_resume.py::test_ctrl_c_during_the_last_steps_final_validation_checkpoints_and_exits_130",
    ),
    "torn last line in `metrics.jsonl`": Row(
        ["metrics.jsonl: skipped its last line (", "), not a complete record (a write cut short?)"],
        _torn_metrics,
        ok=True,
    ),
}


class Fixtures(dict):
    """What the recipes build on, each made the first time a row asks for it: `finished` (a finished 6-step run with
    checkpoints step-0000004 and step-0000006), `smoke` (the session's finished 5-step smoke run, no checkpoint),
    `student_dir` (a tiny pretrained student with its tokenizer)."""

    def __init__(self, request, tmp_path_factory):
        super().__init__()
        self.request, self.tmp_path_factory = request, tmp_path_factory

    def __missing__(self, key: str):
        if key == "finished":
            out = self.tmp_path_factory.mktemp("finished") / "run"
            run_cli(["train", "--config", str(SMOKE), f"output_dir={out}", *RUN])
            self[key] = out
        else:
            self[key] = self.request.getfixturevalue({"smoke": "smoke_run"}.get(key, key))
        return self[key]


@pytest.fixture(scope="module")
def fx(request, tmp_path_factory) -> Fixtures:
    return Fixtures(request, tmp_path_factory)


def test_every_row_has_a_recipe_and_every_recipe_a_row():
    assert set(table_rows()) == set(ROWS)


@pytest.mark.parametrize(
    "case", [pytest.param(case, marks=() if row.default else pytest.mark.slow) for case, row in ROWS.items()]
)
def test_row(case, fx, tmp_path):
    message = table_rows()[case]
    row = ROWS[case]
    for fragment in row.fragments:
        assert fragment in message, f"the table's row {case!r} does not show {fragment!r}"
    if row.covered_by is not None:  # that test runs in the same (slow) tier and checks the same fragment
        path, name = row.covered_by.split("::")
        source = (ROOT / path).read_text()
        body = source.split(f"def {name}(", 1)[1].split("\ndef ", 1)[0]
        assert all(f in body for f in row.fragments), f"{row.covered_by} does not check {row.fragments}"
        return
    proc = row.run(fx, tmp_path)
    if row.ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
        output = proc.stdout + proc.stderr
    else:
        output = error_line(proc, row.status)
    for fragment in row.fragments:
        assert fragment in output, output
