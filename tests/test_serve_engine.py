"""The serving engine: continuous batching over per-request KV slots gives each request what `generate` gives it
alone, whoever shares its batch and whenever it joins; chunked prefill, slots freed at once, admission limits."""

import pytest
import torch

from dbrx import DbrxForCausalLM, generate
from dbrx.config import DbrxConfig
from dbrx.serve import Engine, SamplingParams


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = DbrxConfig(d_model=48, n_heads=4, n_layers=2, max_seq_len=96, vocab_size=300,
                        attn_config={"kv_n_heads": 2}, ffn_config={"ffn_hidden_size": 40, "moe_num_experts": 4,
                                                                  "moe_top_k": 2})
    return DbrxForCausalLM(config).eval()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: Engine, arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]], steps: int = 200):
    """Step the engine, adding requests at the given steps; the tokens and finish reason of each request."""
    out: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    for step in range(steps):
        for rid, ids, params in arrivals.get(step, []):
            engine.add_request(rid, ids, params)
            out[rid] = []
        for o in engine.step():
            out[o.request_id] += o.token_ids
            if o.finished:
                reasons[o.request_id] = o.finish_reason
        if not engine.has_work() and step >= max(arrivals):
            break
    return out, reasons


def test_greedy_tokens_equal_generate_alone_whoever_shares_the_batch_and_whenever_it_joins(model):
    prompts = {"a": prompt(5, 1), "b": prompt(23, 2), "c": prompt(11, 3), "d": prompt(2, 4), "e": prompt(17, 5)}
    greedy = SamplingParams(max_tokens=12)
    engine = Engine(model, max_num_seqs=5, max_num_batched_tokens=64)
    # b and c join while a is decoding (each prefilled in the same forward as a's decode), d and e together
    # (two prompts in one forward) after a has finished
    got, reasons = run(engine, {0: [("a", prompts["a"], greedy)], 3: [("b", prompts["b"], greedy)],
                                4: [("c", prompts["c"], greedy)],
                                15: [("d", prompts["d"], greedy), ("e", prompts["e"], greedy)]})
    for rid, ids in prompts.items():
        assert got[rid] == generate(model, ids, 12), rid
    assert reasons == {rid: "length" for rid in prompts}
    assert engine.slots_in_use == 0 and sorted(engine.free) == [0, 1, 2, 3, 4]


def test_a_long_prompt_is_prefilled_in_chunks_while_running_streams_keep_decoding(model):
    engine = Engine(model, max_num_seqs=2, max_num_batched_tokens=8, prefill_slowdown=0)  # chunks fill the budget
    short, long = prompt(4, 5), prompt(60, 6)
    engine.add_request("short", short, SamplingParams(max_tokens=20))
    engine.step()  # short: prefilled, first token
    engine.add_request("long", long, SamplingParams(max_tokens=5))
    per_step = []
    got = {"short": [], "long": []}
    while engine.has_work():
        outputs = {o.request_id: o for o in engine.step()}
        per_step.append(len(outputs["short"].token_ids) if "short" in outputs else None)
        for rid, o in outputs.items():
            got[rid] += o.token_ids
    # the 60-token prompt takes 9 steps of at most 7 tokens (8 minus the decode), and short gets a token every step
    assert per_step[:9] == [1] * 9
    assert got["long"] == generate(model, long, 5)
    assert len(got["short"]) == 19


def test_a_vocabulary_sized_like_dbrx_s_prefills_alone_in_chunks():
    """Steps that only prefill sample no row; with a vocabulary as large as DBRX's (greedy's chunked path) too."""
    torch.manual_seed(0)
    config = DbrxConfig(d_model=32, n_heads=4, n_layers=1, max_seq_len=64, vocab_size=9000,
                        attn_config={"kv_n_heads": 2}, ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 4,
                                                                  "moe_top_k": 2})
    wide = DbrxForCausalLM(config).eval()
    ids = torch.randint(0, 9000, (30,), generator=torch.Generator().manual_seed(7)).tolist()
    engine = Engine(wide, max_num_seqs=1, max_num_batched_tokens=8, prefill_slowdown=0)
    got, _ = run(engine, {0: [("long", ids, SamplingParams(max_tokens=4))]})
    assert got["long"] == generate(wide, ids, 4)


def test_while_requests_decode_the_prompt_chunk_is_sized_so_a_step_takes_the_set_slowdown(monkeypatch):
    """On a simulated clock (a step costs 20 ms, + 5 ms + 0.25 ms per prompt token if it prefills), chunks grow
    from the smallest (16, doubling at most per step) towards the size at which a step with a chunk takes 2.5x a decode-only step (100
    tokens) and never pass it; a prompt that arrives while nobody decodes fills the whole budget."""
    torch.manual_seed(0)
    config = DbrxConfig(d_model=32, n_heads=2, n_layers=1, max_seq_len=1024, vocab_size=300,
                        attn_config={"kv_n_heads": 1}, ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 4,
                                                                  "moe_top_k": 2})
    engine = Engine(DbrxForCausalLM(config), max_num_seqs=2, max_num_batched_tokens=512, prefill_slowdown=2.5,
                    clock=lambda: now[0])
    now, forward, steps = [0.0], engine._forward, []

    def timed(decoding, chunks):
        prefilled = sum(len(c) for _, c in chunks)
        seconds = 0.020 + (0.005 + 0.00025 * prefilled if prefilled else 0)
        steps.append((len(decoding), prefilled, seconds))
        now[0] += seconds
        return forward(decoding, chunks)

    monkeypatch.setattr(engine, "_forward", timed)
    engine.add_request("stream", prompt(600, 7), SamplingParams(max_tokens=100))
    engine.step()
    engine.step()
    assert [p for _, p, _ in steps] == [512, 88]  # nobody decoding: the whole budget
    for _ in range(3):
        engine.step()  # decode-only steps: the reference time
    engine.add_request("long", prompt(90, 8) * 9, SamplingParams(max_tokens=1))
    while "long" in engine.running or engine.waiting:
        engine.step()
    mixed = steps[5:]
    chunks = [p for _, p, _ in mixed]
    assert all(d == 1 for d, _, _ in mixed), "the stream gets a token every step"
    assert sum(chunks) == 810 and chunks[:3] == [16, 32, 64] and chunks[:-1] == sorted(chunks[:-1]), chunks
    assert 97 <= chunks[-2] <= 100 and all(s <= 2.5 * 0.020 + 1e-9 for _, _, s in mixed), chunks


