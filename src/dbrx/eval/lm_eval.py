"""lm-evaluation-harness interop: our model as lm-eval's model type `dbrx` (the `eval` extra,
`pip install -e '.[eval]'`; nothing else in dbrx imports this module or lm_eval).

    python -m dbrx.eval.lm_eval --model dbrx --model_args pretrained=runs/demo/hf --batch_size 8 --tasks arc_easy

is lm-eval's own command line with this module imported (lm-eval finds a model type only once the module that
registers it is imported, so a plain `lm_eval --model dbrx` does not know the name). From Python: import this
module, then `lm_eval.simple_evaluate(model="dbrx", model_args="pretrained=DIR", ...)`.

model_args: pretrained (a checkpoint directory), dtype (float32 by default; auto measures what is fastest here),
max_length (the model's max_seq_len), max_gen_toks (256); batch_size (rows per forward, 8) and device (CUDA when
available, else the CPU), which lm-eval's command line passes from its own --batch_size and --device.

The requests are answered as lm-eval's `hf` model answers them on the same checkpoint, so the numbers are the
same (a test holds them to 1e-5 in float32):
- loglikelihood: context and continuation encoded whole and split after the context's tokens, the context's
  trailing spaces moved into the continuation; an empty context becomes <|endoftext|>; a pair longer than
  max_length + 1 tokens is cut from the left. Scored by dbrx.eval.scoring (a question's shared context once, the
  vocabulary head only where a continuation token is predicted), where lm-eval runs each choice separately.
- loglikelihood_rolling: lm-eval's own non-overlapping windows of max_length predicted tokens, each with as much
  context as fits, the first one after <|endoftext|>.
- generate_until: greedy, KV cache; the context cut from the left to max_length - max_gen_toks tokens; stops at
  <|endoftext|> or <|im_end|>, the text cut at the first of the `until` strings.
- apply_chat_template: DBRX's ChatML template (what transformers renders from the checkpoint's
  tokenizer_config.json), continuing the last message when lm-eval asks for no generation prompt.
"""

from __future__ import annotations

import difflib
import logging
from argparse import Namespace
from pathlib import Path

import lm_eval.models  # noqa: F401  lm-eval's own model names first: its registry loads them only while empty
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from dbrx.eval.scoring import Pair, Score, generate_texts, score_groups
from dbrx.tokenizer import CHAT_TEMPLATE, Tokenizer

log = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 8
MODEL_ARGS = ("pretrained", "dtype", "batch_size", "device", "max_length", "max_gen_toks", "max_batch_size")
# generation settings read as the hf model reads them under greedy decoding (top_k, top_p only shape sampling)
GENERATION_KWARGS = ("until", "max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens", "do_sample",
                     "temperature", "top_k", "top_p")
IM_END = "<|im_end|>"


