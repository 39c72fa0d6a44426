"""The sampling routine (generation.py) on a tiny Llama, in-process: greedy equals transformers' greedy generate, a
row's sample does not depend on its batch or its padding, the stored log-probs and the logits handed to on_step
equal a fresh forward over the sampled sequence (float64), and the filters draw from the distribution they name."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from distributed_distill import models
from distributed_distill.config import ArchConfig
from distributed_distill.generation import Sampling, generate, sample_tokens

PAD, EOS = 0, 2
PROMPTS = [[5, 17, 9, 33, 4, 81, 7], [12, 3], [40, 41, 42, 43], [99]]


def tiny_llama(dtype=torch.float32, seed=1):
    config = models.arch_config(ArchConfig(family="llama", hidden_size=32, num_layers=2, num_heads=4), 128)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()


def gens(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]


def hf_greedy(model, prompts, max_new_tokens):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return rows


def test_greedy_equals_hf_generate_and_rows_are_independent():
    """Default tier. Greedy: transformers' own greedy generate on the same left-padded batch, token for token.
    Sampled (float64, so padding changes nothing): each row alone equals that row inside a padded batch."""
    model = tiny_llama()
    greedy = generate(
        model, PROMPTS, gens(0, 4), Sampling(temperature=0, max_new_tokens=12, eos_ids=(EOS,), pad_id=PAD)
    )
    assert greedy.completions == hf_greedy(model, PROMPTS, 12)
    assert all(r in ("eos", "length") for r in greedy.finish_reasons)

    model64 = tiny_llama(torch.float64)
    sampling = Sampling(temperature=1.3, top_p=0.9, top_k=50, max_new_tokens=10, eos_ids=(EOS,), pad_id=PAD)
    batch = generate(model64, PROMPTS, gens(7, 4), sampling)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model64, [prompt], gens(7, 4)[i : i + 1], sampling)
        assert alone.completions[0] == batch.completions[i]
        assert alone.logprobs[0] == pytest.approx(batch.logprobs[i], abs=1e-9)
    # Another seed gives other samples (the generators are what is random).
    other = generate(model64, PROMPTS, gens(8, 4), sampling)
    assert other.completions != batch.completions


@pytest.mark.slow
def test_logprobs_and_on_step_equal_a_fresh_forward():
    """float64: the log-prob of each sampled token and the raw logits handed to on_step equal a full forward of
    prompt + completion without a cache."""
    model = tiny_llama(torch.float64)
    seen = []
    samples = generate(
        model,
        PROMPTS,
        gens(3, 4),
        Sampling(temperature=0.8, max_new_tokens=9, eos_ids=(EOS,), pad_id=PAD),
        on_step=lambda logits, tokens: seen.append((logits.clone(), tokens.clone())),
    )
    for i, (prompt, completion) in enumerate(zip(PROMPTS, samples.completions)):
        full = torch.tensor([prompt + completion])
        logits = model(full).logits[0, len(prompt) - 1 : -1]
        ref = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(samples.logprobs[i], dtype=torch.float64), ref, atol=1e-10)
        for t, token in enumerate(completion):
            assert int(seen[t][1][i]) == token
            assert torch.allclose(seen[t][0][i], logits[t], atol=1e-10)
    assert len(seen) == max(len(c) for c in samples.completions)


@pytest.mark.slow
def test_finish_reasons_eos_stop_token_stop_string_length():
    model = tiny_llama()
    greedy = Sampling(temperature=0, max_new_tokens=8, eos_ids=(EOS,), pad_id=PAD)
    free = generate(model, PROMPTS, gens(0, 4), greedy)
    # Stop on the third greedy token of row 0, as an EOS id, as a stop token, and as a stop string.
    stop = free.completions[0][2]
    as_eos = generate(model, PROMPTS[:1], gens(0, 1), dataclasses.replace(greedy, eos_ids=(stop,)))
    assert as_eos.completions[0] == free.completions[0][: free.completions[0].index(stop) + 1]
    assert as_eos.finish_reasons == ["eos"]
    as_stop = generate(
        model, PROMPTS[:1], gens(0, 1),
        Sampling(temperature=0, max_new_tokens=8, stop_token_ids=(stop,), eos_ids=(EOS,), pad_id=PAD),
    )  # fmt: skip
    assert as_stop.completions == as_eos.completions and as_stop.finish_reasons == ["stop"]

    def decode(ids):  # a stand-in tokenizer: one letter per id
        return "".join(chr(ord("a") + t % 26) for t in ids)

    text = decode(free.completions[0])
    stopped = generate(
        model, PROMPTS[:1], gens(0, 1),
        Sampling(temperature=0, max_new_tokens=8, stop_strings=(text[1:3],), eos_ids=(EOS,), pad_id=PAD, decode=decode),
    )  # fmt: skip
    assert stopped.finish_reasons == ["stop"]
    assert stopped.completions[0] == free.completions[0][: text.index(text[1:3]) + 2]
    short = generate(model, PROMPTS, gens(0, 4), Sampling(temperature=0, max_new_tokens=3, eos_ids=(), pad_id=PAD))
    assert short.finish_reasons == ["length"] * 4 and all(len(c) == 3 for c in short.completions)
    with pytest.raises(ValueError, match="decode"):  # (raised as the Sampling is made)
        generate(model, PROMPTS, gens(0, 4), Sampling(stop_strings=("x",), eos_ids=(EOS,), pad_id=PAD))
    with pytest.raises(ValueError, match="generator"):
        generate(model, PROMPTS, gens(0, 3), greedy)


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [Sampling(temperature=0.7), Sampling(top_k=3), Sampling(top_p=0.8, temperature=2)])
def test_sampler_draws_from_the_filtered_distribution(sampling):
    """20,000 draws over 6 tokens: frequencies within 4 standard errors of the float64 filtered distribution, and
    filtered tokens never drawn."""
    logits = torch.tensor([2.0, 1.5, 0.3, -0.2, 0.9, -3.0], dtype=torch.float64)
    p = (logits / sampling.temperature).softmax(-1)
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    if sampling.top_k:
        keep[order[: sampling.top_k]] = True
    elif sampling.top_p < 1:
        before = p[order].cumsum(0) - p[order]
        keep[order[before < sampling.top_p]] = True
    else:
        keep[:] = True
    ref = torch.where(keep, p, 0.0)
    ref = ref / ref.sum()
    n = 20_000
    draws = sample_tokens(logits.float().expand(n, -1), gens(11, n), sampling)
    freq = torch.bincount(draws, minlength=6).double() / n
    assert (freq[~keep] == 0).all()
    assert ((freq - ref).abs() <= 4 * (ref * (1 - ref) / n).sqrt() + 1e-12).all(), (freq, ref)
