"""The shell scripts (launch/slurm/*.sbatch, .ci/*) parse, pass shellcheck, and keep their documented shape:
every #SBATCH line where sbatch reads it, every variable a user sets documented in the header, and the same
launcher block in every job script. Running them for real: tests/test_slurm.py."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from .helpers import ROOT

SBATCH = sorted((ROOT / "launch" / "slurm").glob("*.sbatch"))
SCRIPTS = SBATCH + [ROOT / ".ci" / "run", ROOT / ".ci" / "slurm.sh"]


def _name(path):
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", SCRIPTS, ids=_name)
def test_script_parses(path):
    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("path", SCRIPTS, ids=_name)
def test_script_passes_shellcheck(path):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck; CI installs it)")
    proc = subprocess.run(["shellcheck", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _header(text: str) -> list[str]:
    """The comment lines before the first command: all that sbatch reads #SBATCH options from."""
    lines = text.splitlines()
    end = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    return lines[:end]


@pytest.mark.parametrize("path", SBATCH, ids=_name)
def test_sbatch_options_and_variables_are_in_the_header(path):
    text = path.read_text()
    header = _header(text)
    assert sum(line.startswith("#SBATCH") for line in header) == text.count("\n#SBATCH"), "#SBATCH after a command"
    for option in ("--requeue", "--open-mode=append", "--output=%x-%j.out", "--ntasks-per-node=1"):
        assert f"#SBATCH {option}" in header
    documented = "\n".join(header)
    # Every variable the script reads with a default is one a user may set (SLURM's own excepted).
    variables = {v for v in re.findall(r"\$\{([A-Z][A-Z0-9_]*):-", text) if not v.startswith("SLURM_")}
    assert variables >= {"NPROC_PER_NODE", "MASTER_PORT", "VENV", "MAX_RESTARTS", "HF_HUB_OFFLINE"}
    for name in variables:
        assert re.search(rf"^#\s+(.*[ ,])?{name}\b", documented, re.M), f"{name} is not documented in the header"


def test_every_job_script_shares_one_launcher_block():
    def block(path):
        text = path.read_text()
        return text[text.index("# ---- launcher:") : text.index("# ---- end of launcher ----")]

    assert [p.name for p in SBATCH] == ["precompute.sbatch", "serve.sbatch", "train.sbatch"]
    assert block(SBATCH[0]) == block(SBATCH[1]) == block(SBATCH[2])
