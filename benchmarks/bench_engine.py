"""Engine benchmark: target-only vs tempspec SD vs Hugging Face assisted generation, same machine, one run.

For each temperature, on N prompts evenly spaced over a Spec-Bench style JSONL file (first user turn, chat template):
  target_only   SpeculativeEngine(speculative=False): the target alone, same code and sampler
  tempspec_sd[<draft>]   SpeculativeEngine with each draft of --drafts (k adaptive unless --k)
  hf_assisted[<draft>]   transformers generate with the same draft, batch 1 only: assistant_model= (its settings
                on the draft's generation_config) for a layer-subset or trained draft, prompt_lookup_num_tokens= for
                "lookup" (none for a lookup+model hybrid: HF has no such mode); and hf_target_only (plain generate);
                unless --no-hf
Each row reports tokens/s (generated tokens over wall seconds of the whole set), alpha and mean accepted drafts per
step, and the speedup over target_only at the same batch size; draft_time_s / target_time_s follow the one timing
rule of tempspec_engine/measure.py (each engine step once). The engine's rows also report prefill_time_s (the prompts
through every model, each prefill once), decode_tokens_per_s (tokens over the wall seconds outside prefill) and
decode_speedup_vs_target_only: prefill is nearly the same work with or without a draft (a model draft or feature head
also reads the prompts), so with short answers it bounds the end-to-end speedup, and the decode speedup is what
speculation itself gained (the draft's prompt pass left out, as prefill; the end-to-end speedup counts it).

Generation settings beyond temperature (tempspec_engine/sampling.py): --settings runs every method under each preset
(e.g. "none;top_p=0.9;top_k=50": the filters apply to the target and, in tempspec, to the draft);
--compare-draft-filter adds tempspec_sd[<draft>]/target-only, the serving engines' way (draft unfiltered, target
filtered); --variants "alternatives=0,confidence_stop=0;alternatives=0" adds tempspec_sd[<draft>]/<variant> for each
draft with a model (with device_loop, every draft), the same draft with those SpeculativeEngine settings
(alternatives: tokens the target also reads per draft position; confidence_stop 0: k chosen before drafting instead
of after each draft; verify_slope: the cost model's price of each more verified token, adaptive_k.py; k_min 1: a
draft in every step; engine.py); a
variant with device_loop=1,k=K (optionally sync_every=N, compile_step=1) decodes
through the device loop (tempspec_engine/device_loop.py) and also adds target_only/<variant>, the target alone
through it (measured even when the variant's drafting fails its warm-up); its rows report
the loop's steps, host reads and, on CUDA, the device time of one captured step and the host overhead (the share of
the steps' wall time the device was not stepping) and speedup_vs_device_loop_target_only;
--lenience 1,0.8,0.5,0.3 adds tempspec_sd[<draft>]@<eps> (lossy acceptance) and scores every tempspec method's
text by its mean negative log-likelihood per token under the target at T=1 ("target_nll", lower is closer to the
target's own preferences), the quality side of the lenience trade-off.

  CPU:  python benchmarks/bench_engine.py --prompts ../shared/data/spec_bench_question.jsonl \
            --out benchmarks/results/engine_cpu.json
  CUDA: python benchmarks/bench_engine.py --prompts ... --device cuda --batch-sizes 1,8,32 --n-prompts 32 \
            --out benchmarks/results/engine_cuda.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tempspec_engine.checks import LENIENCE  # noqa: E402
from tempspec_engine.cli_args import lookahead, positive_int  # noqa: E402
from tempspec_engine.cli_errors import OneLineParser, add_debug_flag, run_command  # noqa: E402
from tempspec_engine.engine import ALTERNATIVES, SpeculativeEngine  # noqa: E402
from tempspec_engine.measure import (acceptance_by_position, add_figures, alpha_se, decode_seconds,  # noqa: E402
                                     sync_device, timed_generate)
from tempspec_engine.models.draft import DEFAULT_DRAFT  # noqa: E402
from tempspec_engine.models.feature_draft import FeatureDraft  # noqa: E402
from tempspec_engine.models.llama import Transformer  # noqa: E402
from tempspec_engine.models.loading import load_default_target, resolve_device, resolve_dtype  # noqa: E402
from tempspec_engine.prompts import read_prompts  # noqa: E402
from tempspec_engine.results import RUNS_DIR, check_output_path, fresh_results_path, write_json  # noqa: E402
from tempspec_engine.run_meta import collect_meta, nvidia_driver  # noqa: E402
from tempspec_engine.sampling import filters_label, parse_filters  # noqa: E402
from tempspec_engine.threads import set_threads  # noqa: E402


def to_hf_llama(model):
    """A transformers LlamaForCausalLM with the same weights as our Transformer (a layer-subset draft included)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.intermediate_size,
                      num_hidden_layers=model.n_layers, num_attention_heads=c.n_heads,
                      num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_eps,
                      rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
                      max_position_embeddings=c.max_position, bos_token_id=None, eos_token_id=None)
    p = model.embed_tokens.weight
    hf = LlamaForCausalLM(cfg).to(device=p.device, dtype=p.dtype).eval()
    state = {"model." + k: v for k, v in model.state_dict().items()}
    if model.lm_head is not None:
        state["lm_head.weight"] = state.pop("model.lm_head.weight")
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in m or m == "lm_head.weight" for m in missing), (missing, unexpected)
    return hf


