"""The chunked, completion-only log-prob path agrees with the plain full-logits computation, padded or packed."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spoctl.engine.batching import Pair, collate_pairs, epoch_order, inference_batches, local_micro_batches
from spoctl.engine.logprobs import SequenceScorer, reference_logps, score_batch


def tiny_llama(vocab: int = 97, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def random_pairs(n: int, vocab: int = 97, seed: int = 1) -> list[Pair]:
    g = torch.Generator().manual_seed(seed)

    def seq(lo: int, hi: int) -> list[int]:
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(1, vocab, (k,), generator=g).tolist()

    return [Pair(seq(1, 9), seq(1, 7), seq(1, 7)) for _ in range(n)]


@pytest.mark.parametrize("chunk", [1, 3, 1000])
@pytest.mark.parametrize("pack", [False, True])
def test_chunked_logps_equal_full_logits(chunk, pack):
    model = tiny_llama()
    pairs = random_pairs(5)
    padded = collate_pairs(pairs, pad_token_id=0)
    want_c, want_r = reference_logps(model, padded)
    with torch.no_grad():
        c, r, lc, lr = score_batch(SequenceScorer(model, chunk_size=chunk), collate_pairs(pairs, 0, pack=pack))
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
        packed_c, packed_r, _, _ = score_batch(scorer, collate_pairs(pairs, 0, pack=True))
        for i, p in enumerate(pairs):
            alone_c, alone_r, _, _ = score_batch(scorer, collate_pairs([p], 0))
            torch.testing.assert_close(packed_c[i], alone_c[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(packed_r[i], alone_r[0], rtol=1e-5, atol=1e-5)


def test_chunked_gradients_equal_full_logits_gradients():
    pairs = random_pairs(3, seed=5)
    grads = []
    for path in ("full", "chunked"):
        model = tiny_llama()
        batch = collate_pairs(pairs, 0)
        if path == "full":
            c, r = reference_logps(model, batch)
        else:
            c, r, _, _ = score_batch(SequenceScorer(model, chunk_size=2), batch)
        (c.sum() - 0.5 * r.sum()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


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
