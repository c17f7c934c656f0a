"""The chunked, completion-only log-prob path agrees with the plain full-logits computation, in every batch
layout (padded, packed, shared-prompt) and every attention implementation the layout is used with."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spoctl.engine.batching import (LAYOUTS, TokenPair, collate_pairs, epoch_order, inference_batches, local_micro_batches,
                                   shared_prompt_mask)
from spoctl.engine.frozen import compute_logps
from spoctl.engine.logprobs import (SequenceScorer, attention_window, batch_layout, compile_backbone, reference_logps,
                                   resolve_layout, score_batch)
from spoctl.errors import UsageError


def tiny_llama(vocab: int = 97, seed: int = 0, attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def random_pairs(n: int, vocab: int = 97, seed: int = 1) -> list[TokenPair]:
    g = torch.Generator().manual_seed(seed)

    def seq(lo: int, hi: int) -> list[int]:
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(1, vocab, (k,), generator=g).tolist()

    return [TokenPair(seq(1, 9), seq(1, 7), seq(1, 7)) for _ in range(n)]


@pytest.mark.parametrize("chunk", [1, 3, 1000])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_chunked_logps_equal_full_logits(chunk, layout, attn):
    model = tiny_llama(attn=attn)
    pairs = random_pairs(5)
    padded = collate_pairs(pairs, pad_token_id=0)
    want_c, want_r = reference_logps(model, padded)
    with torch.no_grad():
        c, r, lc, lr = score_batch(SequenceScorer(model, chunk_size=chunk), collate_pairs(pairs, 0, layout))
    torch.testing.assert_close(c, want_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r, want_r, rtol=1e-5, atol=1e-5)
    assert lc.tolist() == [len(p.chosen) for p in pairs]
    assert lr.tolist() == [len(p.rejected) for p in pairs]


def test_packed_sequences_do_not_attend_to_each_other():
    """A pair's log-probs are the same alone and packed beside other pairs."""
    model = tiny_llama()
    pairs = random_pairs(4, seed=3)
    scorer = SequenceScorer(model, chunk_size=4)
    with torch.no_grad():
        packed_c, packed_r, _, _ = score_batch(scorer, collate_pairs(pairs, 0, "packed"))
        for i, p in enumerate(pairs):
            alone_c, alone_r, _, _ = score_batch(scorer, collate_pairs([p], 0))
            torch.testing.assert_close(packed_c[i], alone_c[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(packed_r[i], alone_r[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_chunked_gradients_equal_full_logits_gradients(layout):
    pairs = random_pairs(3, seed=5)
    grads = []
    for path in ("full", "chunked"):
        model = tiny_llama()
        if path == "full":
            c, r = reference_logps(model, collate_pairs(pairs, 0))
        else:
            c, r, _, _ = score_batch(SequenceScorer(model, chunk_size=2), collate_pairs(pairs, 0, layout))
        (c.sum() - 0.5 * r.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_shared_prompt_responses_do_not_see_each_other():
    """Changing the chosen response must not move the rejected response's log-prob (and vice versa): the
    rejected tokens sit after the chosen ones in the row, so only the mask keeps them apart."""
    model = tiny_llama()
    scorer = SequenceScorer(model, chunk_size=4)
    pair = random_pairs(1, seed=9)[0]
    other = TokenPair(pair.prompt, [(t % 90) + 3 for t in pair.chosen] + [5, 6], pair.rejected)
    with torch.no_grad():
        _, r1, _, _ = score_batch(scorer, collate_pairs([pair], 0, "shared-prompt"))
        c1, _, _, _ = score_batch(scorer, collate_pairs([pair], 0, "shared-prompt"))
        _, r2, _, _ = score_batch(scorer, collate_pairs([other], 0, "shared-prompt"))
        c_alone, _, _, _ = score_batch(scorer, collate_pairs([TokenPair(pair.prompt, pair.chosen, [7])], 0, "shared-prompt"))
    torch.testing.assert_close(r1, r2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c1, c_alone, rtol=1e-5, atol=1e-5)


def test_shared_prompt_mask_shape_of_one_pair():
    # prompt of 2, chosen of 2, rejected of 1, then one padding position
    seg = torch.tensor([[0, 0, 1, 1, 2, -1]])
    m = shared_prompt_mask(seg)[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0, 0],
                 [1, 1, 1, 0, 0, 0],
                 [1, 1, 1, 1, 0, 0],
                 [1, 1, 0, 0, 1, 0],  # the rejected token sees the prompt and itself, not the chosen tokens
                 [0, 0, 0, 0, 0, 1]]  # padding sees only itself (no empty softmax row)


def test_layout_choice_follows_the_attention_implementation():
    assert resolve_layout("auto", tiny_llama(attn="sdpa")) == "shared-prompt"
    assert resolve_layout("auto", tiny_llama(attn="eager")) == "shared-prompt"
    model = tiny_llama()
    model.config._attn_implementation = "flash_attention_2"  # only the name is read
    assert resolve_layout("auto", model) == "packed"
    assert resolve_layout("padded", model) == "padded"
    with pytest.raises(UsageError, match="shared-prompt layout needs"):
        resolve_layout("shared-prompt", model)
    with pytest.raises(ValueError, match="unknown batch layout"):
        collate_pairs(random_pairs(1), 0, "ragged")


def test_epoch_order_is_deterministic_grouped_and_complete():
    lengths = [int(x) for x in torch.randint(5, 200, (103,), generator=torch.Generator().manual_seed(0))]
    a = epoch_order(lengths, 8, seed=1, epoch=0)
    assert a == epoch_order(lengths, 8, seed=1, epoch=0)
    assert a != epoch_order(lengths, 8, seed=1, epoch=1)
    assert all(len(b) == 8 for b in a) and len(a) == 103 // 8
    flat = [i for b in a for i in b]
    assert len(set(flat)) == len(flat)
    # Length grouping: the spread inside a batch is far below the spread of a random batch.
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in a) / len(a)
    random_spread = sum(max(lengths[i:i + 8]) - min(lengths[i:i + 8]) for i in range(0, 96, 8)) / 12
    assert spread < 0.5 * random_spread


def test_micro_batches_split_global_batch_evenly():
    lengths = list(range(100))
    gb = list(range(16))
    parts = [local_micro_batches(gb, lengths, r, 2, 3) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 3
    assert sorted(i for p in parts for mb in p for i in mb) == gb
    with pytest.raises(ValueError):
        local_micro_batches(list(range(9)), lengths, 0, 2, 4)
    assert sorted(i for b in inference_batches(lengths[:10], 4) for i in b) == list(range(10))


def test_compiled_backbone_gives_the_same_logps_and_gradients():
    """`align.compile`: torch.compile really runs (dynamo captures graphs, no graph break), across batches of
    different shapes, and changes neither the numbers nor the parameter names checkpoints are saved under."""
    from torch._dynamo.utils import counters

    pairs = random_pairs(6, seed=11)
    eager, compiled = tiny_llama(), tiny_llama()
    keys = list(compiled.state_dict())
    # aot_eager: dynamo and AOT autograd trace exactly as for inductor, but run the captured graph with eager
    # kernels. Inductor's generated CPU kernels are refused by `check_compile_supported` (wrong on some CPUs).
    compile_backbone(compiled, backend="aot_eager")
    wrapped = compiled.get_decoder()._compiled_call_impl
    compile_backbone(compiled, backend="aot_eager")  # a frozen model reused as the policy: no second wrapper
    assert compiled.get_decoder()._compiled_call_impl is wrapped
    assert list(compiled.state_dict()) == keys
    counters.clear()
    for subset in (pairs, pairs[:3]):
        outs = []
        for model in (eager, compiled):
            model.zero_grad()
            c, r, _, _ = score_batch(SequenceScorer(model, chunk_size=4), collate_pairs(subset, 0, "shared-prompt"))
            (c.sum() - 0.5 * r.sum()).backward()
            outs.append((c.detach(), r.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]


def test_compile_is_refused_on_cpu():
    from spoctl.engine.logprobs import check_compile_supported
    from spoctl.errors import UsageError

    check_compile_supported(False, "cpu")
    check_compile_supported(True, "cuda")
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        check_compile_supported(True, "cpu")


def test_sliding_window_models_fall_back_to_padded_where_the_window_binds():
    """The shared-prompt mask is plain causal: with a sliding window it is exact only while every position is
    within the window. Past it, the batch goes padded and the model applies its own window."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=128, sliding_window=6)
    cfg._attn_implementation = "sdpa"
    model = MistralForCausalLM(cfg).eval()
    assert attention_window(model) == 6 and attention_window(tiny_llama()) is None
    short = [TokenPair([1, 2], [3, 4], [5]), TokenPair([6], [7, 8, 9], [10, 11])]
    long = random_pairs(3, seed=2) + [TokenPair(list(range(1, 9)), [20, 21, 22], [23])]
    assert batch_layout("shared-prompt", short, 6) == "shared-prompt"
    assert batch_layout("shared-prompt", long, 6) == "padded"
    assert batch_layout("shared-prompt", long, None) == "shared-prompt"
    with torch.no_grad():
        for pairs in (short, long):
            want_c, want_r = reference_logps(model, collate_pairs(pairs, 0))
            got = compute_logps(model, pairs, batch_size=8, pad_token_id=0, chunk_size=4, device=torch.device("cpu"))
            torch.testing.assert_close(got.chosen, want_c, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.rejected, want_r, rtol=1e-5, atol=1e-5)
            # ...whereas forcing the shared-prompt mask on the long pairs ignores the window and differs.
        forced_c, _, _, _ = score_batch(SequenceScorer(model), collate_pairs(long, 0, "shared-prompt"))
    assert not torch.allclose(forced_c, want_c, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients():
    """`align.gradient_checkpointing` recomputes activations in backward: less memory, the same gradients."""
    pairs = random_pairs(4, seed=13)
    grads = []
    for ckpt in (False, True):
        model = tiny_llama()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        c, r, _, _ = score_batch(SequenceScorer(model, chunk_size=3), collate_pairs(pairs, 0, "shared-prompt"))
        (c.sum() - 0.5 * r.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert model.model.gradient_checkpointing
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train_weight", [True, False])
def test_one_tensor_head_matches_log_softmax_in_float64(train_weight):
    """The fused head path (logits, in-place logsumexp, gradient from a recomputed softmax) against log_softmax
    in float64. Bound: float32 rounds each logit and the logsumexp to a relative 2^-24; a log-prob of logits of
    magnitude L over V entries is off by at most a small multiple of eps * (L + log V), and so is each gradient
    entry relative to its scale (|hidden| or |weight| times a softmax difference at most 1)."""
    from spoctl.engine.logprobs import _LinearTokenLogps, _fused_head_ok

    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(16, 500, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(500, 16, generator=g))
    head.weight.requires_grad_(train_weight)
    hidden = torch.randn(7, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 500, (7,), generator=g)
    upstream = torch.randn(7, generator=g)
    assert _fused_head_ok(head, hidden, None, None)

    got = _LinearTokenLogps.apply(hidden, head.weight, targets)
    (got * upstream).sum().backward()
    h64, w64 = hidden.detach().double().requires_grad_(), head.weight.detach().double().requires_grad_()
    want = (h64 @ w64.t()).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (want * upstream.double()).sum().backward()

    eps = torch.finfo(torch.float32).eps
    scale = float((h64 @ w64.t()).abs().max()) + math.log(500)
    torch.testing.assert_close(got.double(), want.detach(), rtol=0, atol=16 * eps * scale)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=0, atol=16 * eps * scale * float(w64.abs().max()))
    if train_weight:
        torch.testing.assert_close(head.weight.grad.double(), w64.grad, rtol=0,
                                   atol=16 * eps * scale * float(h64.abs().max()) * 7)
    else:
        assert head.weight.grad is None


def test_one_tensor_head_is_not_used_where_it_would_compute_otherwise():
    """Heads with a bias, logit post-processing, another dtype or autocast take the generic path."""
    from spoctl.engine.logprobs import _fused_head_ok

    h = torch.randn(2, 8)
    assert not _fused_head_ok(torch.nn.Linear(8, 10, bias=True), h, None, None)
    assert not _fused_head_ok(torch.nn.Linear(8, 10, bias=False), h, 30.0, None)
    assert not _fused_head_ok(torch.nn.Linear(8, 10, bias=False).to(torch.bfloat16), h.bfloat16(), None, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _fused_head_ok(torch.nn.Linear(8, 10, bias=False), h, None, None)
