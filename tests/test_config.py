import dataclasses
import typing

import pytest
from accelerate import Accelerator

from distributed_distill import models
from distributed_distill.config import Config, DistillConfig, describe, load_config, save_config
from distributed_distill.errors import ConfigError
from distributed_distill.losses import auto_chunk_size
from distributed_distill.setup import resolve_loss_chunks

from .helpers import ROOT, SMOKE


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        SMOKE, ["train.max_steps=20", "distill.temperature=3", "data.max_documents=null", "student.arch.hidden_size=48"]
    )
    assert cfg.train.max_steps == 20
    assert cfg.distill.temperature == 3.0 and isinstance(cfg.distill.temperature, float)
    assert cfg.data.max_documents is None
    assert cfg.student.arch.hidden_size == 48


def test_chunk_size_is_auto_by_default_and_takes_rows():
    assert DistillConfig().chunk_size == "auto"
    assert load_config(SMOKE, ["distill.chunk_size=auto"]).distill.chunk_size == "auto"
    assert load_config(SMOKE, ["distill.chunk_size=0"]).distill.chunk_size == 0


def test_chunk_size_auto_is_resolved_for_the_student_and_device():
    cfg = load_config(SMOKE, ["distill.chunk_size=auto"])
    student = models.arch_config(cfg.student.arch, 4096)
    accelerator = Accelerator(cpu=True)
    resolved = resolve_loss_chunks(cfg, student, accelerator)
    assert resolved.distill.chunk_size == auto_chunk_size(4096, cfg.student.arch.hidden_size, "cpu") == 1024
    assert cfg.distill.chunk_size == "auto"  # the config as given is left alone (resume compares against it)
    explicit = load_config(SMOKE, ["distill.chunk_size=64"])
    assert resolve_loss_chunks(explicit, student, accelerator) is explicit


def test_one_sampling_section_with_its_own_defaults_for_on_policy_and_generate():
    """distill.sampling and generate.sampling are one dataclass; max_new_tokens defaults to 64 and 128, and setting
    one key of generate.sampling keeps the others at generate's defaults."""
    cfg = load_config(SMOKE, ["generate.sampling.temperature=0.5", "generate.top_k=8"])
    assert type(cfg.generate.sampling) is type(cfg.distill.sampling)
    assert (cfg.generate.sampling.max_new_tokens, cfg.distill.sampling.max_new_tokens) == (128, 64)
    assert cfg.generate.sampling.temperature == 0.5 and cfg.generate.top_k == 8
    assert "  generate.sampling.max_new_tokens = 128" in "\n".join(describe())


