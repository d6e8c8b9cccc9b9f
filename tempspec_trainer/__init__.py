"""tempspec_trainer: temperature-matched distillation of speculative-decoding drafts.

Depends on tempspec_engine (models, generation); nothing in the engine imports the trainer.
  data.py         prompt files -> generated responses at a KD temperature (resumable JSONL), mixtures, on-policy
  divergences.py  FKL / RKL / JSD(beta) / TVD between softmax(target/tau) and softmax(draft/tau)
  draft_init.py   drafts from a subset of the target's layers or from a fresh small config
  train.py        the distillation loop (AdamW, warmup+cosine, accumulation, bf16 autocast, checkpoints, DDP)
  evaluate.py     expected acceptance (1 - TVD) on data and measured acceptance / speedup through the engine
  cli.py          `tempspec-train gen-data | mix | distill | eval`
"""
__version__ = "0.1.0"