@torch.inference_mode()
def hf_counterparts(engines: dict) -> tuple:
    """What transformers can run of each tempspec method {"tempspec_sd[<draft>]": engine}: ({"hf_assisted[<draft>]":
    "lookup" (prompt lookup) or the draft's Transformer (an assistant model)}, {draft: why transformers cannot run
    it})."""
    runnable, not_run = {}, {}
    for name, engine in engines.items():
        d = name[len("tempspec_sd["):-1]
        model = engine.draft.model
        if engine.lookup is not None and engine.draft_model is not None:
            not_run[d] = "transformers has no lookup-then-model hybrid"
        elif engine.lookup is not None:
            runnable[f"hf_assisted[{d}]"] = "lookup"
        elif isinstance(model, FeatureDraft):
            not_run[d] = ("an EAGLE-style head reads the target's hidden states; transformers' assisted generation "
                          "takes a standalone causal LM as the assistant")
        elif isinstance(model, Transformer) and model.vocab_limit is None:  # layer subsets and trained drafts
            runnable[f"hf_assisted[{d}]"] = model
        else:
            not_run[d] = "a restricted draft vocabulary (/vocab:N) has no transformers counterpart"
    return runnable, not_run


def target_nll(model, prompt_ids, outputs) -> float:
    """Summed negative log-likelihood of the generated tokens under the target at T=1 (teacher-forced)."""
    total = 0.0
    for ids, o in zip(prompt_ids, outputs):
        if not o.token_ids:
            continue
        seq = torch.tensor([list(ids) + list(o.token_ids)], device=next(model.parameters()).device)
        logits = model(seq, torch.arange(seq.shape[1], device=seq.device).unsqueeze(0), None).float()
        logp = torch.log_softmax(logits[0, len(ids) - 1:-1], dim=-1)
        total -= float(logp.gather(-1, seq[0, len(ids):].unsqueeze(-1)).sum())
    return total


def run_engine(engine, prompts, temperature, max_new, batch, speculative, seed, sampling=None,
               score=None) -> dict:
    """Raw sums for one chunk of prompts through the engine, timed by tempspec_engine/measure.py (`sampling`:
    generate()'s filter keywords; `score`: the target model, to add the summed target_nll of the outputs)."""
    outs, figures = timed_generate(engine, prompts, temperature, max_new, speculative=speculative, batch_size=batch,
                                   seed=seed, **(sampling or {}))
    extra = {"nll": target_nll(score, prompts, outs)} if score is not None else {}
    return {**extra, **figures}


def run_hf(hf_target, hf_draft, prompt_ids, temperature, max_new, eos_ids, k, settings=None) -> dict:
    """transformers generate at batch 1: plain (hf_draft None), prompt lookup (hf_draft "lookup") or assisted, with
    HF's own top_k / top_p / min_p warpers for `settings`. HF does not expose accepted counts."""
    device = next(hf_target.parameters()).device
    settings = settings or {}
    kwargs = dict(max_new_tokens=max_new, do_sample=temperature > 0, eos_token_id=list(eos_ids),
                  pad_token_id=eos_ids[0], top_k=settings.get("top_k", 0), top_p=settings.get("top_p", 1.0),
                  min_p=settings.get("min_p"))
    if temperature > 0:
        kwargs["temperature"] = temperature
    if isinstance(hf_draft, str):
        kwargs["prompt_lookup_num_tokens"] = k
        kwargs["max_matching_ngram_size"] = 3
    elif hf_draft is not None:
        hf_draft.generation_config.num_assistant_tokens = k
        hf_draft.generation_config.num_assistant_tokens_schedule = "heuristic"
        kwargs["assistant_model"] = hf_draft
    tokens = 0
    sync_device(device)
    t0 = time.perf_counter()
    for ids in prompt_ids:
        x = torch.tensor([ids], device=device)
        out = hf_target.generate(x, attention_mask=torch.ones_like(x), **kwargs)
        tokens += out.shape[1] - x.shape[1]
    sync_device(device)
    return {"tokens": tokens, "seconds": time.perf_counter() - t0}


