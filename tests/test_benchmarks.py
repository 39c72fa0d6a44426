"""The benchmark scripts the docs quote their figures from, each run for real at a tiny size, so that every quoted
command keeps running and printing its figures: benchmarks/online_overhead.py, chunk_speed.py (the step and
`--loss-only`), on_policy.py, generate.py, teacher_memory.py and on_policy_demo.py. Each test checks what the script
prints (its JSON and its table agree, the figures are finite and positive, the ratios are the ratios of the figures)
and what it checks or writes itself (token counts, the ZeRO-3 partition, the demo's runs and results); whether a
target is met is judged at the full size, in the docs, not here. benchmarks/store.py and hint_memory.py run at a tiny
size in test_store_benchmarks.py and test_hints.py."""

from __future__ import annotations

import json
import math
import sys

import pytest
import yaml

from distributed_distill.on_policy import is_on_policy

from .helpers import ROOT, read_metrics, run_cli

# The models and batch of online_overhead.add_size_args (online_overhead.py, chunk_speed.py, on_policy.py), tiny.
TINY_MODELS = ["--vocab", "512", "--student-hidden", "32", "--student-layers", "1", "--teacher-hidden", "64",
               "--teacher-layers", "1", "--batch", "2"]  # fmt: skip


def bench(script: str, *args: str, timeout: int = 300) -> str:
    """stdout of `python benchmarks/<script> ...` (a fresh interpreter in the checkout), which must exit 0."""
    return run_cli([str(ROOT / "benchmarks" / script), *args], launcher=[sys.executable], timeout=timeout).stdout


def leading_json(stdout: str):
    """The JSON document a script prints before its table (after any library warnings on stdout)."""
    lines = stdout.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.rstrip() in ("{", "["))
    value, _ = json.JSONDecoder().raw_decode("".join(lines[start:]))
    return value


