"""Several teachers in one run (`teachers:`, distributed_distill/teachers.py): the mixture's targets and its KD loss
against a float64 brute force, routing by row, the config's refusals, and `distill train` / `distill precompute`
with two arch teachers (per-teacher metrics, an exact resume after a kill, a store from the mixture)."""

from __future__ import annotations

import json
import signal
import sys

import pytest
import torch
import yaml

from distributed_distill.config import Config, build, load_config
from distributed_distill.errors import ConfigError
from distributed_distill.losses import TeacherTargets, chunked_distill_loss, sparse_kd_loss
from distributed_distill.teachers import mix_targets, part_sums, route_targets

from .helpers import SMOKE, error_line, interrupt, read_metrics, run_cli, training_records

V = 48


def _part(logits: torch.Tensor, k: int) -> TeacherTargets:
    """A teacher's top-k targets of dense logits [N, V] (float64 truth, rounded as an online teacher rounds)."""
    logp = logits.double().log_softmax(-1)
    top, ids = logp.topk(k, -1)
    tail = logp.exp().scatter(-1, ids, 0.0).sum(-1).log()  # the complement summed, as teacher.topk_of_logits does
    return TeacherTargets(ids=ids, logprobs=top.to(torch.float16).float(), tail_logmass=tail.to(torch.float16).float())


def _reference_mixture(parts, weights, k):
    """Brute force, float64, one row and one id at a time: p_mix over the union of listed ids, the k largest kept,
    everything else (each teacher's tail, the union's rest) in the tail."""
    w = [x / sum(weights) for x in weights]
    ids, logprobs, tails = [], [], []
    for r in range(parts[0].ids.shape[0]):
        mass: dict[int, float] = {}
        tail = 0.0
        for p, wi in zip(parts, w):
            for v, lp in zip(p.ids[r].tolist(), p.logprobs[r].double().tolist()):
                mass[v] = mass.get(v, 0.0) + wi * float(torch.tensor(lp, dtype=torch.float64).exp())
            tail += wi * float(p.tail_logmass[r].double().exp())
        kept = sorted(mass, key=lambda v: -mass[v])[:k]
        tail += sum(m for v, m in mass.items() if v not in kept)
        ids.append(kept)
        logprobs.append([mass[v] for v in kept])
        tails.append(tail)
    return (
        torch.tensor(ids),
        torch.tensor(logprobs, dtype=torch.float64).log(),
        torch.tensor(tails, dtype=torch.float64).log(),
    )


@pytest.mark.parametrize("overlap", ["overlapping", "disjoint"])
def test_mixture_targets_equal_the_float64_brute_force(overlap):
    g = torch.Generator().manual_seed(0)
    n, k = 24, 6
    a = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    b = a + torch.randn(n, V, generator=g, dtype=torch.float64) if overlap == "overlapping" else -a
    parts = [_part(a, k), _part(b, k)]
    shared = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(parts[0].ids, parts[1].ids))
    assert (shared > 0) == (overlap == "overlapping")
    weights = [3.0, 1.0]
    mixed = mix_targets(parts, weights, k)
    ids, logprobs, tails = _reference_mixture(parts, weights, k)
    assert torch.equal(mixed.ids, ids)
    # float16 rounding, as a store keeps them: within half a float16 step of the float64 value
    torch.testing.assert_close(mixed.logprobs.double(), logprobs, rtol=2**-11, atol=1e-6)
    torch.testing.assert_close(mixed.tail_logmass.double(), tails, rtol=2**-11, atol=1e-6)
    # A distribution over the listed ids and one tail bucket: the masses add up to 1.
    total = mixed.logprobs.double().exp().sum(-1) + mixed.tail_logmass.double().exp()
    torch.testing.assert_close(total, torch.ones(n, dtype=torch.float64), atol=2e-3, rtol=0)