def test_teacher_null_with_alpha_zero_is_plain_ce():
    cfg = load_config(SMOKE, ["teacher=null", "distill.alpha=0"])
    assert cfg.teacher is None and cfg.distill.alpha == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.max_stepz=3"], "unknown config key 'train.max_stepz' (did you mean 'max_steps'?)"),
        (["trian.max_steps=3"], "unknown config key 'trian' (did you mean 'train'?)"),
        (["train.max_steps=abc"], "train.max_steps='abc' must be of type int"),
        (["train.precision=fp8"], "train.precision='fp8' is not one of fp32, bf16"),
        (["distill.alpha=1.0", "teacher=null"], "distill.alpha=1.0 needs a teacher"),
        (["distill.alpha=1.5"], "distill.alpha=1.5 must be in [0, 1]"),
        (["distill.loss=forward_kll"], "(did you mean 'forward_kl'?)"),
        (["distill.beta=1.0"], "distill.beta=1.0 must be strictly between 0 and 1"),
        (["student.arch.num_heads=3"], "student.arch.hidden_size=32 is not divisible by num_heads=3"),
        (["teacher.path=/some/dir"], "teacher: a model needs exactly one of `path`"),
        (["data.seq_len=1000"], "data.seq_len=1000 exceeds student.arch.max_position_embeddings=128"),
        (["train.warmup_steps=10"], "train.warmup_steps=10 exceeds train.max_steps=5"),
        (["data.prompt_field=q"], "data.prompt_field and data.completion_field must be set together"),
        (["train.micro_batch_size=0"], "train.micro_batch_size=0 must be >= 1"),
        (["student=null"], "student is required"),
        (["novalue"], "override 'novalue' must look like section.key=value"),
        (["distill.chunk_size=autom"], "distill.chunk_size='autom' must be 'auto' or an int >= 0"),
        (["distill.chunk_size=-1"], "distill.chunk_size=-1 must be 'auto' or an int >= 0"),
        (["generate.temperature=0.5"], "config key generate.temperature moved to generate.sampling.temperature"),
        (["generate.sample_top_k=5"], "config key generate.sample_top_k moved to generate.sampling.top_k"),
        (["generate.sampling.top_p=0"], "generate.sampling.top_p=0.0 must be in (0, 1]"),
        (['generate.sampling.eos_tokens=[""]'], "generate.sampling.eos_tokens=[''] must be a list of non-empty"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(SMOKE, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+ is not valid YAML"):
        load_config(bad)


def test_yaml_cannot_call_code(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("output_dir: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(SMOKE, ["train.max_steps=7"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_every_key_is_documented():
    lines = describe()
    assert any("train.max_steps" in line for line in lines)
    assert all("  # " in line for line in lines if line.startswith("  "))
    assert not [line for line in lines if line.rstrip().endswith("#")], "a config field has no help text"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_a_pinned_model_pins_its_tokenizer(tmp_path):
    """The tokenizer is loaded at the revision of the model it comes from (a pinned teacher never pairs with an
    unpinned tokenizer), and an offline run records that pin with the tokenizer it resolved to."""
    from distributed_distill.rundir import recorded_config
    from distributed_distill.tokenizer import tokenizer_source

    pinned = ["teacher.arch=null", "teacher.path=org/teacher", "teacher.revision=abc123"]
    assert tokenizer_source(load_config(SMOKE, pinned)) == ("org/teacher", "abc123")
    explicit = [*pinned, "tokenizer.path=org/tok", "tokenizer.revision=v2"]
    assert tokenizer_source(load_config(SMOKE, explicit)) == ("org/tok", "v2")
    assert tokenizer_source(load_config(SMOKE)) is None  # both built from arch: a tokenizer is trained
    offline = recorded_config(load_config(SMOKE, [*pinned, "distill.signal=offline", f"distill.store={tmp_path}"]))
    assert offline.teacher is None and (offline.tokenizer.path, offline.tokenizer.revision) == ("org/teacher", "abc123")


def test_the_distill_your_own_models_config_is_what_the_readme_says():
    """README "Distill your own models": hub teacher and student, a hub conversational dataset, bf16, ZeRO-3 teacher."""
    cfg = load_config(ROOT / "configs" / "distill_qwen.yaml")
    assert cfg.teacher.path == "Qwen/Qwen2.5-7B-Instruct" and cfg.teacher.engine == "zero3"
    assert cfg.teacher.dtype == "bfloat16" and cfg.train.precision == "bf16"
    assert cfg.student.path == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.student.gradient_checkpointing
    assert cfg.data.source == "HuggingFaceH4/ultrachat_200k" and cfg.data.streaming
    from distributed_distill.data.documents import source_kind

    assert source_kind(cfg.data) == "repository"
    readme = (ROOT / "README.md").read_text()
    assert "configs/distill_qwen.yaml" in readme and "--num_processes 8" in readme


def test_numbers_are_read_as_yaml_1_2_in_files_and_overrides(tmp_path):
    """`1e-3` is a float in YAML 1.2 (PyYAML's YAML 1.1 reads it as a string): every float field, both ways."""
    path = tmp_path / "run.yaml"
    path.write_text(SMOKE.read_text() + "\n")
    text = path.read_text().replace("lr: 1.0e-3", "lr: 1e-3\n  weight_decay: 5E-4\n  max_grad_norm: .5")
    path.write_text(text)
    cfg = load_config(path, ["distill.temperature=2e0", "train.min_lr_ratio=+1E-1", "train.max_steps=1e1"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.max_grad_norm) == (1e-3, 5e-4, 0.5)
    assert (cfg.distill.temperature, cfg.train.min_lr_ratio, cfg.train.max_steps) == (2.0, 0.1, 10)
    # Every float field takes the exponent form from an override.
    for section in ("distill", "train", "data"):
        hints = typing.get_type_hints(type(getattr(cfg, section)))
        for name in (f.name for f in dataclasses.fields(getattr(cfg, section)) if hints[f.name] is float):
            text = f"{getattr(cfg, section).__dict__[name]:e}"  # e.g. 1.000000e-03
            loaded = load_config(SMOKE, [f"{section}.{name}={text}"])
            assert getattr(getattr(loaded, section), name) == float(text), f"{section}.{name}"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=nan", "train.lr=nan: NaN and infinity are not allowed here; give a finite number"),
        ("train.lr=.inf", "train.lr=inf: NaN and infinity are not allowed here"),
        ("distill.temperature=-inf", "distill.temperature=-inf: NaN and infinity are not allowed here"),
        ("train.max_steps=1.5", "train.max_steps=1.5 must be of type int"),
    ],
)
def test_non_finite_and_fractional_numbers_are_refused_with_the_reason(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(SMOKE, [override])
    assert message in str(e.value)


def test_messages_that_point_the_right_way(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(SMOKE.read_text())
    with pytest.raises(ConfigError, match=f"--config {run} is a directory; give a YAML file"):
        load_config(run)
    with pytest.raises(ConfigError, match="no --config given and no student set: give --config FILE"):
        load_config(None, ["train.max_steps=3"])
    with pytest.raises(ConfigError, match=f"{run} is a run directory, not a section.key=value override"):
        load_config(SMOKE, [str(run)])
