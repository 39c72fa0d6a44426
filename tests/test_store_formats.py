"""Store 2.0 (store/encoding.py, docs/store.md): every target kind and encoding round-trips within its stated error,
verify-store checks each of them, a store of format version 1 still reads, and sampled targets are seeded per row
(the same draws whatever the batch, the process count or the chunking)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from distributed_distill.errors import DistillError
from distributed_distill.store.encoding import (
    bits_for,
    check_rows,
    decode_targets,
    encode_targets,
    pack_bits,
    unpack_bits,
)
from distributed_distill.store.logits import decode_logit_rows, read_logit_manifest, verify_logit_store
from distributed_distill.teacher import draw_seed, sampled_targets, topk_of_logits, unique_counts

from .helpers import SAMPLED_STORE, SMOKE, precomputed_store, read_metrics, run_cli, store_files

V1_STORE = Path(__file__).parent / "data" / "logit_store_v1"
ROWS, P, V = 3, 9, 300


@pytest.mark.parametrize("width", [1, 3, 8, 9, 12, 17, 31, 32])
def test_bit_packing_round_trips_at_every_width(width):
    rng = np.random.default_rng(width)
    values = rng.integers(0, 2**width, size=1001, dtype=np.int64)
    packed = pack_bits(values, width)
    assert len(packed) == -(-1001 * width // 8)  # no byte beyond the bits
    assert np.array_equal(unpack_bits(packed, width, 1001), values)
    assert np.array_equal(unpack_bits(packed, width, 10), values[:10])
    assert bits_for(2) == 1 and bits_for(4096) == 12 and bits_for(4097) == 13 and bits_for(65) == 7


def _topk(k: int) -> SimpleNamespace:
    logits = torch.randn(ROWS * P, V, generator=torch.Generator().manual_seed(k)) * 3
    t = topk_of_logits(logits, k, 1.0)
    return SimpleNamespace(ids=t.ids, logprobs=t.logprobs.half().float(), tail_logmass=t.tail_logmass, counts=None)


def _decode(columns: dict, manifest: dict) -> dict:
    table = pa.table({"index": pa.array(np.arange(ROWS)), **columns})
    return decode_targets(table, manifest, ROWS, P)


@pytest.mark.parametrize("k", [1, 8, 64])
def test_topk_encodings_round_trip_within_their_stated_error(k):
    t = _topk(k)
    plain = _decode(encode_targets(t, ROWS, V, "plain"), {"top_k": k, "vocab_size": V})  # (a version 1 manifest)
    assert torch.equal(plain["teacher_ids"].reshape(-1, k), t.ids)
    assert torch.equal(plain["teacher_logprobs"].reshape(-1, k), t.logprobs)
    assert torch.equal(plain["teacher_tail"].reshape(-1), t.tail_logmass.half().float())
    manifest = {"targets": "top_k", "encoding": "packed", "top_k": k, "vocab_size": V}
    packed = _decode(encode_targets(t, ROWS, V, "packed"), manifest)
    assert torch.equal(packed["teacher_ids"].reshape(-1, k), t.ids)  # ids are exact
    hi, lo = t.logprobs[:, 0], t.logprobs[:, -1]
    # The stated bound: half a code step of the position's own scale, plus float16's rounding of hi and lo.
    bound = (hi - lo) / 510 + 2 * 2**-11 * hi.abs().maximum(lo.abs()) + 1e-6
    err = (packed["teacher_logprobs"].reshape(-1, k) - t.logprobs).abs().max(-1).values
    assert bool((err <= bound).all()), (err - bound).max()
    assert torch.equal(packed["teacher_tail"], plain["teacher_tail"])


@pytest.mark.parametrize("draws", [1, 4, 16, 64])
def test_sampled_encodings_round_trip_exactly(draws):
    logits = torch.randn(ROWS * P, V, generator=torch.Generator().manual_seed(draws))
    t = sampled_targets(logits, torch.eye(V), None, draws, 1.0, [11, 12, 13], chunk_size=5)
    for encoding in ("plain", "packed"):
        manifest = {"targets": "sampled", "encoding": encoding, "samples": draws, "vocab_size": V}
        back = _decode(encode_targets(t, ROWS, V, encoding, draws), manifest)
        assert torch.equal(back["teacher_ids"].reshape(-1, draws), t.ids)
        assert torch.equal(back["teacher_counts"].reshape(-1, draws), t.counts)
        assert torch.equal(back["teacher_entropy"].reshape(-1), t.entropy)


def test_sampled_targets_are_unique_ids_with_counts_and_entropy():
    logits = torch.randn(ROWS * P, V, generator=torch.Generator().manual_seed(0)) * 2
    t = sampled_targets(logits, torch.eye(V), None, 16, 2.0, [1, 2, 3], chunk_size=7)
    counts = t.counts
    assert torch.allclose(counts.sum(-1), torch.ones(ROWS * P))
    assert bool(((counts * 16).round() == counts * 16).all())  # whole draws
    live = counts > 0
    ids = t.ids.masked_fill(~live, -1)
    for row in ids:  # unique and ascending among the drawn
        drawn = row[row >= 0]
        assert torch.equal(drawn, drawn.unique())
    p = (logits / 2).softmax(-1)
    assert torch.allclose(t.entropy, -(p * p.log()).sum(-1), atol=2e-3)  # float16-rounded, as a store keeps it
    # Inverse-CDF draws: the same ids whatever the chunking, and per sequence, whatever the other sequences.
    again = sampled_targets(logits, torch.eye(V), None, 16, 2.0, [1, 2, 3], chunk_size=1024)
    assert torch.equal(again.ids, t.ids) and torch.equal(again.counts, t.counts)
    alone = sampled_targets(logits[P : 2 * P], torch.eye(V), None, 16, 2.0, [2], chunk_size=3)
    assert torch.equal(alone.ids, t.ids[P : 2 * P])
    other = sampled_targets(logits, torch.eye(V), None, 16, 2.0, [1, 99, 3], chunk_size=7)
    assert not torch.equal(other.ids[P : 2 * P], t.ids[P : 2 * P]) and torch.equal(other.ids[:P], t.ids[:P])
    # draw_seed: a function of the seed and the token ids only.
    seq = torch.arange(10)
    assert draw_seed(0, seq) == draw_seed(0, seq.clone()) != draw_seed(1, seq)
    ids, w = unique_counts(torch.tensor([[5, 3, 5, 5]]))
    assert ids.tolist() == [[3, 5, 3, 3]] and w.tolist() == [[0.25, 0.75, 0.0, 0.0]]


def test_bad_sampled_rows_are_named():
    t = sampled_targets(torch.randn(ROWS * P, V), torch.eye(V), None, 8, 1.0, [1, 2, 3])
    manifest = {"targets": "sampled", "encoding": "plain", "samples": 8, "vocab_size": V}
    columns = encode_targets(t, ROWS, V, "plain", 8)
    table = pa.table({"index": pa.array(np.arange(ROWS)), **columns})
    check_rows(table, manifest, "shard x", P + 1)  # a good shard passes
    counts = table["teacher_counts"].combine_chunks()
    values = counts.values.to_numpy().copy()
    values[len(values) - 1] += 1  # one more draw in the last row
    broken = table.set_column(
        table.column_names.index("teacher_counts"), "teacher_counts", pa.ListArray.from_arrays(counts.offsets, values)
    )
    with pytest.raises(DistillError, match=r"shard x row 2: its counts do not add up to 8 draws"):
        check_rows(broken, manifest, "shard x", P + 1)
    with pytest.raises(DistillError, match="a teacher id is outside the vocabulary"):
        check_rows(table, {**manifest, "vocab_size": 3}, "shard x", P + 1)


def test_a_store_of_format_version_1_still_reads_and_verifies():
    manifest = read_logit_manifest(V1_STORE)
    assert manifest["version"] == 1 and "targets" not in manifest and "encoding" not in manifest
    line = verify_logit_store(V1_STORE)
    assert line.startswith("ok: ") and "k=4, plain" in line
    shard = manifest["splits"]["train"]["shards"][0]
    table = pq.read_table(V1_STORE / shard["path"])
    rows = decode_logit_rows(table, manifest)
    b, s = rows["input_ids"].shape
    raw = table["teacher_logprobs"].combine_chunks().values.to_numpy(zero_copy_only=False).astype(np.float32)
    assert np.array_equal(rows["teacher_logprobs"].numpy().reshape(-1), raw)
    assert rows["teacher_ids"].shape == (b, s - 1, 4) and rows["teacher_tail"].shape == (b, s - 1)


def test_a_store_of_an_unknown_version_is_refused(tmp_path):
    root = tmp_path / "store"
    shutil.copytree(V1_STORE, root)
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "version": 3}))
    with pytest.raises(
        DistillError, match="version 3; this code reads 'distributed_distill.logit_store' version 1 or 2"
    ):
        read_logit_manifest(root)


SAMPLED = SAMPLED_STORE


@pytest.fixture(scope="module")
def sampled_store() -> Path:
    return precomputed_store(*SAMPLED)


@pytest.mark.slow  # the default tier's offline round trip: test_offline.py (8 minutes, docs/testing.md)
def test_a_sampled_packed_store_verifies_and_trains_as_the_online_sampled_teacher(sampled_store, tmp_path):
    line = run_cli(["verify-store", str(sampled_store)]).stdout.strip()
    assert line.startswith("ok: ") and "sampled, 8 draws, packed" in line and "bytes/token" in line
    manifest = json.loads((sampled_store / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["targets"] == "sampled" and manifest["samples"] == 8
    assert manifest["bytes_per_token"] == round(manifest["bytes"] / manifest["tokens"], 2)
    common = ["train.max_steps=4", "train.eval_every=2"]
    online, offline = tmp_path / "online", tmp_path / "offline"
    run_cli(["train", "--config", str(SMOKE), f"output_dir={online}", "distill.samples=8", *common])
    offline_args = ["distill.signal=offline", f"distill.store={sampled_store}", "distill.shuffle_buffer=0"]
    proc = run_cli(["train", "--config", str(SMOKE), f"output_dir={offline}", *common, *offline_args])
    assert "sampled targets (8 draws), packed" in proc.stdout
    a, b = read_metrics(online), read_metrics(offline)
    for ra, rb in zip(a, b, strict=True):  # packed sampled targets are exact: the same draws, counts and entropy
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm", "num_tokens", "val_loss", "val_kd_loss"):
            assert rb.get(key) == pytest.approx(ra.get(key), abs=1e-5), (key, ra["step"])


@pytest.mark.slow
def test_sampled_and_packed_stores_are_byte_identical_across_parts(sampled_store, tmp_path):
    """Draws are seeded per row, so a store written in two parts (a job array) is the store one run writes, byte
    for byte; the same for the packed top-k encoding."""
    packed_topk = ["distill.store_top_k=8", "distill.store_encoding=packed", "distill.store_max_rows=24"]
    for settings, reference in ((SAMPLED, sampled_store), (packed_topk, precomputed_store(*packed_topk))):
        out = tmp_path / settings[0].split("=")[0]
        cmd = ["precompute", "--config", str(SMOKE), f"distill.store={out}", *settings]
        run_cli(cmd, env={"DISTILL_STORE_PART": "1/2"})
        run_cli(cmd, env={"DISTILL_STORE_PART": "0/2"})
        assert store_files(out) == store_files(reference)
        assert run_cli(["verify-store", str(out)]).stdout.startswith("ok: ")


@pytest.mark.parametrize(
    "override, message",
    [
        pytest.param(
            "distill.loss=jsd",
            "holds sampled targets, which estimate forward KL only, but distill.loss=jsd",
            marks=pytest.mark.slow,  # it needs the sampled store (10 s): with the test above, for the 8 minutes
        ),
        pytest.param(
            "distill.top_k=8",
            "holds sampled targets (8 draws) but distill.top_k=8; unset distill.top_k",
            marks=pytest.mark.slow,
        ),
        pytest.param("distill.samples=4", "has 8 draws per token but distill.samples is 4", marks=pytest.mark.slow),
    ],
)
def test_a_sampled_store_that_does_not_fit_the_run_is_refused(sampled_store, tmp_path, override, message):
    args = ["train", "--config", str(SMOKE), f"output_dir={tmp_path / 'run'}", "distill.signal=offline"]
    proc = run_cli([*args, f"distill.store={sampled_store}", override], check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_sampled_targets_refuse_other_divergences_at_config_load(tmp_path):
    proc = run_cli(["train", "--config", str(SMOKE), "distill.samples=8", "distill.loss=reverse_kl"], check=False)
    assert proc.returncode == 2
    assert "sampled targets estimate forward KL only" in proc.stderr and "distill.loss=reverse_kl" in proc.stderr
