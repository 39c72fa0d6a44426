"""Training from the store (`distill.signal=offline`): the same losses as an online top-k run, a 2-process run
that splits the store across ranks once, and clear startup errors for a store that does not fit the run."""

from __future__ import annotations

import json
import sys

import pyarrow.parquet as pq
import pytest

from .helpers import SMOKE, TOP_K, precomputed_store, read_metrics, run_cli


@pytest.fixture(scope="module")
def smoke_store():
    return precomputed_store(f"distill.store_top_k={TOP_K}")


def _offline(store, *extra):
    return ["distill.signal=offline", f"distill.store={store}", *extra]


def test_offline_run_equals_online_topk_run(smoke_store, tmp_path):
    common = ["train.max_steps=6", "train.eval_every=3"]
    online, offline = tmp_path / "online", tmp_path / "offline"
    run_cli(["train", "--config", str(SMOKE), f"output_dir={online}", f"distill.top_k={TOP_K}", *common])
    proc = run_cli(
        [
            "train",
            "--config",
            str(SMOKE),
            f"output_dir={offline}",
            *common,
            *_offline(smoke_store, "distill.shuffle_buffer=0"),
        ]
    )
    a, b = read_metrics(online), read_metrics(offline)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm", "num_tokens"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-4), (key, ra["step"])
    for key in ("val_loss", "val_kd_loss", "val_tokens"):  # validation targets come from the store too
        assert b[-1][key] == pytest.approx(a[-1][key], abs=1e-4), key
    assert b[2]["val_loss"] == pytest.approx(a[2]["val_loss"], abs=1e-4)
    teacher = json.loads((offline / "teacher.json").read_text())
    assert teacher["arch"] == json.loads((online / "teacher.json").read_text())["arch"]
    assert "store_config_hash" in teacher and "teacher params" not in proc.stdout.split("student")[0]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_offline_run_splits_the_store_once(smoke_store, tmp_path):
    out = tmp_path / "two"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29712"]
    overrides = ["train.max_steps=4", *_offline(smoke_store, "distill.shuffle_buffer=0")]
    proc = run_cli(
        ["train.py", "--config", str(SMOKE), f"output_dir={out}", *overrides], launcher=launcher, timeout=600
    )
    assert "2 process(es)" in proc.stdout
    records = read_metrics(out)
    assert all(r["loss"] == r["loss"] for r in records) and "val_loss" in records[-1]
    seen = [json.loads((out / "ranks" / f"rank-{r}.json").read_text())["first_sample_indices"] for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 4 * 4  # 4 steps x micro-batch 4, on each rank
    # Split once, in the store's one global order: without a buffer, rank r takes the r-th micro-batch of 4 of
    # every round of 2, exactly as online batches are dealt. No split would give both ranks the same rows; a second
    # split (by Accelerate) would skip every other row.
    manifest = json.loads((smoke_store / "manifest.json").read_text())
    store_order = [
        i
        for sh in manifest["splits"]["train"]["shards"]
        for i in pq.read_table(smoke_store / sh["path"], columns=["index"])["index"].to_pylist()
    ]
    interleaved = [i for step in range(4) for r in (0, 1) for i in seen[r][4 * step : 4 * step + 4]]
    assert interleaved == store_order[:32]


@pytest.mark.slow
def test_store_of_another_tokenizer_is_refused_before_training(smoke_store, tmp_path):
    out = tmp_path / "other_tok"
    proc = run_cli(
        ["train", "--config", str(SMOKE), f"output_dir={out}", "tokenizer.vocab_size=600", *_offline(smoke_store)],
        check=False,
    )
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "made with another tokenizer" in line
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.seq_len=32", "has seq_len 64 but data.seq_len is 32"),
        pytest.param(
            "distill.temperature=1.0", "has temperature 2.0 but distill.temperature is 1.0", marks=pytest.mark.slow
        ),
        pytest.param("distill.top_k=8", "has top_k 16 but distill.top_k is 8", marks=pytest.mark.slow),
    ],
)
def test_store_that_does_not_fit_the_run_is_refused(smoke_store, tmp_path, override, message):
    proc = run_cli(
        ["train", "--config", str(SMOKE), f"output_dir={tmp_path / 'x'}", override, *_offline(smoke_store)],
        check=False,
    )
    assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.slow
def test_offline_startup_errors(smoke_store, tmp_path):
    proc = run_cli(["train", "--config", str(SMOKE), "distill.signal=offline"], check=False)
    assert proc.returncode == 2 and "distill.signal=offline needs distill.store" in proc.stderr
    proc = run_cli(["train", "--config", str(SMOKE), *_offline(tmp_path / "nowhere")], check=False)
    assert proc.returncode == 2 and "no manifest.json" in proc.stderr
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(smoke_store, damaged)
    (damaged / "train" / "shard-00001.parquet").unlink()
    proc = run_cli(["train", "--config", str(SMOKE), f"output_dir={tmp_path / 'y'}", *_offline(damaged)], check=False)
    assert proc.returncode == 2 and "shard train/shard-00001.parquet is missing" in proc.stderr


def test_shuffle_buffer_is_seeded(smoke_store):
    from distributed_distill.store.logits import TrainStream, read_logit_manifest

    manifest = read_logit_manifest(smoke_store)

    def order(seed: int, buffer: int, rank: int = 0, world: int = 1) -> list[int]:
        stream = TrainStream(smoke_store, manifest, seed, buffer).micro_batches(4, world, rank)
        return [i for _ in range(40) for i in next(stream)["index"].tolist()]

    in_store_order = order(0, 0)
    assert in_store_order == order(0, 0)
    shuffled = order(0, 64)
    assert shuffled == order(0, 64)  # reproducible from the seed
    assert shuffled != in_store_order and shuffled != order(1, 64)
    assert len(set(shuffled)) == len(shuffled)  # a permutation within the epoch: no row twice
    ranks = [order(0, 64, rank, 2) for rank in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])


def test_stream_position_is_global(smoke_store):
    """The store's order does not depend on the number of ranks: 2 ranks' micro-batches interleaved are the one
    rank's stream, and a stream started at a position (a resume, on any number of ranks) continues that order."""
    from distributed_distill.store.logits import TrainStream, read_logit_manifest

    manifest = read_logit_manifest(smoke_store)

    def rows(world: int, rank: int, skip: int, n: int) -> list[list[int]]:
        stream = TrainStream(smoke_store, manifest, 0, 16).micro_batches(2, world, rank, skip=skip)
        return [next(stream)["index"].tolist() for _ in range(n)]

    one = rows(1, 0, 0, 24)
    two = [rows(2, rank, 0, 12) for rank in (0, 1)]
    assert [two[q % 2][q // 2] for q in range(24)] == one
    # 2 ranks stopped after 4 micro-steps each (8 global micro-batches) -> 1 rank continues at its 8th, and back.
    assert rows(1, 0, 8, 4) == one[8:12]
    assert [rows(2, rank, 4, 2) for rank in (0, 1)] == [[one[8], one[10]], [one[9], one[11]]]