def summarize(sums: dict, speculative: bool) -> dict:
    """tokens/s over the whole set, alpha (accepted / (accepted + rejections)) with its standard error alpha_se
    (clustered by prompt: measure.alpha_se), accepted drafts per step, and (speculative) the acceptance per draft
    position with its raw counts; for the engine's rows also prefill_time_s and decode_tokens_per_s (tokens over the
    wall seconds outside prefill: tempspec_engine/measure.py)."""
    out = {"tokens": sums["tokens"], "seconds": sums["seconds"], "tokens_per_s": sums["tokens"] / sums["seconds"]}
    decode = decode_seconds(sums)
    if decode is not None:
        out.update(prefill_time_s=sums["prefill_time_s"], decode_tokens_per_s=sums["tokens"] / decode)
    if "nll" in sums:
        out["target_nll"] = sums["nll"] / max(sums["tokens"], 1)
    if "steps" in sums:
        n = sums["accepted"] + sums["rejections"]
        out.update(alpha=sums["accepted"] / n if speculative and n else None,
                   alpha_se=alpha_se(sums["accepted"], sums["rejections"], sums.get("by_request"))
                   if speculative else None,
                   mean_accepted=sums["accepted"] / sums["steps"] if speculative else None,
                   tokens_per_step=sums["tokens"] / sums["steps"], draft_time_s=sums["draft_time_s"],
                   target_time_s=sums["target_time_s"])
        if speculative:  # where the proposals came from (lookup drafts), and steps without any
            out.update(lookup_step_share=sums["lookup_steps"] / sums["steps"],
                       plain_step_share=sums["plain_steps"] / sums["steps"],
                       alternative_hit_share=sums["alternative_hits"] / sums["steps"])
            proposed, accepted = sums.get("position_proposed", []), sums.get("position_accepted", [])
            reached = sums.get("position_reached", [])
            out.update(acceptance_by_position=acceptance_by_position(accepted, proposed),
                       conditional_acceptance_by_position=acceptance_by_position(accepted, reached),
                       position_proposed=list(proposed), position_accepted=list(accepted),
                       position_reached=list(reached), by_request=sums.get("by_request", []))
    return out


