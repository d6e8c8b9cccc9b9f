"""Model cards (README.md) for distilled drafts, written from what the trainer and the evaluation recorded.

write_card: after training: the exact command, teacher, data (files, rows, temperatures), recipe, steps, and the
    expected acceptance on held-out rows before and after training.
add_measured: after `tempspec-train eval --update-cards`: a table of measured alpha and speedup per decoding
    temperature (replacing an earlier one).
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

from tempspec_engine.models.draft_checkpoint import read_draft_info, weights_path
from tempspec_engine.models.feature_draft import is_feature_draft_dir, read_feature_draft_info
from tempspec_trainer.data import read_rows

CARD = "README.md"
MEASURED = "## Measured by decoding"


def _size_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.iterdir() if f.is_file()) / 2**20


def _data_summary(paths) -> list:
    lines = []
    for p in paths:
        if not Path(p).exists():
            lines.append(f"- `{Path(p).name}`: no longer at {p} when this card was written")
            continue
        rows = read_rows(p)
        temps = sorted({r.get("temperature") for r in rows})
        sources = sorted({Path(r.get("source", "?")).name for r in rows})
        tokens = sum(len(r.get("response_ids", [])) for r in rows)
        generator = rows[0].get("generator", "?") if rows else "?"
        origin = (f"the own responses of {', '.join(sources)} (fixed data)" if generator == "data" else
                  f"sampled at T={temps} from prompts of {', '.join(sources)} by {generator}")
        lines.append(f"- `{Path(p).name}`: {len(rows)} rows, {tokens} response tokens, {origin}")
    return lines


def _at_tau(recipe: dict) -> str:
    """'at tau_kd = 1', or 'on the temperature mixture tau_kd in {0, 0.5, 1}' for a recipe with a tau_mix."""
    if recipe.get("tau_mix"):
        return "on the temperature mixture tau_kd in {" + ", ".join(f"{t:g}" for t in recipe["tau_mix"]) + "}"
    return f"at tau_kd = {recipe['tau_kd']:g}"


def _divergence(recipe: dict) -> str:
    """'fkl', 'fkl averaged over them' for a temperature mixture, or 'cross-entropy on the data' offline."""
    if recipe.get("mode") == "offline":
        return "cross-entropy on the data"
    return recipe["divergence"] + (" averaged over them" if recipe.get("tau_mix") else "")


def _stage_line(number: int, stage: dict) -> str:
    """One earlier training stage of a warm-started head, from its recorded recipe."""
    r = stage.get("recipe") or {}
    if not r:
        return f"{number}. (no recipe recorded)"
    data = ", ".join(f"`{Path(d).name}`" for d in r.get("data", []))
    return (f"{number}. from `{r.get('init')}`: {stage.get('step')} steps of {_divergence(r)} {_at_tau(r)} "
            f"({r.get('mode')}), lr {r.get('lr'):g}, {r.get('batch_size')} x {r.get('grad_accum')} sequences of <= "
            f"{r.get('seq_len')} tokens, on {data}")


def write_card(directory, command: Optional[str] = None) -> Path:
    """Writes <directory>/README.md from its tempspec_draft.json (recipe and training history)."""
    directory = Path(directory)
    feature = is_feature_draft_dir(directory)
    info = read_feature_draft_info(directory) if feature else read_draft_info(directory)
    meta, cfg = info["metadata"], info["config"]
    recipe = meta["recipe"]
    command = command or " ".join(shlex.quote(a) for a in ["tempspec-train"] + sys.argv[1:])
    hist = [h for h in meta.get("history", []) if any(k.startswith("alpha@") for k in h)]
    if feature:
        vocab = cfg.get("draft_vocab")
        intro = [f"# tempspec feature draft head (EAGLE-style): {recipe['mode']} KD {_at_tau(recipe)} "
                 f"({_divergence(recipe)})", "",
                 f"A {cfg['n_layers']}-layer feature head (width {cfg['dim']}, MLP {cfg['intermediate_size']}) for "
                 f"`{info['target']['name']}`, distilled by tempspec_trainer. It is not a standalone model: it reads "
                 "the target's final hidden states (after the final norm)"
                 + (f" fused with the outputs of its blocks {', '.join(map(str, cfg['taps']))} (EAGLE-3's multi-level "
                    "features)" if cfg.get("taps") else "")
                 + " and the next token's embedding, predicts "
                 "the next hidden state, and the target's own output head turns that into the draft distribution. It "
                 "shares the target's token embeddings and output head (not stored here), so it loads only together "
                 "with that target (tempspec_engine.models.feature_draft.load_feature_draft). "
                 + (f"Its head covers a draft vocabulary of {vocab} token ids (token map `d2t` in "
                    f"{weights_path(directory).name}); the others get probability 0. " if vocab else "")
                 + f"Files: {_size_mb(directory):.1f} MB.", ""]
    else:
        intro = [f"# tempspec draft: {recipe['mode']} KD {_at_tau(recipe)} ({_divergence(recipe)})",
                 "", f"A {cfg['n_layers']}-layer draft (width {cfg['dim']}, MLP {cfg['intermediate_size']}) for "
                 f"`{info['target']['name']}`, distilled by tempspec_trainer. "
                 + ("It shares the target's token embeddings and output head (not stored here), so it loads only "
                    "together with that target. " if info["shares_target_embeddings"] else "")
                 + f"Files: {_size_mb(directory):.1f} MB.", ""]
    lines = intro + [
             "## How it was made", "", "```bash", command, "```", "",
             f"- teacher: `{meta.get('teacher', info['target']['name'])}`; initialization: `{recipe['init']}`",
             f"- {meta['step']} optimizer steps of {recipe['batch_size']} x {recipe['grad_accum']} sequences"
             + (f" x {meta['world_size']} processes" if meta.get("world_size", 1) > 1 else "") + " "
             f"(<= {recipe['seq_len']} tokens), AdamW lr {recipe['lr']:g}, warmup {recipe['warmup_steps']}, cosine to "
             f"{recipe['min_lr_ratio']:g}x, precision {recipe['precision']}, seed {recipe['seed']}",
             "- data:"] + ["  " + line for line in _data_summary(recipe["data"])]
    if feature:
        token_loss = "the cross-entropy of the data's tokens" if recipe.get("mode") == "offline" else \
            "the divergence on the token distributions"
        lines.insert(len(intro) + 8, f"- feature head loss: {token_loss} + "
                     f"{recipe.get('feature_weight', 0.1):g} x smooth L1 on the predicted features, averaged over "
                     f"{recipe.get('unroll', 1)} unrolled steps (step j > 1 feeds the head its own predictions)"
                     + (f", with U(-{recipe['feature_noise']:g}, {recipe['feature_noise']:g}) noise on the target's "
                        "features it reads" if recipe.get("feature_noise", 0) > 0 else ""))
    lineage = meta.get("lineage") or []
    if lineage:
        lines += ["", f"It continues {len(lineage)} earlier training stage{'s' if len(lineage) > 1 else ''} "
                      "(oldest first; the run above follows them):", ""]
        lines += [_stage_line(i + 1, st) for i, st in enumerate(lineage)]
    if hist:
        temps = [k for k in hist[0] if k.startswith("alpha@")]
        first = " at the first draft position (the target's features, teacher-forced)" if feature else ""
        lines += ["", f"## Expected acceptance on {meta.get('eval_rows_held_out', recipe['eval_rows'])} held-out rows (1 - TVD; argmax agreement at "
                      f"T = 0){first}", "", "| step | " + " | ".join(t.replace("alpha@", "T=") for t in temps) + " |",
                  "| --- |" + " --- |" * len(temps)]
        for h in (hist[0], hist[-1]):
            lines.append(f"| {h['step']} | " + " | ".join(f"{h[t]:.3f}" for t in temps) + " |")
    (directory / CARD).write_text("\n".join(lines) + "\n")
    return directory / CARD


def add_measured(directory, results: dict, source: str) -> Path:
    """Adds (or replaces) the measured table of this draft from a run_sweep results dict."""
    directory = Path(directory)
    card = directory / CARD
    text = card.read_text() if card.exists() else ""
    text = text.split(MEASURED)[0].rstrip() + "\n\n"
    meta = results["meta"]
    rows = [r for r in results["results"] if Path(r["draft"]).resolve() == directory.resolve()]
    base = {b["temperature"]: b for b in results["baseline"]}
    lines = [MEASURED, "",
             f"{meta.get('n_prompts')} prompts of `{meta.get('prompts_file', '?')}` (not used in training), "
             f"{meta.get('max_new_tokens')} new tokens, batch {meta.get('batch_size')}, k {meta.get('k')}, "
             f"{str(meta.get('dtype')).replace('torch.', '')} on {meta.get('device_name', meta.get('device'))}; "
             f"results: `{source}`.", "",
             "| decoding T | alpha | accepted / step | SD tokens/s | target tokens/s | speedup |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        b = base.get(r["temperature"], {})
        lines.append(f"| {r['temperature']:g} | {r['alpha']:.3f} | {r['mean_accepted']:.2f} | "
                     f"{r['sd_tokens_per_s']:.1f} | {b.get('tokens_per_s') or 0:.1f} | {r['speedup']:.2f} |")
    card.write_text(text + "\n".join(lines) + "\n")
    return card