def table(stdout: str) -> dict[str, list[str]]:
    """The printed markdown table's rows (header included, separator not), by first cell."""
    rows = [line.strip().strip("|").split("|") for line in stdout.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_online_overhead_prints_its_timings_and_ratio():
    out = bench("online_overhead.py", *TINY_MODELS, "--seq-len", "32", "--repeats", "2")
    result = leading_json(out)
    med, cpu = result["seconds_median"], result["cpu_seconds_median"]
    for name in ("kd", "ce", "teacher"):
        assert positive(med[name]) and positive(cpu[name]) and len(result["seconds_all"][name]) == 2, name
    assert result["ratio"] == pytest.approx(med["kd"] / (med["ce"] + med["teacher"]))
    assert result["cpu_ratio"] == pytest.approx(cpu["kd"] / (cpu["ce"] + cpu["teacher"]))
    assert len(result["ratio_per_round"]) == 2 and all(positive(r) for r in result["ratio_per_round"])
    assert positive(result["config"]["chunk_rows"]) and result["config"]["vocab"] == 512
    rows = table(out)
    for label, name in [("online KD step", "kd"), ("plain CE step of the same student", "ce"),
                        ("teacher forward alone (with logits)", "teacher")]:  # fmt: skip
        assert rows[label] == [f"{med[name]:.3f}", f"{cpu[name]:.3f}"], label
    wall, cpu_time = rows["**KD / (CE + teacher)**"]
    assert wall.startswith(f"**{result['ratio']:.3f}** (per round ") and cpu_time == f"**{result['cpu_ratio']:.3f}**"


@pytest.mark.slow
@pytest.mark.parametrize("loss_only", [False, True], ids=["step", "loss-only"])
def test_chunk_speed_prints_both_settings_and_their_ratio(loss_only):
    # 2 x 31 loss rows: `auto` takes them in one chunk, 16 in four.
    args = [*TINY_MODELS, "--seq-len", "32", "--repeats", "2", "--settings", "auto,16"]
    out = bench("chunk_speed.py", *args, *(["--loss-only"] if loss_only else []))
    result = leading_json(out)
    assert result["config"]["loss_only"] is loss_only
    assert result["rows"]["16"] == 16 and positive(result["rows"]["auto"])
    med, cpu = result["seconds_median"], result["cpu_seconds_median"]
    for s in ("auto", "16"):
        assert positive(med[s]) and positive(cpu[s]) and len(result["seconds_all"][s]) == 2, s
    assert result["ratio"] == pytest.approx(med["auto"] / med["16"]) and positive(result["ratio"])
    assert result["cpu_ratio"] == pytest.approx(cpu["auto"] / cpu["16"]) and positive(result["cpu_ratio"])
    assert 0 <= result["rounds_first_faster"] <= 2
    rows = table(out)
    for s in ("auto", "16"):
        assert rows[s] == [str(result["rows"][s]), f"{med[s]:.3f}", f"{cpu[s]:.3f}"], s
    assert rows["**auto / 16**"] == ["", f"**{result['ratio']:.3f}x**", f"**{result['cpu_ratio']:.3f}x**"]
    assert f"auto was faster in {result['rounds_first_faster']} of 2 paired rounds" in out


@pytest.mark.slow
def test_on_policy_benchmark_breaks_both_steps_down():
    out = bench("on_policy.py", *TINY_MODELS, "--prompt-len", "8", "--new-tokens", "8", "--repeats", "2")
    result = leading_json(out)
    assert result["config"]["seq_len"] == 16
    assert result["seconds_all"]["generated_tokens"] == [2 * 8, 2 * 8]  # every row samples exactly --new-tokens
    parts = result["seconds_median"]
    assert parts["off_policy"]["generation"] == 0.0 and positive(parts["on_policy"]["generation"])
    for policy, p in parts.items():
        assert positive(p["total"]) and positive(p["teacher_scoring"]), policy
        # The student's share is the step less the teacher's, timed apart: finite, not necessarily positive.
        assert math.isfinite(p["student_fwd_bwd"])
        assert p["total"] == pytest.approx(p["generation"] + p["teacher_scoring"] + p["student_fwd_bwd"])
    on, off = parts["on_policy"]["total"], parts["off_policy"]["total"]
    assert result["on_over_off"] == pytest.approx(on / off) and positive(result["on_over_off"])
    assert 0 < result["generation_share_of_on_policy_step"] < 1
    assert result["generated_tokens_per_second"] == pytest.approx(16 / parts["on_policy"]["generation"])
    rows = table(out)
    for policy, p in parts.items():
        keys = ("generation", "teacher_scoring", "student_fwd_bwd", "total")
        assert rows[policy.replace("_", "-")] == [f"{p[k]:.3f}" for k in keys], policy
    assert f"on-policy / off-policy step: {result['on_over_off']:.2f}x" in out


@pytest.mark.slow
def test_generate_benchmark_samples_the_asked_tokens_three_ways():
    prompts, new_tokens = 4, 8
    args = ["--prompts", str(prompts), "--batch", "2", "--max-new-tokens", str(new_tokens), "--repeats", "2",
            "--vocab", "1024", "--teacher-hidden", "64", "--teacher-layers", "2", "--top-k", "8"]  # fmt: skip
    out = bench("generate.py", *args)
    figures = {r["figure"]: r for r in map(json.loads, (line for line in out.splitlines() if line.startswith("{")))}
    speed = {name: figures[f"{name}_tokens_per_second"] for name in ("hf", "ours", "topk")}
    for name, row in speed.items():
        assert row["tokens"] == prompts * new_tokens and positive(row["value"]), name  # no EOS: every token asked
    assert all(positive(r["value"]) for r in figures.values()) and len(figures) == 7
    # Same tokens in each: the time ratios are the inverse ratios of the speeds.
    tokens_per_s = {name: row["value"] for name, row in speed.items()}
    assert figures["ours_vs_hf_tokens_per_second"]["value"] == pytest.approx(tokens_per_s["ours"] / tokens_per_s["hf"])
    assert figures["topk_vs_ours_time"]["value"] == pytest.approx(tokens_per_s["ours"] / tokens_per_s["topk"])
    rows = table(out)
    for name, row in figures.items():
        assert rows[name] == [f"{row['value']:.3f}", row.get("target", "")], name


@pytest.mark.slow
@pytest.mark.multiprocess
def test_teacher_memory_benchmark_partitions_the_zero3_teacher():
    out = bench("teacher_memory.py", "--hidden", "64", "--layers", "1", "--vocab", "1000", "--port", "29880")
    records = leading_json(out)
    assert [(r["engine"], r["rank"]) for r in records] == [(e, k) for e in ("replicated", "zero3") for k in (0, 1)]
    (count,), (full,) = {r["num_parameters"] for r in records}, {r["full_bytes"] for r in records}
    assert positive(count) and positive(full)
    for r in records:
        assert r["world_size"] == 2 and positive(r["peak_rss_bytes"]) and positive(r["rss_anon_bytes"]), r
        assert r["ratio"] == pytest.approx(r["param_bytes"] / full)
    replicated = [r for r in records if r["engine"] == "replicated"]
    zero3 = [r for r in records if r["engine"] == "zero3"]
    assert all(r["param_bytes"] == full for r in replicated)
    # Each rank holds a part (its partition and the small vectors kept whole); together they hold every parameter.
    assert all(0 < r["ratio"] < 1 for r in zero3) and sum(r["param_bytes"] for r in zero3) >= full
    rows = [line for line in out.splitlines() if line.startswith("| replicated |") or line.startswith("| zero3 |")]
    assert [line.split("|")[4].strip() for line in rows] == [f"{r['ratio']:.3f}x" for r in records]
    worst = max(r["ratio"] for r in zero3)
    verdict = "met" if worst <= 0.55 else "NOT met"
    assert f"zero3 parameter bytes per rank: {worst:.3f}x of the whole teacher (target <= 0.55): {verdict}" in out


@pytest.mark.slow
def test_on_policy_demo_trains_every_phase_and_scores_each_model(tmp_path):
    """Every phase at a tiny size (2 steps each, continued by 1; 64 conversations, a 512-token tokenizer, 8 new
    tokens), then a rerun that keeps the finished runs. Its time is mostly the start of each `distill train`."""
    out_dir = tmp_path / "on_policy_demo"
    args = ["--output-dir", str(out_dir), "--teacher-steps", "2", "--student-steps", "2", "--continue-steps", "1",
            "--eval-prompts", "2", "data.max_documents=64", "tokenizer.vocab_size=512", "train.eval_batches=1",
            "train.micro_batch_size=2", "train.log_every=1", "distill.sampling.max_new_tokens=8"]  # fmt: skip
    out = bench("on_policy_demo.py", *args)
    runs = {
        "teacher": "teacher",
        "student, off-policy": "student_off_policy",
        "student, on-policy 0.5": "student_on_policy",
        "off-policy student + 1 off-policy steps": "continued_off_policy",
        "off-policy student + 1 on-policy steps": "continued_on_policy",
    }
    results = json.loads((out_dir / "results.json").read_text())
    assert [r["model"] for r in results] == list(runs)
    for r in results:
        metrics = read_metrics(out_dir / runs[r["model"]])
        assert r["prompts"] == 2 and positive(r["teacher_nll"]) and 0 < r["mean_sample_length"] <= 8, r
        assert r["val_loss"] == [m["val_loss"] for m in metrics if "val_loss" in m][-1] and positive(r["val_loss"])
    # The table printed is the one written, one row per model.
    md = (out_dir / "results.md").read_text()
    assert out.endswith(md) and all(f"| {model} | {r['teacher_nll']:.3f} |" in md for model, r in zip(runs, results))
    # The on-policy steps are where distill.on_policy puts them: none off-policy, every step at share 1.
    seed = yaml.safe_load((out_dir / "student_on_policy" / "config.yaml").read_text())["train"]["seed"]
    for run, share, steps in [("student_off_policy", 0, 2), ("student_on_policy", 0.5, 2),
                              ("continued_off_policy", 0, 1), ("continued_on_policy", 1, 1)]:  # fmt: skip
        records = [m for m in read_metrics(out_dir / run) if "loss" in m]
        assert [m["step"] for m in records] == list(range(1, steps + 1)), run
        expected = [is_on_policy(seed, step, share) for step in range(1, steps + 1)]
        assert [m.get("on_policy", False) for m in records] == expected, run
        assert all(m["generated_tokens"] == 2 * m["mean_sample_length"] for m in records if m.get("on_policy")), run
    # A rerun keeps every finished run and scores them again, to the same table.
    again = bench("on_policy_demo.py", *args)
    assert all(f"{out_dir / run}: finished earlier, kept" in again for run in runs.values())
    assert json.loads((out_dir / "results.json").read_text()) == results and again.endswith(md)


@pytest.mark.slow
def test_loss_memory_benchmark_chunked_against_naive_and_the_floor():
    """benchmarks/loss_memory.py at a tiny size without the peers (test_peers.py runs it with them): the chunked
    loss equals the naive one in value and gradient, holds less memory, and the matmul floor is printed beside it."""
    out = bench("loss_memory.py", "--tokens", "512", "--hidden", "64", "--vocab", "8000", "--repeats", "2",
                "--paths", "naive,chunked,matmuls")  # fmt: skip
    result, rows = leading_json(out), table(out)
    agreement = result["agreement"]
    assert agreement["kd_sum_rel_diff"] < 1e-5 and agreement["ce_sum_rel_diff"] < 1e-5, agreement
    assert agreement["grad_norm_weight_rel_diff"] < 1e-5 and agreement["grad_norm_hidden_rel_diff"] < 1e-5
    assert result["chunked"]["peak_bytes"] < result["naive"]["peak_bytes"]
    for path in ("naive", "chunked", "matmuls"):
        r = result[path]
        assert len(r["seconds_all"]) == 2 and positive(r["seconds"]) and positive(r["cpu_seconds"])
        assert rows[path][0] == f"{r['peak_bytes'] / 2**30:.2f}"
    assert result["chunked"]["vs_matmuls"] == pytest.approx(result["chunked"]["seconds"] / result["matmuls"]["seconds"])


@pytest.mark.slow
@pytest.mark.release  # CI's siblings: every section's own test (engines, on-policy, hints, generate, stores, losses)
@pytest.mark.multiprocess
def test_gpu_check_runs_every_section_on_its_cpu_fallback(tmp_path):
    """benchmarks/gpu_check.sh with DEVICE=cpu: every section it runs on a GPU (teacher engines, training with each
    engine, on-policy steps, hints, generate, precompute and offline, the loss against Liger) at a tiny size on 2
    CPU processes, ending in its tables; so the script the first GPU machine runs is known to work up to CUDA."""
    import os
    import subprocess

    env = {**os.environ, "DEVICE": "cpu", "OUT": str(tmp_path), "PY": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)  # fmt: skip
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    for section in range(1, 7):
        assert f"== {section}." in done.stdout
    for run in ("replicated", "zero3", "on_policy", "hints", "offline"):
        assert f"| {run} |" in done.stdout, run
        metrics = read_metrics(tmp_path / f"train-{run}")
        assert all(math.isfinite(r["loss"]) for r in metrics if "loss" in r)
    # distill.on_policy=0.5: the steps that sample are the ones is_on_policy picks for the smoke config's seed
    seed = yaml.safe_load((tmp_path / "train-on_policy" / "config.yaml").read_text())["train"]["seed"]
    on_policy = [r for r in read_metrics(tmp_path / "train-on_policy") if "on_policy" in r]
    assert [r["on_policy"] for r in on_policy] == [is_on_policy(seed, r["step"], 0.5) for r in on_policy]
    assert any("hint_loss" in r for r in read_metrics(tmp_path / "train-hints"))
    assert (tmp_path / "store" / "manifest.json").is_file()
    assert "| chunked |" in (tmp_path / "loss.txt").read_text()


@pytest.mark.slow
def test_remote_teacher_benchmark_times_local_remote_and_no_overlap():
    """benchmarks/remote_teacher.py --tiny: real `distill train` runs against `distill serve` on loopback and in-process
    (one micro-batch size); the printed ratios are the medians' and the table repeats the JSON."""
    out = bench("remote_teacher.py", "--tiny", timeout=600)
    [r] = leading_json(out)["results"]
    rates = r["tokens_per_second"]
    assert set(rates) == {"local", "remote", "no-overlap"} and all(positive(v) for v in rates.values())
    assert r["ratio_remote"] == pytest.approx(rates["local"] / rates["remote"])
    assert r["ratio_no_overlap"] == pytest.approx(rates["local"] / rates["no-overlap"])
    row = table(out)[str(r["micro_batch_size"])]
    assert row[1:] == [f"{rates['local']:.0f}", f"{rates['remote']:.0f}", f"{rates['no-overlap']:.0f}",
                       f"{r['ratio_remote']:.3f}x", f"{r['ratio_no_overlap']:.3f}x"]  # fmt: skip
