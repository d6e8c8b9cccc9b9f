"""Engine benchmark: target-only vs tempspec SD vs Hugging Face assisted generation, same machine, one run.

For each temperature, on the first N prompts of a Spec-Bench style JSONL file (first user turn, chat template):
  target_only   SpeculativeEngine(speculative=False): the target alone, same code and sampler
  tempspec_sd   SpeculativeEngine with the given draft (k adaptive unless --k)
  tempspec_sd_same_draft   tempspec with exactly the draft given to HF (no vocab restriction), when it differs
  hf_assisted   transformers generate(assistant_model=...) with that draft (batch 1 only; its settings on the
                draft's generation_config), and hf_target_only (plain generate), unless --no-hf
Each row reports tokens/s (generated tokens over wall seconds of the whole set), alpha and mean accepted drafts per
step, and the speedup over target_only at the same batch size.

  CPU:  python benchmarks/bench_engine.py --prompts ../shared/data/spec_bench_question.jsonl \
            --out benchmarks/results/engine_cpu.json
  CUDA: python benchmarks/bench_engine.py --prompts ... --device cuda --batch-sizes 1,8,32 --n-prompts 32 \
            --out benchmarks/results/engine_cuda.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tempspec_engine.engine import SpeculativeEngine  # noqa: E402
from tempspec_engine.models.draft import DEFAULT_DRAFT, make_draft  # noqa: E402
from tempspec_engine.models.loading import load_default_target, resolve_dtype  # noqa: E402


def read_prompts(path: str, n: int) -> list:
    out = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            out.append(row["turns"][0] if "turns" in row else row.get("question") or row["instruction"])
            if len(out) == n:
                break
    return out


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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_engine(engine, prompts, temperature, max_new, batch, speculative, seed):
    _sync(engine.device)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, temperature, max_new, chat_template=True, speculative=speculative,
                           batch_size=batch, seed=seed)
    _sync(engine.device)
    seconds = time.perf_counter() - t0
    tokens = sum(o.stats.new_tokens for o in outs)
    steps = sum(o.stats.steps for o in outs)
    acc = sum(o.stats.accepted for o in outs)
    rej = sum(o.stats.rejections for o in outs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "alpha": acc / (acc + rej) if speculative and acc + rej else None,
            "mean_accepted": acc / steps if speculative else None,
            "tokens_per_step": tokens / steps,
            "draft_time_s": sum(o.stats.draft_time_s for o in outs) / max(1, batch),
            "target_time_s": sum(o.stats.target_time_s for o in outs) / max(1, batch)}


def run_hf(hf_target, hf_draft, tokenizer, prompt_ids, temperature, max_new, eos_ids, k):
    """transformers generate at batch 1, plain or assisted; alpha and accepted counts are not exposed by HF."""
    device = next(hf_target.parameters()).device
    if hf_draft is not None:
        hf_draft.generation_config.num_assistant_tokens = k
        hf_draft.generation_config.num_assistant_tokens_schedule = "heuristic"
    kwargs = dict(max_new_tokens=max_new, do_sample=temperature > 0, eos_token_id=list(eos_ids),
                  pad_token_id=eos_ids[0], top_k=0, top_p=1.0)
    if temperature > 0:
        kwargs["temperature"] = temperature
    if hf_draft is not None:
        kwargs["assistant_model"] = hf_draft
    tokens = 0
    _sync(device)
    t0 = time.perf_counter()
    for ids in prompt_ids:
        x = torch.tensor([ids], device=device)
        out = hf_target.generate(x, attention_mask=torch.ones_like(x), **kwargs)
        tokens += out.shape[1] - x.shape[1]
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "alpha": None,
            "mean_accepted": None, "tokens_per_step": None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True, help="JSONL with `turns` (Spec-Bench), `question` or `instruction`")
    ap.add_argument("--n-prompts", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperatures", default="0,0.5,1.0")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--draft", default=DEFAULT_DRAFT, help="draft spec (models/draft.py)")
    ap.add_argument("--k", default="auto", help="'auto' or a fixed lookahead")
    ap.add_argument("--hf-k", type=int, default=5, help="num_assistant_tokens for HF assisted generation")
    ap.add_argument("--batch-sizes", default="1")
    ap.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baselines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", required=True, help="results JSON path")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), resolve_dtype(args.dtype)
    k = args.k if args.k == "auto" else int(args.k)
    temps = [float(t) for t in args.temperatures.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    prompts = read_prompts(args.prompts, args.n_prompts)

    t0 = time.perf_counter()
    target = load_default_target(device, dtype)
    load_s = time.perf_counter() - t0
    same_spec = args.draft.split("/vocab:")[0]
    engines = {"tempspec_sd": SpeculativeEngine(target, args.draft, device, dtype, k=k, max_len=1024,
                                                max_batch_size=max(batches))}
    if same_spec != args.draft and not args.no_hf:
        engines["tempspec_sd_same_draft"] = SpeculativeEngine(target, same_spec, device, dtype, k=k, max_len=1024,
                                                              max_batch_size=max(batches))
    base = engines["tempspec_sd"]
    prompt_ids = [base.encode(p, chat_template=True) for p in prompts]
    hf_target = hf_draft = None
    if not args.no_hf:
        hf_target = to_hf_llama(target.model)
        hf_draft = to_hf_llama(make_draft(same_spec, target, device, dtype).model)

    # Warm-up (allocations, lazy weight pages, CUDA kernels), not timed.
    for eng in engines.values():
        eng.generate(prompts[:2], 0.0, 8, chat_template=True, batch_size=1)
        eng.generate(prompts[:2], 0.0, 8, chat_template=True, batch_size=1, speculative=False)
    rows = []

    def record(method, T, batch, res):
        res.update(method=method, temperature=T, batch=batch)
        rows.append(res)
        print(json.dumps({k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in res.items()}), flush=True)

    for T in temps:
        for batch in batches:
            ar = run_engine(base, prompts, T, args.max_new_tokens, batch, False, args.seed)
            record("target_only", T, batch, ar)
            for name, eng in engines.items():
                res = run_engine(eng, prompts, T, args.max_new_tokens, batch, True, args.seed)
                res["speedup_vs_target_only"] = res["tokens_per_s"] / ar["tokens_per_s"]
                record(name, T, batch, res)
            if batch == 1 and hf_target is not None:
                for name, draft in (("hf_target_only", None), ("hf_assisted", hf_draft)):
                    res = run_hf(hf_target, draft, target.tokenizer, prompt_ids, T, args.max_new_tokens,
                                 target.eos_ids, args.hf_k)
                    res["speedup_vs_target_only"] = res["tokens_per_s"] / ar["tokens_per_s"]
                    record(name, T, batch, res)

    meta = {"device": str(device), "device_name": torch.cuda.get_device_name() if device.type == "cuda"
            else platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "dtype": str(dtype), "target": target.name, "draft": args.draft,
            "hf_draft": same_spec, "k": args.k, "hf_num_assistant_tokens": args.hf_k,
            "hf_schedule": "heuristic", "prompts_file": os.path.basename(args.prompts), "n_prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens, "model_load_s": load_s, "seed": args.seed}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".tmp", "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
