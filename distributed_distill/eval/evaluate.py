"""Validation during training (`train.eval_every`) and `distill eval` (models compared on the same tokens and
prompts). docs/eval.md describes every metric.

    evaluate: validation tokens -> loss, perplexity (through objective.forward_losses, as training computes it),
              and against the teacher forward / reverse KL, top-1 agreement; calibration (ECE); tokens/s
              [+ generate_metrics: held-out prompts -> greedy completions -> the teacher's NLL of them, ROUGE-L
               against the reference, the task check, repetition; tokens/s]
    evaluate_models (`distill eval`): the teacher once, then evaluate for each --model NAME=DIR
              [distill.cross_tokenizer: the teacher wrapped in cross_teacher.CrossTokenizerTeacher, so the students'
               teacher-relative metrics are the span metrics training validates with; the teacher's own row is in
               its own tokenization, under own_* keys (not comparable with the students' val_loss)]

Every rank evaluates its share: validation rows in rounds (data.eval_batches pads the ranks past an uneven end
with all-ignored batches) and prompts i = rank, rank + world, ...; the sums are all-reduced, so each token and each
prompt counts exactly once. Every rank calls the teacher the same number of times (lockstep for a ZeRO-3 teacher).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from .. import models
from ..config import Config, EvalConfig, ModelConfig, SamplingConfig, load_config
from ..data.batching import IGNORE_INDEX, eval_batches
from ..data.documents import BUILTIN_CHAT, MIXED_FIELDS, DocKind, Documents, documents
from ..data.packed import build_datasets, pack_rows, tokenize
from ..errors import DistillError
from ..generation import Sampling, generate, sampling_setup
from ..integrity import atomic_write_text
from ..losses import TeacherTargets
from ..objective import forward_losses, label_logprob_sum
from ..on_policy import StudentSampler, row_seed
from ..setup import resolve_loss_chunks, setup_accelerator
from ..store.samples import TOKENIZER, training_store
from ..teacher import OnlineTeacher, TeacherSource, setup_teacher
from ..teachers import setup_teachers
from ..tokenizer import load_tokenizer, run_tokenizer, teacher_tokenizer, tokenizer_difference
from . import metrics


class _Given:
    """A teacher source that hands back targets already computed (the teacher runs once per validation batch)."""

    def __init__(self, targets: TeacherTargets):
        self._targets = targets

    def targets(self, batch: dict) -> TeacherTargets:
        return self._targets


@torch.no_grad()
def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    head: models.AlignedHead,
    teacher: TeacherSource | None,
    val_ds,
    cfg: Config,
    held_out: HeldOut | None = None,
    completions: list | None = None,
) -> dict:
    """Validation loss (and KD against the teacher, if any), the token metrics of `metrics.token_sums` over the
    split, token-weighted across ranks; with `held_out`, the generation metrics too (and the completions appended to
    `completions`, when given, in prompt order)."""
    was_training = model.training
    model.eval()
    bins = cfg.eval.calibration_bins
    sums = torch.zeros(3, device=accelerator.device, dtype=torch.float64)
    token = torch.zeros(len(metrics.TOKEN_SUMS) + 3 * bins, device=accelerator.device, dtype=torch.float64)
    batches = eval_batches(
        val_ds, cfg.train.micro_batch_size, accelerator.num_processes, accelerator.process_index, cfg.train.eval_batches
    )
    positions, seconds = 0, 0.0
    per_teacher: dict[str, torch.Tensor] = {}  # several teachers: kd_loss/NAME, agreement/NAME sums (part_sums)

    def add_token_sums(temperature: float, logits, labels, rows: TeacherTargets | None) -> None:
        nonlocal token  # the logits the loss sees, chunk by chunk: one forward for the loss and the metrics
        token += metrics.token_sums(
            logits, labels, rows, bins, teacher_temperature=temperature, ignore_index=IGNORE_INDEX
        )

    for mb in batches:
        mb = {k: v.to(accelerator.device) for k, v in mb.items()}
        targets = teacher.targets(mb) if teacher is not None else None
        given = _Given(targets) if targets is not None else None
        # Sparse targets compare at the temperature they were taken at (the metrics' KL is at T = 1).
        on_logits = functools.partial(
            add_token_sums, cfg.distill.temperature if given and (targets.sparse or targets.sampled) else 1.0
        )
        started = time.perf_counter()
        with accelerator.autocast():
            out = forward_losses(model, given, mb, cfg.distill, head=head, on_logits=on_logits)
        seconds += time.perf_counter() - started
        positions += mb["input_ids"].numel()
        sums += torch.stack([out.ce_sum.double(), out.kd_sum.double(), out.num_tokens.double()])
        for name in getattr(teacher, "stat_names", ()):
            per_teacher[name] = per_teacher.get(name, 0.0) + out.stats[name].double()
        del targets
    ce, kd, n = accelerator.reduce(sums, reduction="sum").tolist()
    token_totals = accelerator.reduce(token, reduction="sum").tolist()
    n = max(n, 1.0)
    result = {"val_loss": ce / n, "val_ppl": math.exp(min(ce / n, 50.0)), "val_tokens": int(n)}
    if teacher is not None and cfg.distill.alpha > 0:
        result["val_kd_loss"] = kd / n
    result.update(metrics.token_means(token_totals, bins))
    if per_teacher:  # every rank evaluates as many batches (eval_batches pads), so every rank has these sums
        totals = accelerator.reduce(torch.stack(list(per_teacher.values())), reduction="sum").tolist()
        result.update({f"val_{name}": value / n for name, value in zip(per_teacher, totals)})
    result["val_tokens_per_second"] = _rate(accelerator, positions, seconds)
    if held_out is not None and held_out.prompts:
        unwrapped = accelerator.unwrap_model(model)
        gen, samples = generate_metrics(accelerator, unwrapped, teacher, held_out, cfg.eval, cfg.train.micro_batch_size)
        result.update(gen)
        if completions is not None:
            completions.extend(samples)
    model.train(was_training)
    return result


def _rate(accelerator: Accelerator, count: float, seconds: float) -> float:
    """All ranks' count over the slowest rank's seconds."""
    gathered = gather_object([(count, seconds)])
    return sum(c for c, _ in gathered) / max(max(s for _, s in gathered), 1e-9)


# ----------------------------------------------------------------------------------------------
# Held-out prompts and generation metrics


@dataclass
class Prompt:
    ids: list[int]  # the prompt's tokens
    reference: str  # the reference completion, as text
    request: str | None = None  # the raw request, for the task check (the built-in chat corpus)


@dataclass
class HeldOut:
    prompts: list[Prompt]
    tokenizer: object
    task: str | None  # "python-parses" for the built-in code conversations, else None
    sampling: Sampling  # greedy, eval.max_new_tokens; ends at end of sequence, and end of turn for chat data


def held_out_prompts(cfg: Config, held: Documents, tokenizer, count: int) -> HeldOut:
    """The first `count` validation documents of `held` as prompts with references: prompt/completion and chat data
    give their own (the prompt up to the first learned token; the reference the first learned span); plain text is
    cut after eval.prompt_tokens tokens, the next eval.max_new_tokens being the reference."""
    dcfg, ecfg = cfg.data, cfg.eval
    docs = held.val.select(range(min(len(held.val), 4 * count)))
    rows, _ = tokenize(docs, held.kind, tokenizer, dcfg, "held-out prompts")
    chat_task = dcfg.source == BUILTIN_CHAT
    prompts = []
    for i, row in enumerate(rows):
        ids, labels = list(row["input_ids"]), list(row["labels"])
        if held.kind is DocKind.TEXT or (held.kind is DocKind.MIXED and docs[i][MIXED_FIELDS[1]] is None):
            cut = 1 + ecfg.prompt_tokens  # bos + the prompt
            prompt, reference = (
                ids[:cut],
                [t for t in ids[cut : cut + ecfg.max_new_tokens] if t != tokenizer.eos_token_id],
            )
        else:
            first = next((j for j, y in enumerate(labels) if y != IGNORE_INDEX), None)
            if first is None:
                continue
            end = next((j for j in range(first, len(labels)) if labels[j] == IGNORE_INDEX), len(labels))
            prompt, reference = ids[:first], ids[first:end]
        if not prompt or not reference:
            continue
        request = docs[i][dcfg.messages_field][0]["content"] if chat_task else None
        prompts.append(Prompt(prompt, tokenizer.decode(reference, skip_special_tokens=True), request))
        if len(prompts) == count:
            break
    # Greedy, ending where generate and on-policy sampling end: end of sequence, and for chat the end of the turn.
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=ecfg.max_new_tokens)
    sampling = sampling_setup(greedy, tokenizer, held.kind.is_chat, "eval")
    return HeldOut(prompts, tokenizer, "python-parses" if chat_task else None, sampling)


GEN_SUMS = ("samples", "tokens", "teacher_nll", "nll_tokens", "rouge_l", "repeated", "ngrams", "parsed", "checked")


@torch.no_grad()
def generate_metrics(
    accelerator: Accelerator,
    model: torch.nn.Module,
    teacher: TeacherSource | None,
    held_out: HeldOut,
    ecfg: EvalConfig,
    batch_size: int = 1,
) -> tuple[dict, list[dict]]:
    """Greedy completions of the held-out prompts (prompt i on rank i % world, `batch_size` at a time, through
    generation.generate), scored; the sums are all-reduced. Returns the metrics and every
    rank's completions ({prompt, ids, text}, in prompt order)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n = len(held_out.prompts)
    sums = torch.zeros(len(GEN_SUMS), dtype=torch.float64, device=accelerator.device)
    # An offline teacher (a store) has no targets for new text; a sparse one no probability outside its top k (or
    # outside its draws); one with another tokenizer (distill.cross_tokenizer) none over the student's tokens.
    dense = getattr(teacher, "top_k", 1) is None and getattr(teacher, "samples", None) is None
    dense = dense and getattr(teacher, "aligner", None) is None
    scorer = teacher if teacher is not None and dense else None
    # This rank's prompts, greedy, batch_size at a time (a row's tokens do not depend on its batch: generation.py).
    mine = list(range(rank, n, world))
    pad = held_out.sampling.pad_id
    samples: dict[int, list[int]] = {}
    started = time.perf_counter()
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        out = generate(
            model, [held_out.prompts[i].ids for i in chunk], [torch.Generator() for _ in chunk], held_out.sampling
        )
        samples.update(zip(chunk, out.completions))
    seconds = time.perf_counter() - started
    done = []
    for index in range(rank, -(-n // world) * world, world):  # the same number of teacher calls on every rank
        prompt = held_out.prompts[index] if index < n else held_out.prompts[0]
        sample = samples.get(index, [pad])
        nll, nll_tokens = teacher_nll(scorer, prompt.ids, sample, accelerator.device) if scorer else (0.0, 0)
        if index >= n:  # a filler round: the teacher was called (lockstep), nothing counts
            continue
        text_ids = [t for t in sample if t not in held_out.sampling.eos_ids]
        text = held_out.tokenizer.decode(text_ids, skip_special_tokens=True)
        repeated, ngrams = metrics.repeated_ngrams(text_ids, ecfg.repetition_ngram)
        checked = held_out.task is not None and prompt.request is not None
        parsed = checked and metrics.python_parses(prompt.request, text)
        done.append({"prompt": index, "ids": sample, "text": text})
        sums += torch.tensor(
            [
                1,
                len(sample),
                nll,
                nll_tokens,
                metrics.rouge_l(text, prompt.reference),
                repeated,
                ngrams,
                parsed,
                checked,
            ],
            dtype=torch.float64,
            device=sums.device,
        )
    total = dict(zip(GEN_SUMS, accelerator.reduce(sums, reduction="sum").tolist()))
    count = max(total["samples"], 1.0)
    result = {
        "gen_samples": int(total["samples"]),
        "gen_mean_tokens": total["tokens"] / count,
        "gen_rouge_l": total["rouge_l"] / count,
        "gen_repetition": total["repeated"] / max(total["ngrams"], 1.0),
        "gen_tokens_per_second": _rate(accelerator, sum(len(c) for c in samples.values()), seconds),
    }
    if total["nll_tokens"]:
        result["gen_teacher_nll"] = total["teacher_nll"] / total["nll_tokens"]
    if total["checked"]:
        result["gen_parse_rate"] = total["parsed"] / total["checked"]
    return result, sorted(gather_object(done), key=lambda c: c["prompt"])


def teacher_nll(teacher: TeacherSource, prompt: list[int], sample: list[int], device) -> tuple[float, int]:
    """The teacher's summed negative log-likelihood of the sample's tokens given the prompt, and their count (the
    one place this is computed: the generation metrics, and `teacher_nll_of_samples` below)."""
    ids = torch.tensor([prompt + sample], device=device)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, len(prompt) :] = ids[0, len(prompt) :]
    targets = teacher.targets({"input_ids": ids, "labels": labels})
    y = labels[0, 1:]
    return -float(label_logprob_sum(targets.dense_logits(), y)), int((y != IGNORE_INDEX).sum())


@torch.no_grad()
def teacher_nll_of_samples(
    model: torch.nn.Module,
    teacher: torch.nn.Module,
    prompts: list[list[int]],
    sampler: StudentSampler,
    batch_size: int = 16,
) -> dict:
    """Sample one completion per prompt from `model` as an on-policy step does (`sampler`'s settings, row seeds by
    prompt index) and score it with the `teacher` model: the teacher's per-token negative log-likelihood of the
    model's own samples (lower: the model writes what the teacher would), and the mean sample length."""
    was_training = model.training
    model.eval()
    scorer = OnlineTeacher(teacher, identity={})
    device = next(teacher.parameters()).device
    nll, tokens = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generators = [torch.Generator().manual_seed(row_seed(sampler.seed, start + i)) for i in range(len(chunk))]
        samples = generate(model, chunk, generators, sampler.sampling)
        for prompt, completion in zip(chunk, samples.completions):
            row_nll, row_tokens = teacher_nll(scorer, prompt, completion, device)
            nll, tokens = nll + row_nll, tokens + row_tokens
    model.train(was_training)
    return {"teacher_nll": nll / max(tokens, 1), "mean_sample_length": tokens / max(len(prompts), 1)}


# ----------------------------------------------------------------------------------------------
# distill eval


def eval_config(config: str | None, overrides: list[str], named: dict[str, str]) -> Config:
    """The config `distill eval` runs with: the given one, or, without --config, one made from the models alone
    (exported `final/` directories carry their tokenizer): the built-in corpus, the model named `teacher` (if any)
    as the reference for the teacher-relative metrics."""
    if config is not None or not named:  # (no model either: load_config names what is missing)
        return load_config(config, overrides)
    for name, path in named.items():  # named as given, before one of them is taken for the tokenizer
        models.check_local(path, "student", label=f"--model {name}")
    made = [f"student.path={next(iter(named.values()))}", "distill.alpha=0"]
    if "teacher" in named:
        made.append(f"teacher.path={named['teacher']}")
    return load_config(None, made + list(overrides))


def evaluate_models(cfg: Config, named: dict[str, str]) -> list[dict]:
    """Each model's metrics on the same validation tokens and held-out prompts, against the config's teacher.

    `named` maps a display name to a model directory or hub id; empty means the config's teacher and student.
    """
    if not named:
        for role in ("teacher", "student"):
            mcfg = getattr(cfg, role)
            if mcfg is not None and mcfg.path is not None:
                named[role] = mcfg.path
    if not named:
        raise DistillError("nothing to evaluate: give --model NAME=PATH or a config whose student/teacher has a path")
    accelerator = setup_accelerator(cfg)
    routed = [t.name for t in cfg.teachers] if cfg.data.teacher_column is not None and cfg.teachers else None
    docs = functools.cache(lambda: documents(cfg.data, routed))
    stored = training_store(cfg)
    tokenizer = run_tokenizer(cfg, accelerator, docs, stored / TOKENIZER if stored is not None else None)
    theirs = teacher_tokenizer(cfg)  # distill.cross_tokenizer: the teacher's own tokenizer; else None
    # With another tokenizer, the config's teacher is scored in its own tokenization (own_row), the others in ours.
    own = {name for name, path in named.items() if theirs is not None and same_path(path, cfg.teacher.path)}
    mcfgs = {name: ModelConfig(path=path) for name, path in named.items()}
    configs = {name: models.model_config(m, len(tokenizer), name) for name, m in mcfgs.items()}
    teacher_configs = [models.model_config(t, len(theirs or tokenizer), role) for role, t in cfg.teacher_roles()]
    teacher_config = teacher_configs[0] if teacher_configs else None
    for name, mc in configs.items():
        label = f"--model {name}={named[name]}"
        if name in own:
            models.check_model_configs(cfg, mc, None, len(theirs), label)
            continue
        models.check_model_configs(cfg, mc, None if theirs else teacher_config, len(tokenizer), label)
        check_model_tokenizer(name, named[name], tokenizer)
    with accelerator.main_process_first():
        _, val_ds, _ = build_datasets(docs(), tokenizer, cfg.data)
        held_out = held_out_prompts(cfg, docs(), tokenizer, cfg.eval.prompts) if cfg.eval.prompts else None
    teacher = None
    if theirs is not None:
        # The dense teacher over its own vocabulary, reduced to the spans both tokenizations share (dense span
        # targets whatever the training used, as below); the span metrics are validation's (val_span_kl, ...).
        dense_cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, top_k=None))
        teacher = setup_teachers(
            dense_cfg,
            teacher_configs,
            accelerator.device,
            vocab=len(theirs),
            top_k=None,
            temperature=cfg.distill.temperature,
            chunk_size=cfg.distill.chunk_size,
            tokenizers=(tokenizer, theirs),
        )
    elif cfg.teachers:
        # Several teachers: their mixture (or routed) top-k at distill.top_k, with each teacher's own KD and agreement
        # (val_kd_loss/NAME, val_agreement/NAME), as validation during training computes them.
        teacher = setup_teachers(
            cfg,
            teacher_configs,
            accelerator.device,
            vocab=len(tokenizer),
            top_k=cfg.distill.top_k,
            temperature=cfg.distill.temperature,
            chunk_size=cfg.distill.chunk_size,
        )
    elif teacher_config is not None:
        # Dense targets whatever the training used: the metrics compare whole distributions.
        teacher = setup_teacher(
            cfg.teacher,
            teacher_config,
            accelerator.device,
            seed=cfg.train.seed,
            vocab=len(tokenizer),
            temperature=cfg.distill.temperature,
            chunk_size=cfg.distill.chunk_size,
        )
    rows = []
    for name, mcfg in mcfgs.items():
        if name in own:
            rows.append(own_row(accelerator, cfg, name, mcfg, configs[name], docs(), theirs))
            continue
        model = models.load_model(mcfg, configs[name], seed=cfg.train.seed).to(accelerator.device)
        head = models.AlignedHead(model.get_output_embeddings(), len(tokenizer))
        run_cfg = resolve_loss_chunks(cfg, configs[name], accelerator)
        completions: list[dict] = []
        result = evaluate(accelerator, model, head, teacher, val_ds, run_cfg, held_out, completions)
        rows.append({"model": name, "path": mcfg.path, **result, "completions": completions})
        del model
    return rows


