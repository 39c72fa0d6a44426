"""Online sparse targets (`teacher.topk_targets`) against a float64 reference."""

import pytest
import torch

from distributed_distill.teacher import topk_targets


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize(("k", "chunk"), [(8, 10), (8, 37), (500, 16)])
def test_topk_targets_match_float64(temperature, k, chunk):
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(37, 16) * 3, torch.randn(500, 16), torch.randn(500)
    out = topk_targets(hidden, weight, bias, k, temperature, chunk_size=chunk)
    logp = torch.log_softmax((hidden.double() @ weight.double().T + bias.double()) / temperature, -1)
    top, idx = logp.topk(k)
    tail = logp.scatter(-1, idx, float("-inf")).logsumexp(-1)
    assert torch.equal(out.ids, idx)
    torch.testing.assert_close(
        out.logprobs.double(), top, atol=5e-5, rtol=0
    )  # fp32 logits of magnitude ~100: eps * 100
    if k == 500:
        assert torch.isneginf(out.tail_logmass).all()  # nothing outside
    else:
        torch.testing.assert_close(
            out.tail_logmass.double(), tail, atol=5e-5, rtol=0
        )  # fp32 logits of magnitude ~100: eps * 100
    # the k log-probs and the tail account for all the probability
    total = torch.logaddexp(out.logprobs.logsumexp(-1), out.tail_logmass).exp()
    torch.testing.assert_close(total, torch.ones(37), atol=1e-5, rtol=0)


def test_store_dtype_rounds_like_the_store():
    torch.manual_seed(1)
    out = topk_targets(torch.randn(5, 8), torch.randn(40, 8), None, 4, 1.0, store_dtype=torch.float16)
    assert torch.equal(out.logprobs, out.logprobs.half().float())
    assert torch.equal(out.tail_logmass, out.tail_logmass.half().float())