def test_mixture_at_the_whole_vocabulary_is_the_exact_dense_mixture():
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(10, V, generator=g, dtype=torch.float64) for _ in range(2))
    mixed = mix_targets([_part(a, V), _part(b, V)], [1.0, 4.0], V)
    dense = (0.2 * a.softmax(-1) + 0.8 * b.softmax(-1)).log()
    torch.testing.assert_close(mixed.logprobs.double(), dense.gather(1, mixed.ids), rtol=2**-10, atol=1e-4)
    assert bool((mixed.tail_logmass == -torch.inf).all())  # nothing is outside the vocabulary


def _reference_loss(s: torch.Tensor, t: TeacherTargets, kind: str, temperature: float) -> torch.Tensor:
    """float64 brute force of the bucket loss: per row the listed ids and one tail bucket on both sides."""
    total = s.new_zeros(())
    for r in range(s.shape[0]):
        ps = (s[r] / temperature).softmax(-1)
        listed = t.ids[r]
        qs = torch.cat([ps[listed], (1 - ps[listed].sum()).reshape(1)])
        pt = torch.cat([t.logprobs[r].double().exp(), t.tail_logmass[r].double().exp().reshape(1)])
        pt = pt / pt.sum()
        if kind == "forward_kl":
            total = total + (pt * (pt.log() - qs.log())).sum()
        else:  # reverse_kl
            total = total + (qs * (qs.log() - pt.log())).sum()
    return total * temperature**2


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_mixture_kd_loss_and_gradient_equal_the_float64_brute_force(kind):
    g = torch.Generator().manual_seed(2)
    n, h, k, temperature = 20, 8, 5, 2.0
    a = torch.randn(n, V, generator=g, dtype=torch.float64) * 2
    parts = [_part(a, k), _part(a + 2 * torch.randn(n, V, generator=g, dtype=torch.float64), k), _part(-a, k)]
    mixed = mix_targets(parts, [0.5, 0.3, 0.2], k)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(V, h, generator=g)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[3] = -100  # not counted
    counted = labels != -100
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = _reference_loss((hd @ wd.T)[counted], _rows(mixed, counted), kind, temperature)
    ref.backward()
    hc, wc = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = chunked_distill_loss(
        hc, wc, labels, chunk_size=7, kind=kind, temperature=temperature, kd_weight=1.0, ce_weight=0.0,
        **mixed.loss_kwargs(),
    )  # fmt: skip
    out.kd_sum.backward()
    torch.testing.assert_close(out.kd_sum.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hc.grad.double(), hd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wc.grad.double(), wd.grad, rtol=1e-5, atol=1e-5)
    # and the naive path's sparse loss, the per-teacher diagnostics' function
    naive = sparse_kd_loss(
        hidden @ weight.T, mixed.ids, mixed.logprobs, labels, kind=kind, temperature=temperature,
        reduction="sum", teacher_tail_logmass=mixed.tail_logmass,
    )  # fmt: skip
    torch.testing.assert_close(naive.double(), ref.detach(), rtol=1e-5, atol=1e-5)


def _rows(t: TeacherTargets, keep: torch.Tensor) -> TeacherTargets:
    return TeacherTargets(ids=t.ids[keep], logprobs=t.logprobs[keep], tail_logmass=t.tail_logmass[keep])


def test_per_teacher_diagnostics_are_each_teachers_own_kd_and_agreement():
    g = torch.Generator().manual_seed(3)
    n, k = 30, 4
    parts = {name: _part(torch.randn(n, V, generator=g), k) for name in ("a", "b")}
    logits = torch.randn(n, V, generator=g)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::5] = -100
    dcfg = Config.__dataclass_fields__["distill"].default_factory()
    sums = part_sums(lambda rows: logits[rows], labels, parts, dcfg, rows_per_chunk=7)
    keep = labels != -100
    for name, t in parts.items():
        want = sparse_kd_loss(logits, t.ids, t.logprobs, labels, reduction="sum", teacher_tail_logmass=t.tail_logmass)
        torch.testing.assert_close(sums[f"kd_loss/{name}"], want.float(), rtol=1e-5, atol=1e-6)
        top1 = t.ids.gather(1, t.logprobs.argmax(-1, keepdim=True)).squeeze(1)
        assert sums[f"agreement/{name}"] == ((logits.argmax(-1) == top1) & keep).sum()


