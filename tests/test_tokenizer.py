"""cl100k through tiktoken with DBRX's specials and chat template; files that transformers loads identically."""

import sys
from pathlib import Path

import pytest

from dbrx.tokenizer import CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT, SPECIAL_TOKENS, Tokenizer

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory, tok):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def test_pinned_ids(tok):
    assert tok.encode("Hello, world!") == [9906, 11, 1917, 0]
    assert tok.encode("def f(x):\n    return x**2\n") == [755, 282, 2120, 997, 262, 471, 865, 334, 17, 198]
    assert tok.decode([9906, 11, 1917, 0]) == "Hello, world!"


def test_special_tokens(tok):
    assert SPECIAL_TOKENS == {
        "<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276, "<|pad|>": 100277, "<|im_start|>": 100278, "<|im_end|>": 100279,
    }
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (100257, 100257, 100277)
    assert tok.stop_token_ids == [100257, 100279]
    assert tok.encode("a<|im_end|>") == [64, 100279]
    assert tok.encode("a<|im_end|>", allow_special=False) != [64, 100279]
    # The checkpoint's padding rows (ids the tokenizer never makes) decode to nothing rather than crash.
    assert tok.decode([9906, 100300, 100351]) == "Hello"


def test_chat_template(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "What is DBRX?"}])
    assert ids[-13:] == [100278, 882, 198, 3923, 374, 6078, 46913, 30, 100279, 198, 100278, 78191, 198]
    text = tok.apply_chat_template([{"role": "user", "content": "What is DBRX?"}], tokenize=False)
    assert text == (f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"
                    "<|im_start|>user\nWhat is DBRX?<|im_end|>\n<|im_start|>assistant\n")
    own = tok.render_chat([{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"}], add_generation_prompt=False)
    assert own == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" \
                  "<|im_start|>assistant\nHello<|im_end|>"
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        tok.render_chat([{"role": "user", "content": "x"}, {"role": "assistant"}])


def test_default_system_prompt_is_dbrx_instructs():
    assert DEFAULT_SYSTEM_PROMPT == (DATA / "dbrx_default_system_prompt.txt").read_text(encoding="utf-8")
    assert len(DEFAULT_SYSTEM_PROMPT) == 1040
    assert len(Tokenizer().encode(DEFAULT_SYSTEM_PROMPT)) == 211


CONVERSATIONS = [
    [{"role": "user", "content": "What is DBRX?"}],
    [{"role": "system", "content": "  You are terse.  "}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "and 3+3?\n"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    [{"role": "system", "content": "only a system message"}],
]


def test_transformers_renders_the_same_chat(tok, hf_tok):
    assert hf_tok.chat_template == CHAT_TEMPLATE
    for conv in CONVERSATIONS:
        for gen in (True, False):
            want = tok.render_chat(conv, add_generation_prompt=gen)
            assert hf_tok.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False) == want
            out = hf_tok.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True)
            hf_ids = out["input_ids"] if hasattr(out, "keys") else out  # transformers 5 returns a BatchEncoding
            assert list(hf_ids) == tok.apply_chat_template(conv, add_generation_prompt=gen)


def test_transformers_encodes_identically(tok, hf_tok):
    stdlib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:60]]
    texts += [
        "héllo wörld 你好 🚀 naïve café\n\n\n  \t x", "  leading spaces", "trailing   ", "a\r\nb\rc", "I'M 'll 'VE 's",
        "12345678 1.5e10 3,141", "<|im_start|>user\nhi<|im_end|>", "\u00a0nbsp\u2003em", " \n \n", "x  \n  y",
        "<|endoftext|><|pad|><|fim_prefix|>", "tabs\t\tand\u200bzero-width", "Ελληνικά русский عربى हिन्दी",
    ]
    assert sum(len(t) for t in texts) > 500_000
    for text in texts:
        ids = tok.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids, text[:80]
        assert hf_tok.decode(ids) == tok.decode(ids)
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id, hf_tok.bos_token_id) == (100257, 100277, 100257)