def same_path(a: str, b: str) -> bool:
    """Whether two model paths name one directory (as given, relative or with ~), so that `--model teacher=DIR` of
    the config's own teacher.path is that teacher."""
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


OWN_KEYS = ("val_loss", "val_ppl", "val_tokens")  # a teacher with another tokenizer: own_val_loss, ... (own_row)


def own_row(accelerator: Accelerator, cfg: Config, name: str, mcfg: ModelConfig, config, docs, tokenizer) -> dict:
    """distill.cross_tokenizer: the teacher's row, its validation loss and perplexity on the same validation
    documents in its own tokenization (`tokenizer`), through `evaluate` without a reference. Its keys are own_*:
    nats per teacher token do not compare with the students' val_loss (nats per student token). No generation
    metrics: plain-text prompts are cut in tokens, so the teacher's prompts would not be the students'."""
    with accelerator.main_process_first():
        rows, _ = tokenize(docs.val, docs.kind, tokenizer, cfg.data, "validation")
        val_ds = pack_rows(rows, tokenizer, cfg.data, "validation", whole=docs.kind.is_chat)
    model = models.load_model(mcfg, config, seed=cfg.train.seed).to(accelerator.device)
    head = models.AlignedHead(model.get_output_embeddings(), len(tokenizer))
    result = evaluate(accelerator, model, head, None, val_ds, resolve_loss_chunks(cfg, config, accelerator))
    own = {f"own_{key}": result[key] for key in OWN_KEYS}
    return {"model": name, "path": mcfg.path, "tokenizer": "teacher's own", **own, "completions": []}