def test_route_selects_each_rows_teacher_exactly():
    g = torch.Generator().manual_seed(4)
    b, s, k = 3, 6, 4
    parts = [_part(torch.randn(b * (s - 1), V, generator=g), k) for _ in range(3)]
    mixed = mix_targets(parts, [1.0, 1.0, 1.0], k)
    teacher_ids = torch.randint(-1, 3, (b, s), generator=g)
    routed = route_targets(parts, teacher_ids, mixed)
    chosen = teacher_ids[:, :-1].reshape(-1)  # the token that predicts each next-token position
    assert set(chosen.tolist()) == {-1, 0, 1, 2}
    for r, c in enumerate(chosen.tolist()):
        src = mixed if c < 0 else parts[c]
        for name in ("ids", "logprobs", "tail_logmass"):
            assert torch.equal(getattr(routed, name)[r], getattr(src, name)[r]), (r, c, name)
    with pytest.raises(Exception, match="teacher_route holds 3"):
        route_targets(parts, torch.full((b, s), 3), mixed)


TWO = [
    {"name": "big", "arch": {"family": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                             "max_position_embeddings": 128}, "weight": 2.0},
    {"name": "small", "arch": {"family": "llama", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                               "max_position_embeddings": 128}},
]  # fmt: skip


def _raw(**changes) -> dict:
    raw = yaml.safe_load(SMOKE.read_text())
    raw.pop("teacher")
    raw["teachers"] = json.loads(json.dumps(TWO))
    raw["distill"]["top_k"] = 16
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            raw[section][name] = value
        else:
            raw[section] = value
    return raw


def test_a_list_of_teachers_builds_typed_sections():
    cfg = build(Config, _raw())
    assert [t.name for t in cfg.teachers] == ["big", "small"] and cfg.teacher is None
    assert cfg.teachers[1].arch.hidden_size == 32 and cfg.teachers[1].weight == 1.0 and cfg.teachers[0].weight == 2.0
    assert [t.engine for t in cfg.teacher_list()] == ["replicated", "replicated"]


def test_an_override_reaches_one_teacher_of_the_list(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(_raw()))
    cfg = load_config(
        path, ["teachers[1].engine=remote", "teachers[1].url=http://127.0.0.1:8470", "teachers[0].weight=3"]
    )
    assert [t.engine for t in cfg.teachers] == ["replicated", "remote"] and cfg.teachers[1].url == [
        "http://127.0.0.1:8470"
    ]
    assert cfg.teachers[0].weight == 3.0 and cfg.teachers[0].name == "big"
    with pytest.raises(
        ConfigError, match=r"override teachers\[2\]\.engine: teachers has 2 entries, so no teachers\[2\]"
    ):
        load_config(path, ["teachers[2].engine=remote"])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"teacher": {"arch": TWO[0]["arch"]}}, "teacher and teachers are exclusive"),
        ({"teachers": [TWO[0], TWO[0]]}, "the name 'big' is given twice"),
        ({"distill__top_k": None}, "several teachers need sparse targets: set distill.top_k"),
        ({"teachers": [TWO[0], {**TWO[1], "weight": 0}]}, "teachers[1].weight=0.0 must be > 0"),
        ({"teachers": [TWO[0], {**TWO[1], "weight": "heavy"}]}, "teachers[1].weight='heavy' must be of type float"),
        ({"teachers": [TWO[0], {k: v for k, v in TWO[1].items() if k != "name"}]}, "every teacher needs a name"),
        ({"teachers": [TWO[0], {**TWO[1], "nme": "x"}]}, "unknown config key 'teachers[1].nme' (did you mean 'name'?)"),
        ({"teachers": []}, "teachers is empty"),
        ({"teachers": "big"}, "teachers must be a list"),
        ({"distill__teacher_mix": "route"}, "distill.teacher_mix=route needs data.teacher_column"),
        ({"distill__hidden": {"layers": [[1, 1]]}}, "distill.hidden needs one teacher"),
    ],
)
def test_bad_teacher_lists_are_refused_in_one_line(changes, message):
    with pytest.raises(ConfigError) as info:
        build(Config, _raw(**changes))
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_changed_teacher_list_is_named_on_resume():
    from distributed_distill.checkpoint import first_difference
    from distributed_distill.config import to_dict

    recorded = to_dict(build(Config, _raw()))
    changed = _raw()
    changed["teachers"][1]["weight"] = 3.0
    assert first_difference(recorded, build(Config, changed)) == "teachers[1].weight"
    swapped = _raw(teachers=[TWO[1], TWO[0]])
    assert first_difference(recorded, build(Config, swapped)).startswith("teachers[0].")
    engine = _raw()
    engine["teachers"][0]["collective_timeout"] = 60  # how a teacher is run may change, as for `teacher:`
    assert first_difference(recorded, build(Config, engine)) is None


