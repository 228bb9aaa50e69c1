"""Generation: greedy equals transformers' generate, cached decoding equals the uncached forward, batches of
different lengths, sampling controls, and clear errors."""

import pytest
import torch

from conftest import TINY_SPECS, hf_reference
from dbrx import DbrxForCausalLM, KVCache
from dbrx.generate import decode_one_token, generate, greedy, prefill, sample


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen")
    hf = hf_reference("B", path, seed=2)
    return hf, DbrxForCausalLM.from_pretrained(path)


def _prompt(n, seed):
    return torch.randint(0, TINY_SPECS["B"]["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_greedy(hf, prompts, n):
    T = max(map(len, prompts))
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, T:].tolist()


def test_greedy_equals_transformers(pair):
    hf, ours = pair
    p = _prompt(11, 0)
    assert generate(ours, p, 30) == _hf_greedy(hf, [p], 30)[0]


def test_batch_of_different_lengths_left_padded(pair):
    hf, ours = pair
    prompts = [_prompt(13, 1), _prompt(4, 2), _prompt(9, 3)]
    got = generate(ours, prompts, 20)
    assert got == _hf_greedy(hf, prompts, 20)
    assert got == [generate(ours, p, 20) for p in prompts]  # each row generates what it would alone


def test_cached_decoding_equals_uncached_forward(pair):
    _, ours = pair
    p = _prompt(10, 4)
    new = generate(ours, p, 15)
    full = torch.tensor([p + new])
    cache = KVCache(ours.config, 1, len(p) + len(new), torch.float32, "cpu")
    with torch.no_grad():
        uncached = ours(full).logits[0]
        step_logits = [prefill(ours, full[:, : len(p)], cache, None)[0]]
        for i, tok in enumerate(new[:-1]):
            step_logits.append(decode_one_token(ours, torch.tensor([tok]), cache, len(p) + i, None)[0])
    cached = torch.stack(step_logits)
    torch.testing.assert_close(cached, uncached[len(p) - 1: -1], rtol=1e-5, atol=1e-5)
    assert cached.argmax(-1).tolist() == new


def test_prompt_longer_than_max_seq_len_is_a_clear_error(pair):
    _, ours = pair
    limit = ours.config.max_seq_len
    with pytest.raises(ValueError, match=f"exceeds the model's max_seq_len of {limit}"):
        generate(ours, _prompt(limit + 5, 0), 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(ours, _prompt(limit - 2, 0), 10)
    with pytest.raises(ValueError, match="max_seq_len"):
        ours(torch.zeros(1, limit + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(ours, [1, 2, 10_000], 3)


def test_sampling_is_seeded_and_controls_apply(pair):
    _, ours = pair
    p = _prompt(6, 5)
    a = generate(ours, p, 12, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    assert a == generate(ours, p, 12, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    assert generate(ours, p, 12, temperature=1.0, top_k=1, seed=3) == generate(ours, p, 12)
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0]])
    draws = {sample(logits, 1.0, top_p=0.5, generator=torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert draws == {1}
    draws = {sample(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(s)).item() for s in range(50)}
    assert draws == {1, 2}


@pytest.mark.parametrize("vocab", [100352, 100353, 9000, 300])
def test_greedy_picks_what_argmax_picks_ties_and_nan_included(vocab):
    g = torch.Generator().manual_seed(vocab)
    for dtype in (torch.float32, torch.bfloat16):
        for trial in range(6):
            logits = torch.randn(3, vocab, generator=g).to(dtype)
            if trial == 1:
                logits = logits.round()  # equal maxima in several chunks: the first one counts
            if trial == 2:
                logits[:, -1] = 100  # the maximum in the last, shorter chunk
            if trial == 3:
                logits[0, 5], logits[1, -2] = float("nan"), float("nan")
            if trial == 4:
                logits[:] = float("-inf")
            if trial == 5:
                logits = logits.t().contiguous().t()  # not contiguous
            assert torch.equal(greedy(logits), logits.argmax(-1)), (dtype, trial)
        assert greedy(logits[:0]).shape == (0,)  # no row to sample (a serve step that only prefilled)
        assert torch.equal(greedy(logits[0]), logits[0].argmax(-1))  # one row as a vector


def test_stop_tokens_end_a_row(pair):
    _, ours = pair
    p = _prompt(8, 6)
    free = generate(ours, p, 10)
    stop = free[3]
    stopped = generate(ours, p, 10, stop_token_ids=[stop])
    assert stopped == free[: free.index(stop) + 1]


def test_the_kv_cache_takes_the_models_compute_dtype(pair, monkeypatch):
    """Under FSDP's mixed precision (dbrx.parallel sets compute_dtype) keys and values come in bf16 from fp32 shards:
    the cache keeps them in bf16, not in the parameters' fp32 (twice the memory, and a cast at each step)."""
    import importlib

    gen = importlib.import_module("dbrx.generate")  # the module (dbrx.generate is also the function's name)

    _, ours = pair
    made = []
    monkeypatch.setattr(gen, "KVCache", lambda *a, **k: made.append(a[3]) or KVCache(*a, **k))
    p = _prompt(8, 7)
    plain = generate(ours, p, 4)
    monkeypatch.setattr(ours, "compute_dtype", torch.bfloat16)
    assert len(generate(ours, p, 4)) == 4 and made == [torch.float32, torch.bfloat16]
    monkeypatch.undo()
    assert generate(ours, p, 4) == plain


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_on_each_available_device(tmp_path, device):
    """The same model file runs in bf16 wherever it is loaded (CUDA when present); logits stay close to fp32."""
    from conftest import dbrx_config

    torch.manual_seed(4)
    DbrxForCausalLM(dbrx_config("C")).save_pretrained(tmp_path)  # default init: routing not on a knife edge
    fp32 = DbrxForCausalLM.from_pretrained(tmp_path)
    bf16 = DbrxForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device=device)
    ids = torch.randint(0, TINY_SPECS["C"]["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = fp32(ids).logits
        got = bf16(ids.to(device)).logits.float().cpu()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - want).abs().max() / want.abs().max() < 0.1
    out = generate(bf16, ids[0].tolist(), 6)
    assert len(out) == 6 and all(0 <= t < TINY_SPECS["C"]["vocab_size"] for t in out)
