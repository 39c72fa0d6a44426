"""Real 2-process CPU runs (gloo), launched by torchrun and by accelerate launch."""

import json
import sys

import pytest

from .helpers import SMOKE, TWO_PROCESS, read_metrics, run_cli

pytestmark = pytest.mark.multiprocess

# The session's 2-process smoke run (conftest's `two_process_run`) without its micro-batch size: 4 steps, eval every 2.
COMMON = [o for o in TWO_PROCESS if not o.startswith("train.micro_batch_size=")]
ACCELERATE = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--main_process_port",
    "29532",
    "train.py",
]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp") / "one"
    run_cli(["train", "--config", str(SMOKE), f"output_dir={out}", "train.micro_batch_size=4", *COMMON])
    return out


def _compare(one, two):
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "kd_loss", "ce_loss", "num_tokens", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-4), (key, ra["step"])
        if "val_loss" in ra:
            assert rb["val_loss"] == pytest.approx(ra["val_loss"], abs=1e-4)
            assert rb["val_tokens"] == ra["val_tokens"]  # the validation split is covered once, not twice
    seen = [json.loads((two / "ranks" / f"rank-{r}.json").read_text())["first_sample_indices"] for r in (0, 1)]
    assert all(json.loads((two / "ranks" / f"rank-{r}.json").read_text())["world_size"] == 2 for r in (0, 1))
    assert not set(seen[0]) & set(seen[1]), "both ranks trained on the same samples"
    reference = json.loads((one / "ranks" / "rank-0.json").read_text())["first_sample_indices"]
    interleaved = [i for step in range(4) for r in (0, 1) for i in seen[r][2 * step : 2 * step + 2]]
    assert interleaved == reference[:16]


# launch/accelerate/cpu.yaml: the config file alone (no environment variable) must give 2 CPU processes.
CPU_YAML = [*ACCELERATE[:3], "--config_file", "launch/accelerate/cpu.yaml", "--main_process_port", "29533", "train.py"]


@pytest.mark.parametrize(
    "launcher",
    # torchrun in the default run; `make test-slow` (CI) the accelerate launchers.
    ["torchrun", pytest.param("accelerate", marks=pytest.mark.slow), pytest.param("cpu.yaml", marks=pytest.mark.slow)],
)
def test_two_processes_match_one_process(request, one_process, tmp_path, launcher):
    if launcher == "torchrun":  # the session's 2-process run (torchrun, micro-batch 2; conftest.py), made once
        out, stdout = request.getfixturevalue("two_process_run")
    else:
        out = tmp_path / launcher
        env = {"ACCELERATE_USE_CPU": "true"} if launcher == "accelerate" else {}
        stdout = run_cli(
            ["--config", str(SMOKE), f"output_dir={out}", "train.micro_batch_size=2", *COMMON],
            launcher={"accelerate": ACCELERATE, "cpu.yaml": CPU_YAML}[launcher],
            env=env,
            timeout=600,
        ).stdout
    assert "2 process(es)" in stdout
    _compare(one_process, out)
    assert (out / "final" / "model.safetensors").is_file()