# ----------------------------------------------------------------------------------------------
# Runs


def _config(tmp_path, **distill) -> str:
    raw = _raw()
    raw["distill"].update(distill)
    raw["train"].update(max_steps=8, save_every=2, eval_every=4)
    path = tmp_path / "two-teachers.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.slow
def test_two_teachers_train_with_per_teacher_metrics_and_resume_exactly_after_a_kill(tmp_path):
    config = _config(tmp_path)
    ref, out = tmp_path / "ref", tmp_path / "run"
    run_cli(["train", "--config", config, f"output_dir={ref}"])
    records = read_metrics(ref)
    for r in records:
        for name in ("big", "small"):
            assert 0 <= r[f"agreement/{name}"] <= 1 and r[f"kd_loss/{name}"] > 0, r
    last = records[-1]
    assert {"val_kd_loss/big", "val_kd_loss/small", "val_agreement/big", "val_agreement/small"} <= last.keys()
    # The teachers differ (two models, two seeds), so their KD terms do.
    assert all(r["kd_loss/big"] != r["kd_loss/small"] for r in records)
    identity = json.loads((ref / "teacher.json").read_text())
    assert [t["name"] for t in identity["teachers"]] == ["big", "small"]
    assert [t["weight"] for t in identity["teachers"]] == pytest.approx([2 / 3, 1 / 3])
    assert [t["init_seed"] for t in identity["teachers"]] == [1, 2] and identity["teacher_mix"] == "mixture"
    # distill eval of the same config scores against the same teachers, each on its own too
    evaluated = tmp_path / "eval.json"
    run_cli(["eval", "--config", config, "--model", f"student={ref / 'final'}", "--json", str(evaluated)])
    [row] = json.loads(evaluated.read_text())
    assert row["val_kd_loss"] > 0 and 0 <= row["val_agreement/small"] <= 1 and row["val_kd_loss/big"] > 0, row
    run_cli(["report", str(ref), "--out", str(tmp_path / "report")])  # the per-teacher figure and summary
    assert (tmp_path / "report" / "teachers.png").is_file()
    assert "per teacher (validation): big KD" in (tmp_path / "report" / "report.md").read_text()

    cmd = [sys.executable, "-m", "distributed_distill.cli", "train", "--config", config, f"output_dir={out}"]
    killed = interrupt(cmd, out, 5, signal.SIGKILL)
    assert killed.returncode != 0 and not (out / "final").exists()
    proc = run_cli(cmd[3:])
    assert "continuing from" in proc.stdout
    assert training_records(out) == training_records(ref)
    from safetensors.torch import load_file

    a, b = (load_file(run / "final" / "model.safetensors") for run in (ref, out))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)

    # Another teacher list is refused on resume, in one line (the config check; teacher.json stands behind it).
    changed = run_cli(cmd[3:] + ["train.max_steps=10", "teachers=[]"], check=False)
    assert "teachers is empty" in error_line(changed)
    renamed = yaml.safe_load(open(config))
    renamed["teachers"][1]["weight"] = 5.0
    (tmp_path / "renamed.yaml").write_text(yaml.safe_dump(renamed))
    refused = run_cli(["train", "--config", str(tmp_path / "renamed.yaml"), f"output_dir={out}",
                       "train.max_steps=10"], check=False)  # fmt: skip
    assert "teachers[1].weight" in error_line(refused)