def check_model_tokenizer(name: str, path: str, tokenizer) -> None:
    """A model is scored on the run's tokens: one that was trained with another tokenizer (an exported final/ keeps
    its own) would be compared on tokens it never saw; refused, naming the model and the first token that differs."""
    try:
        own = load_tokenizer(path)
    except DistillError:
        return  # a weights-only directory: nothing to compare
    diff = tokenizer_difference(own, tokenizer, (f"model {name}", "run"), specials=False)
    if diff is not None:
        raise DistillError(
            f"--model {name}={path} was trained with another tokenizer than this evaluation's ({diff}); evaluate it "
            "with the config of its own run (--config RUN/config.yaml), where its tokens are the run's"
        )


# (column title, row key, format) of the `distill eval` table; a metric a row lacks is shown as "-".
COLUMNS = (
    ("val loss", "val_loss", ".4f"),
    ("ppl", "val_ppl", ".2f"),
    ("fwd KL", "val_forward_kl", ".4f"),
    ("rev KL", "val_reverse_kl", ".4f"),
    ("top-1 agree", "val_top1_agreement", ".3f"),
    ("span KL", "val_span_kl", ".4f"),
    ("span agree", "val_span_agreement", ".3f"),
    ("unaligned", "val_unaligned_fraction", ".3f"),
    ("own-tokens val loss", "own_val_loss", ".4f"),
    ("own-tokens ppl", "own_val_ppl", ".2f"),
    ("ECE", "val_ece", ".4f"),
    ("teacher NLL", "gen_teacher_nll", ".3f"),
    ("ROUGE-L", "gen_rouge_l", ".3f"),
    ("parses", "gen_parse_rate", ".2f"),
    ("repetition", "gen_repetition", ".3f"),
    ("val tok/s", "val_tokens_per_second", ",.0f"),
    ("gen tok/s", "gen_tokens_per_second", ",.0f"),
)


def format_table(rows: list[dict]) -> str:
    """`distill eval` rows as a Markdown table (only the columns some row has)."""
    columns = [c for c in COLUMNS if any(c[1] in r for r in rows)]
    lines = [
        "| model | " + " | ".join(c[0] for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for r in rows:
        cells = [format(r[key], fmt) if r.get(key) is not None else "-" for _, key, fmt in columns]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_rows(rows: list[dict], path: Path) -> None:
    """eval.json: the rows, written atomically (a partial file never replaces a complete one); its directory is
    created if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(rows, indent=2) + "\n")