@register_model("dbrx")
class DbrxLM(LM):
    def __init__(self, pretrained: str | None = None, dtype: str = "float32", batch_size: int | str | None = None,
                 device: str | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 max_batch_size: int | None = None, **unknown) -> None:
        super().__init__()
        for key in unknown:
            near = difflib.get_close_matches(key, MODEL_ARGS, n=1)
            raise ValueError(f"dbrx model_args: unknown argument '{key}'"
                             + (f"; did you mean '{near[0]}'?" if near else f" (known: {', '.join(MODEL_ARGS)})"))
        if pretrained is None:
            raise ValueError("dbrx model_args: pretrained=DIR (a checkpoint directory) is required")
        from dbrx.cli import _load_model  # --dtype's meanings, and the refusal of a model too big for memory

        self._device = _resolve_device(device)
        self.model = _load_model(Namespace(model=Path(pretrained), dtype=dtype, device=self._device)).eval()
        self.tokenizer = Tokenizer()
        self.pretrained = str(pretrained)
        self.batch_size = _parse_batch_size(batch_size)
        self.max_length = int(max_length or self.model.config.max_seq_len)
        if not 0 < self.max_length <= self.model.config.max_seq_len:
            raise ValueError(f"dbrx model_args: max_length {self.max_length} must be between 1 and the model's "
                             f"max_seq_len ({self.model.config.max_seq_len}, {Path(pretrained) / 'config.json'})")
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id  # <|endoftext|>, as the hf model reads it from tokenizer_config.json

    # ---- log-likelihood ---------------------------------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> Pair:
        """(context ids, continuation ids), split as lm-eval's hf model splits them: the whole text encoded once,
        so a token that spans the boundary counts as the continuation's."""
        encode = self.tokenizer.encode
        if context == "":
            cont = encode(continuation)
            return ([self.prefix_token_id], cont) if cont[:1] != [self.prefix_token_id] else (cont[:1], cont[1:])
        stripped = context.rstrip()
        context, continuation = stripped, context[len(stripped):] + continuation
        ctx = encode(context)
        return ctx, encode(context + continuation)[len(ctx):]

    def _fit(self, pair: Pair) -> Pair:
        """At most max_length + 1 tokens (max_length fed: the last one is only predicted), cut from the left."""
        ctx, cont = pair
        if len(cont) > self.max_length:
            raise ValueError(f"a continuation of {len(cont)} tokens is longer than max_length ({self.max_length})")
        return ctx[max(0, len(ctx) + len(cont) - self.max_length - 1):], cont

    def _score(self, pairs: list[Pair], disable_tqdm: bool, desc: str) -> list[Score]:
        """Scores of `pairs` in order; pairs with the same context (a question's choices) in one row."""
        groups: dict[tuple[int, ...], list[int]] = {}
        fitted = [self._fit(p) for p in pairs]
        cut = sum(len(a[0]) < len(b[0]) for a, b in zip(fitted, pairs))
        if cut:
            log.warning(f"{desc}: {cut} of {len(pairs)} requests were longer than max_length + 1 "
                        f"({self.max_length + 1}) tokens; their contexts were cut from the left")
        for i, (ctx, _) in enumerate(fitted):
            groups.setdefault(tuple(ctx), []).append(i)
        members = list(groups.values())
        with tqdm(total=len(members), desc=desc, disable=disable_tqdm) as bar:
            scores = score_groups(self.model, [[fitted[i] for i in m] for m in members], self.batch_size, bar.update)
        out = [None] * len(pairs)
        for m, group_scores in zip(members, scores):
            for i, score in zip(m, group_scores):
                out[i] = score
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        return [(s.logprob, s.greedy) for s in self._score(pairs, disable_tqdm, "dbrx loglikelihood")]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for r, req in enumerate(requests):
            tokens = self.tokenizer.encode(req.args[0])
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, score in zip(owner, self._score(windows, disable_tqdm, "dbrx loglikelihood_rolling")):
            totals[r] += score.logprob
        return totals

    # ---- generation -------------------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        by_settings: dict[str, list[int]] = {}  # one call per distinct generation settings
        for i, req in enumerate(requests):
            by_settings.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out = [""] * len(requests)
        eos_text = self.tokenizer.decode([self.eot_token_id])
        with tqdm(total=len(requests), desc="dbrx generate_until", disable=disable_tqdm) as bar:
            for indices in by_settings.values():
                until, max_new = _greedy_settings(requests[indices[0]].args[1], self.max_gen_toks)
                until += [eos_text] if eos_text not in until else []
                room = self.max_length - max_new
                if room <= 0:
                    raise ValueError(f"max_gen_toks {max_new} leaves no room for a context in max_length "
                                     f"{self.max_length}")
                prompts = [(self.tokenizer.encode(requests[i].args[0]) or [self.prefix_token_id])[-room:]
                           for i in indices]
                texts = generate_texts(self.model, self.tokenizer, prompts, max_new, self.batch_size, until,
                                       self.tokenizer.stop_token_ids, progress=bar.update)
                for i, text in zip(indices, texts):
                    out[i] = _cut_at_stops(text, until)
        return out

    # ---- chat -------------------------------------------------------------------------------------------------
    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Without a generation prompt, lm-eval wants the last message continued (an assistant prefix): its
        closing <|im_end|> is left off, as transformers' continue_final_message does."""
        text = self.tokenizer.render_chat(chat_history, add_generation_prompt)
        if not add_generation_prompt and text.endswith(IM_END):
            text = text[:-len(IM_END)]
        return text

    @property
    def tokenizer_name(self) -> str:
        return "dbrx-cl100k_base"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return CHAT_TEMPLATE if chat_template not in (False, None) else None

    def get_model_info(self) -> dict:
        param = next(self.model.parameters())
        return {"model_num_parameters": self.model.num_parameters(), "model_dtype": str(param.dtype),
                "pretrained": self.pretrained}


MULTIPLE_CHOICE_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
{cache}test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_multiple_choice_task(directory: str | Path, name: str, data: str | Path,
                               cache_dir: str | Path | None = None) -> Path:
    """An lm-eval task YAML in `directory` (for `--include_path DIRECTORY --tasks NAME`, or lm-eval's
    TaskManager(include_path=...)) that reads a local JSONL of Foundry's multiple_choice rows (query, choices,
    gold) 0-shot, scored by acc and acc_norm; `cache_dir`: where `datasets` keeps its copy."""
    path = Path(directory) / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = f"  cache_dir: {cache_dir}\n" if cache_dir is not None else ""
    path.write_text(MULTIPLE_CHOICE_TASK.format(name=name, data=Path(data).resolve(), cache=cache))
    return path


def _resolve_device(device: str | None) -> str:
    """As the hf model does: CUDA when available unless told otherwise; lm-eval's command line asks for cuda:0 by
    default, which means the CPU on a machine without CUDA."""
    if device is None or (torch.device(device).type == "cuda" and not torch.cuda.is_available()):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _parse_batch_size(value) -> int:
    """An integer; lm-eval's `auto` (find the largest that fits) means our default: rows are not padded to
    max_length, so a batch's memory is small."""
    if value is None or str(value).startswith("auto"):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"dbrx model_args: batch_size must be a positive integer or auto, got {value!r}") from None
    if size <= 0:
        raise ValueError(f"dbrx model_args: batch_size must be a positive integer or auto, got {value!r}")
    return size


def _greedy_settings(settings: dict, default_max_gen_toks: int) -> tuple[list[str], int]:
    """(until, max_gen_toks) of a request's generation settings, read as lm-eval reads them; sampling and settings
    that greedy decoding cannot honour are refused by name."""
    unknown = [k for k in settings if k not in GENERATION_KWARGS]
    if unknown:
        raise ValueError(f"dbrx generate_until: generation setting(s) {', '.join(map(repr, unknown))} not supported "
                         f"(supported: {', '.join(GENERATION_KWARGS)})")
    kwargs = normalize_gen_kwargs(settings, default_max_gen_toks)
    if kwargs["do_sample"]:
        raise ValueError(f"dbrx generate_until: sampling (do_sample={settings.get('do_sample')!r}, temperature="
                         f"{settings.get('temperature')!r}) is not supported: generation is greedy")
    return list(kwargs["until"]), kwargs["max_gen_toks"]


def _cut_at_stops(text: str, stops: list[str]) -> str:
    """The text before the first occurrence of each stop string in turn, as lm-eval post-processes generations."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