def main(argv=None) -> int:
    ap = OneLineParser(prog="bench_engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True,
                    help="JSONL with `turns` (Spec-Bench), `question` or `instruction`; '-' with --prompt-ids")
    ap.add_argument("--n-prompts", type=positive_int, default=20, help="(default: %(default)s)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=64, help="(default: %(default)s)")
    ap.add_argument("--temperatures", default="0,0.5,1.0", help="comma list (default: %(default)s)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu, cuda or cuda:N (default: %(default)s)")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"], help="(default: %(default)s)")
    ap.add_argument("--drafts", default=f"{DEFAULT_DRAFT};layers:0-3",
                    help="';'-separated draft specs (models/draft.py; default: %(default)s)")
    ap.add_argument("--k", type=lookahead, default="auto", help="'auto' or a fixed lookahead (default: %(default)s)")
    ap.add_argument("--hf-k", type=positive_int, default=5,
                    help="num_assistant_tokens (heuristic schedule) / prompt_lookup_num_tokens for HF "
                         "(default: %(default)s)")
    ap.add_argument("--batch-sizes", default="1", help="comma list (default: %(default)s)")
    ap.add_argument("--settings", default="none",
                    help="';'-separated presets of filters, each none or KEY=VALUE,... with keys top_k, top_p, min_p "
                         "(default: %(default)s)")
    ap.add_argument("--compare-draft-filter", action="store_true",
                    help="also run each draft unfiltered with only the target filtered (the serving engines' way)")
    ap.add_argument("--variants", default="",
                    help="';'-separated engine settings to run each model draft with besides the defaults, each "
                         "KEY=VALUE,... with keys alternatives (int >= 0), confidence_stop (0 or 1), device_loop "
                         "(0 or 1; with k, an int, and optionally sync_every and compile_step, 0 or 1), verify_slope "
                         "(a number >= 0: the seeded cost model's slope per verified token), k_min (0 or 1: 1 drafts "
                         "in every step) (default: none)")
    ap.add_argument("--lenience", default="1",
                    help="comma list of leniences in (0, 1]; each below 1 adds lossy methods and target_nll scores "
                         "(default: %(default)s)")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baselines")
    ap.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    ap.add_argument("--max-len", type=int, default=0,
                    help="KV-cache length per request (default: 0, the longest prompt + max-new-tokens + lookahead)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="CUDA: eager forwards (static shapes kept)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: 0, the cores other processes leave free)")
    ap.add_argument("--out", default=None,
                    help=f"results JSON path (default: a new file {RUNS_DIR}/engine_<device>_<dtype>-<time>.json)")
    ap.add_argument("--dump-prompt-ids", default=None,
                    help="write the chat-templated prompt ids (JSON) for a machine without transformers, and exit")
    ap.add_argument("--prompt-ids", default=None,
                    help="read prompt ids written by --dump-prompt-ids (the first --n-prompts of them) (default: none)")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    return run_command("bench_engine", lambda: run(args), getattr(args, "debug", False))


VARIANT_KEYS = {"alternatives": int, "confidence_stop": lambda v: bool(int(v)), "device_loop": lambda v: bool(int(v)),
                "k": int, "sync_every": int, "compile_step": lambda v: bool(int(v)), "verify_slope": float,
                "k_min": int}


def parse_variants(text: str) -> dict:
    """--variants "alternatives=0,confidence_stop=0;alternatives=0" -> {label: SpeculativeEngine keywords}."""
    variants = {}
    for label in (v.strip() for v in text.split(";")):
        if not label:
            continue
        kw = {}
        for item in label.split(","):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in VARIANT_KEYS or not value.strip():
                raise ValueError(f"--variants {label!r}: expected KEY=VALUE with KEY one of {', '.join(VARIANT_KEYS)}")
            try:
                kw[key] = VARIANT_KEYS[key](value.strip())
            except ValueError:
                what = "a number" if VARIANT_KEYS[key] is float else "an integer"
                raise ValueError(f"--variants {label!r}: {key} needs {what}, got {value.strip()!r}") from None
        variants[label] = kw
    if any(kw.get("device_loop") and "k" not in kw for kw in variants.values()):
        raise ValueError("--variants: device_loop=1 needs a fixed k (e.g. device_loop=1,k=4)")
    return variants


def loop_figures(engine, sums: dict, batch: int, speculative: bool) -> dict:
    """A device-loop method's steps and their wall seconds; on CUDA also the device time of one captured step
    (replayed back to back) and the host overhead: the share of the steps' wall time the device was not stepping,
    1 - steps x step time / wall."""
    out = {key: sums[key] for key in ("loop_steps", "loop_wall_s", "loop_syncs")}
    if engine.cuda_graphs:
        step = engine.device_loop.step_seconds(batch, speculative)
        out.update(device_step_s=step, host_overhead=1.0 - step * sums["loop_steps"] / sums["loop_wall_s"])
    return out


def _numbers(flag: str, text: str, cast) -> list:
    try:
        return [cast(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected a comma list of numbers") from None


def run(args) -> int:
    set_threads(args.threads)
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    k = args.k
    temps = _numbers("--temperatures", args.temperatures, float)
    batches = _numbers("--batch-sizes", args.batch_sizes, int)
    presets = [parse_filters(p) for p in args.settings.split(";")]
    lossy = [LENIENCE.checked(e, " (--lenience)") for e in _numbers("--lenience", args.lenience, float) if e != 1]
    args.out = args.out or str(fresh_results_path(f"engine_{device.type}_{args.dtype}"))
    check_output_path(args.out)
    variants = parse_variants(args.variants)
    prompts = read_prompts(args.prompts, args.n_prompts) if args.prompts != "-" else None

    t0 = time.perf_counter()
    target = load_default_target(device, dtype)
    load_s = time.perf_counter() - t0
    drafts = [d for d in args.drafts.split(";") if d]
    encoder = SpeculativeEngine(target, "none", device, dtype, k=k)  # tokenizer, chat template, k_max; no caches
    if args.prompt_ids:
        with open(args.prompt_ids) as f:
            prompt_ids = json.load(f)[: args.n_prompts]
    else:
        prompt_ids = [encoder.encode(p, chat_template=True) for p in prompts]
    if args.dump_prompt_ids:
        with open(args.dump_prompt_ids, "w") as f:
            json.dump(prompt_ids, f)
        print(f"wrote {len(prompt_ids)} prompts to {args.dump_prompt_ids}")
        return 0
    prompts = prompt_ids  # the engine takes ids directly: same prompts for every method
    # KV-cache length: what the longest prompt needs (static shapes attend over the whole cache), in steps of 64; a
    # step may write k_max drafts and their alternatives beyond a row's tokens
    k_max = max([encoder.k_max] + [kw.get("k", 0) for kw in variants.values()])
    lookahead = k_max * (1 + max([ALTERNATIVES] + [kw.get("alternatives", 0) for kw in variants.values()]))
    max_len = args.max_len or -(-(max(map(len, prompts)) + args.max_new_tokens + lookahead + 1) // 64) * 64
    graphs = False if args.no_cuda_graphs else None

    def engine(draft, **kw):
        return SpeculativeEngine(target, draft, device, dtype, max_len=max_len, max_batch_size=max(batches),
                                 cuda_graphs=graphs, **{"k": k, **kw})

    engines = {f"tempspec_sd[{d}]": engine(d) for d in drafts}
    # each model draft again with other engine settings (a draft without a model has nothing they change, except the
    # device loop: n-gram lookup alone runs through it too)
    variant_engines = {f"{name}/{label}": engine(d, **kw) for name, d in zip(engines, drafts)
                       for label, kw in variants.items()
                       if engines[name].draft_model is not None or kw.get("device_loop")}
    variants_not_run = {f"{name}/{label}": "a draft without a model: the variant would change nothing"
                        for name in engines for label in variants if f"{name}/{label}" not in variant_engines}
    base = next(iter(engines.values()))
    hf_target, (hf_drafts, hf_not_run) = None, hf_counterparts(engines)  # recorded even under --no-hf
    if args.no_hf:
        hf_drafts = {}
    else:
        hf_target = to_hf_llama(target.model)
        hf_drafts = {name: m if isinstance(m, str) else to_hf_llama(m) for name, m in hf_drafts.items()}

    # Warm-up (allocations, lazy weight pages, CUDA kernels), not timed, the target alone first. A method that fails
    # here is reported and left out (meta "failed"), so that one that cannot run on this machine does not cost the
    # others their run; a device-loop variant whose drafting fails still runs the target alone through the loop.
    failed = {}
    loop_engines = {}  # device-loop variant label -> the first engine with it, which runs the target alone through it
    for name, eng in list(engines.items()) + list(variant_engines.items()):
        try:
            for batch in batches:  # also captures the CUDA graphs of each batch size
                eng.generate(prompts[:batch], 0.0, 8, batch_size=batch, speculative=False)
            if eng.device_loop is not None:
                loop_engines.setdefault(name.rpartition("/")[2], eng)
            for batch in batches:
                eng.generate(prompts[:batch], 0.0, 8, batch_size=batch)
        except Exception as exc:  # noqa: BLE001 (recorded with its message)
            if eng is base:
                raise
            failed[name] = f"{type(exc).__name__}: {exc}"
            print(f"left out {name}: {failed[name]}", flush=True)
            engines.pop(name, None)
            variant_engines.pop(name, None)
    rows = []

    # (collect_meta: the machine, torch_threads, versions, command line and date; on a CPU the kernels that run; its
    # loadavg is loadavg_before here)
    machine = {k: v for k, v in collect_meta(device).items() if k != "loadavg"}
    meta = {**machine, "device": str(device), "dtype": str(dtype),
            "target": target.name, "drafts": drafts, "k": args.k, "hf_num_assistant_tokens": args.hf_k,
            "hf_schedule": "heuristic", "prompts_file": os.path.basename(args.prompts), "n_prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens, "model_load_s": load_s, "seed": args.seed,
            "settings": args.settings, "lenience": args.lenience,
            "confidence_stop": base.confidence_stop, "alternatives": {n: e.alternatives for n, e in engines.items()},
            "variants": args.variants, "variants_not_run": variants_not_run,
            "loadavg_before": os.getloadavg(), "max_len": max_len, "cuda_graphs": base.cuda_graphs,
            "hf_not_run": hf_not_run, "failed": failed, "complete": False}
    if device.type == "cuda":
        meta.update(driver=nvidia_driver())

    def write():
        """The JSON so far, atomically: a run cut short keeps every finished row."""
        write_json({"meta": meta, "results": rows}, args.out)

    def record(method, T, batch, res):
        # batch: the width asked for; batch_width: the rows decoded at once (no more than the prompts)
        res.update(method=method, temperature=T, batch=batch, batch_width=base.batch_width(len(prompts), batch))
        rows.append(res)
        print(json.dumps({k_: (round(v, 3) if isinstance(v, float) else
                               [round(x, 3) if isinstance(x, float) else x for x in v] if isinstance(v, list) else v)
                          for k_, v in res.items()}), flush=True)
        write()

    # Methods are interleaved chunk by chunk (a chunk: one batch of prompts), so that load from other processes
    # on a shared machine falls on every method alike.
    score = target.model if lossy else None
    for preset in presets:
        label = filters_label(preset)
        for T in temps:
            for batch in batches:
                def tempspec(eng, sampling, b=batch):
                    return lambda c: run_engine(eng, c, T, args.max_new_tokens, b, True, args.seed, sampling, score)

                methods = [("target_only", lambda c, b=batch: run_engine(base, c, T, args.max_new_tokens, b, False,
                                                                          args.seed, preset, score), False)]
                # the target alone through each device-loop variant (one per variant label)
                for variant, eng in loop_engines.items():
                    methods.append((f"target_only/{variant}", lambda c, e=eng, b=batch: run_engine(
                        e, c, T, args.max_new_tokens, b, False, args.seed, preset, score), False))
                for name, eng in engines.items():
                    methods.append((name, tempspec(eng, preset), True))
                    methods += [(v, tempspec(e, preset), True) for v, e in variant_engines.items()
                                if v.startswith(name + "/")]
                    if args.compare_draft_filter and preset:
                        methods.append((name + "/target-only", tempspec(eng, {**preset, "filter_draft": False}), True))
                    for eps in lossy:
                        methods.append((f"{name}@{eps:g}", tempspec(eng, {**preset, "lenience": eps}), True))
                if batch == 1 and hf_target is not None:
                    for name, draft in [("hf_target_only", None)] + list(hf_drafts.items()):
                        methods.append((name, lambda c, d=draft: run_hf(hf_target, d, c, T, args.max_new_tokens,
                                                                        target.eos_ids, args.hf_k, preset), False))
                # a captured device-loop step is captured again when the settings' kernels change (a filter at T > 0
                # and not at T = 0): here, untimed, rather than in the first timed chunk
                for e in [e for e in variant_engines.values() if e.device_loop is not None and e.cuda_graphs]:
                    for speculative in (False, True):
                        e.generate(prompts[:batch], T, 2, batch_size=batch, speculative=speculative, seed=args.seed,
                                   **preset)
                sums = {name: {} for name, _, _ in methods}
                for start in range(0, len(prompts), batch):
                    chunk = prompts[start:start + batch]
                    for name, fn, _ in methods:
                        add_figures(sums[name], fn(chunk))  # numbers summed, per-position lists elementwise
                ar = summarize(sums["target_only"], False)
                for name, _, speculative in methods:
                    res = summarize(sums[name], speculative)
                    res["speedup_vs_target_only"] = res["tokens_per_s"] / ar["tokens_per_s"]
                    if "decode_tokens_per_s" in res:  # the same, prefill left out of both
                        res["decode_speedup_vs_target_only"] = res["decode_tokens_per_s"] / ar["decode_tokens_per_s"]
                    variant = name.rpartition("/")[2]
                    if variant in loop_engines:  # the engine that ran this row
                        eng = variant_engines.get(name, loop_engines[variant])
                        res.update(loop_figures(eng, sums[name], batch, speculative))
                        res["speedup_vs_device_loop_target_only"] = (
                            res["tokens_per_s"] / summarize(sums[f"target_only/{variant}"], False)["tokens_per_s"])
                    res["settings"] = label
                    record(name, T, batch, res)

    meta.update(loadavg_after=os.getloadavg(), complete=True)
    write()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