@pytest.mark.slow
@pytest.mark.release  # CI's siblings: the mixture's targets against float64 (default) and precompute's own tests
def test_a_store_precomputed_from_the_mixture_trains_as_the_online_mixture(tmp_path):
    config = _config(tmp_path)
    store, online, offline = tmp_path / "store", tmp_path / "online", tmp_path / "offline"
    run_cli(["precompute", "--config", config, f"distill.store={store}"])
    manifest = json.loads((store / "manifest.json").read_text())
    assert [t["name"] for t in manifest["teacher"]["teachers"]] == ["big", "small"] and manifest["top_k"] == 16
    run_cli(["verify-store", str(store)])
    run_cli(["train", "--config", config, f"output_dir={online}"])
    offline_args = ["distill.signal=offline", f"distill.store={store}", "distill.shuffle_buffer=0"]
    run_cli(["train", "--config", config, f"output_dir={offline}", *offline_args])
    a, b = read_metrics(online), read_metrics(offline)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm", "num_tokens", "top1_agreement"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-4), (key, ra["step"])
    assert b[-1]["val_kd_loss"] == pytest.approx(a[-1]["val_kd_loss"], abs=1e-4)
    assert "kd_loss/big" not in b[0]  # the store holds the mixture only
    assert json.loads((offline / "teacher.json").read_text())["teachers"] == manifest["teacher"]["teachers"]


def test_load_config_reads_teachers_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_raw()))
    cfg = load_config(path, ["distill.teacher_mix=mixture"])
    assert [t.name for t in cfg.teachers] == ["big", "small"]


@pytest.mark.slow
def test_a_served_teacher_among_several_equals_the_same_teacher_in_process(tmp_path):
    """teachers[1] served by `distill serve` (teacher.engine=remote, read ahead and agreed like a single served
    teacher): the mixture run equals the all-in-process one bit for bit. The server builds teachers[1]'s model: its
    arch with the seed that entry gets (train.seed + 1), so its identity is the one the student expects."""
    from distributed_distill.serve import running

    config = _config(tmp_path)
    local, served = tmp_path / "local", tmp_path / "served"
    address = tmp_path / "small.url"
    small = TWO[1]["arch"]
    arch = "{" + ", ".join(f"{k}: {v}" for k, v in small.items()) + "}"
    serve = [sys.executable, "-m", "distributed_distill.cli", "serve", "--config", str(SMOKE), f"teacher.arch={arch}"]
    serve += ["train.seed=1", "serve.port=0", f"serve.address_file={address}"]
    with running(serve, address, timeout=240):
        run_cli(["train", "--config", config, f"output_dir={local}"])  # while the server loads
        remote = ["teachers[1].engine=remote", f"teachers[1].url=file:{address}"]
        proc = run_cli(["train", "--config", config, f"output_dir={served}", *remote])
    assert "small: remote" in proc.stdout, proc.stdout
    assert training_records(served) == training_records(local)
    from safetensors.torch import load_file

    a, b = (load_file(run / "final" / "model.safetensors") for run in (local, served))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