def test_a_request_waits_for_a_slot_and_an_abort_frees_its_slot_at_once(model):
    engine = Engine(model, max_num_seqs=2, max_num_batched_tokens=32)
    for rid in "abc":
        engine.add_request(rid, prompt(6, ord(rid)), SamplingParams(max_tokens=30))
    engine.step()
    assert set(engine.running) == {"a", "b"} and [r.id for r in engine.waiting] == ["c"]
    assert engine.abort("a") and engine.slots_in_use == 1
    outputs = engine.step()
    assert "c" in engine.running and not any(o.request_id == "a" for o in outputs)
    assert engine.abort("b") and engine.abort("c") and not engine.has_work()
    assert sorted(engine.free) == [0, 1] and not engine.abort("c")


def test_admission_refuses_what_could_run_out_of_cache(model):
    engine = Engine(model, max_num_seqs=2, max_model_len=40)
    with pytest.raises(ValueError, match="30 tokens \\+ max_tokens 11 = 41 exceed the model length 40"):
        engine.add_request("x", prompt(30, 1), SamplingParams(max_tokens=11))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        engine.add_request("y", [5, 300], SamplingParams(max_tokens=1))
    engine.add_request("z", prompt(30, 1), SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("z", prompt(3, 1), SamplingParams(max_tokens=1))


def test_seeded_sampling_stops_and_logprobs_do_not_depend_on_the_batch(model):
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, seed=7, logprobs=3)
    alone, _ = run(Engine(model, max_num_seqs=3), {0: [("s", prompt(9, 8), sampled)]})
    crowded, _ = run(Engine(model, max_num_seqs=3), {0: [("g", prompt(14, 9), SamplingParams(max_tokens=20))],
                                                     2: [("s", prompt(9, 8), sampled)]})
    assert alone["s"] == crowded["s"]
    first = generate(model, prompt(9, 10), 1)[0]  # a stop id the greedy request meets at once
    engine = Engine(model)
    engine.add_request("stop", prompt(9, 10), SamplingParams(max_tokens=5, stop_token_ids=(first,)))
    (o,) = engine.step()
    assert o.finished and o.finish_reason == "stop" and o.token_ids == [] and engine.slots_in_use == 0
    engine.add_request("lp", prompt(9, 10), SamplingParams(max_tokens=1, logprobs=2))
    (o,) = engine.step()
    (chosen, top), = o.logprobs
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt(9, 10)])).logits[0, -1].float(), -1)
    assert abs(chosen - logp[first].item()) < 1e-5 and [t for t, _ in top] == logp.topk(2).indices.tolist()


def test_the_blocked_head_gives_the_stored_heads_logits_and_the_engine_the_same_tokens(model):
    """The head in column blocks (several rows at once) computes a column-major head's sums, for a vocabulary that is
    not a multiple of the block and any row count or input shape; one row goes through the stored head. Bit for bit
    where the machine's matrix product sums in the blocks' order (the Xeon measured: every row count; an AMD EPYC:
    not at 5-7 and 9-11 rows, 1 ulp apart), which the server checks at start-up: it uses the blocks only where they
    are identical, and with them the engine's greedy tokens for a batch equal generate's alone."""
    import copy

    from dbrx.serve.head import BlockedHead, use_blocked_head

    served = copy.deepcopy(model)
    served.relayout_lm_head(column_major=True)
    head = served.lm_head
    blocked = BlockedHead(head, block=64)  # 300 = 4 x 64 + 44: the last block is padded
    x = torch.randn(2, 7, 48)
    identical = True
    with torch.no_grad():
        for rows in (1, 2, 3, 5, 8, 14):
            got, want = blocked(x.view(-1, 48)[:rows]), head(x.view(-1, 48)[:rows])
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            identical &= torch.equal(got, want)
        assert torch.equal(blocked(x.view(-1, 48)[:1]), head(x.view(-1, 48)[:1]))  # one row: the stored head
        torch.testing.assert_close(blocked(x), head(x), rtol=1e-6, atol=1e-6)
        assert blocked(x).shape == (2, 7, 300)
    assert blocked.weight is head.weight
    if identical:
        served.lm_head = blocked
        prompts = {rid: prompt(6 + 3 * i, 20 + i) for i, rid in enumerate("abcd")}
        got, _ = run(Engine(served, max_num_seqs=4), {0: [(rid, p, SamplingParams(max_tokens=10))
                                                          for rid, p in prompts.items()]})
        for rid, ids in prompts.items():
            assert got[rid] == generate(model, ids, 10), rid
    # chosen by measurement at start-up: a line either way, never twice, never on one row; never where not identical
    fresh = copy.deepcopy(model)
    line = use_blocked_head(fresh, 8)
    assert line.startswith("output head") and ("copy in column blocks" in line) == isinstance(fresh.lm_head,
                                                                                               BlockedHead)
    assert isinstance(fresh.lm_head, BlockedHead) == ("logits identical" in line)
    assert use_blocked_head(fresh, 1) is None

