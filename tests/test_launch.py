"""Every file in launch/ parses with the installed accelerate and DeepSpeed, the way `accelerate launch` reads it.

Accelerate files go through accelerate's own launch-argument validation and environment preparation, then the
plugin the training process would build from that environment; DeepSpeed files through DeepSpeed's config parser.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .helpers import ROOT

LAUNCH = ROOT / "launch"
FILES = sorted(p for p in LAUNCH.rglob("*") if p.suffix in (".yaml", ".json"))
STRATEGIES = {"cpu", "ddp", "zero2", "zero3", "fsdp2", "multinode"}


def test_every_strategy_has_a_launch_file():
    assert {p.stem for p in (LAUNCH / "accelerate").glob("*.yaml")} == STRATEGIES
    assert {p.name for p in (LAUNCH / "deepspeed").glob("*.json")} == {
        "zero2.json",
        "zero3.json",
        "teacher_zero3.json",
        "teacher_zero3_offload.json",
    }


def _launch_env(path: Path) -> tuple[object, dict[str, str]]:
    """What `accelerate launch --config_file PATH train.py` validates and puts in the workers' environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate.commands.launch.launch_command does before its DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return args, prepare_deepspeed_cmd_env(args)[1]
    if args.multi_gpu or args.use_fsdp:
        return args, prepare_multi_gpu_env(args)
    return args, {}


def _ds_parse(config: dict) -> object:
    from deepspeed.runtime.config import DeepSpeedConfig

    filled = json.loads(json.dumps(config).replace('"auto"', "1"))  # what Accelerate fills in from the run
    filled["bf16"] = {"enabled": True}
    filled.pop("train_batch_size", None)
    return DeepSpeedConfig(filled)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(LAUNCH)))
def test_launch_file_parses(path, monkeypatch):
    if path.suffix == ".json":
        config = json.loads(path.read_text())
        parsed = _ds_parse(config)
        assert parsed.zero_optimization_stage == config["zero_optimization"]["stage"]
        if path.stem.startswith("teacher_"):
            # The shipped teacher files are the built-in config (for an 8B, hidden 4096, bf16 teacher).
            from distributed_distill.config import TeacherConfig
            from distributed_distill.teacher import zero3_inference_config

            offload = "cpu" if path.stem.endswith("offload") else "none"
            tcfg = TeacherConfig(path="org/teacher-8b", dtype="bfloat16", engine="zero3", offload=offload)
            assert config == json.loads(json.dumps(zero3_inference_config(tcfg, hidden_size=4096)))
        return

    from accelerate.commands.config.config_args import load_config_from_file

    raw = yaml.safe_load(path.read_text())
    loaded = load_config_from_file(str(path))
    assert loaded.distributed_type.value == raw["distributed_type"]
    assert loaded.num_processes == raw["num_processes"]
    assert path.read_text().startswith("#") and "accelerate launch --config_file" in path.read_text()
    args, env = _launch_env(path)
    assert args.num_processes == raw["num_processes"] and args.num_machines == raw["num_machines"]
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    if raw["distributed_type"] == "DEEPSPEED":
        from accelerate.utils import DeepSpeedPlugin

        ds_file = ROOT / raw["deepspeed_config"]["deepspeed_config_file"]
        assert ds_file.is_file()
        monkeypatch.chdir(ROOT)
        plugin = DeepSpeedPlugin()  # from the launcher's environment, as the Accelerator in train.py builds it
        assert plugin.zero_stage == json.loads(ds_file.read_text())["zero_optimization"]["stage"]
        assert f"zero{plugin.zero_stage}" == path.stem
        assert plugin.zero3_init_flag == (plugin.zero_stage == 3)
    elif raw["distributed_type"] == "FSDP":
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2
        assert plugin.reshard_after_forward is True
    elif raw["distributed_type"] == "MULTI_CPU":
        assert args.use_cpu
