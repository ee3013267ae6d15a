r"""Extending a pretrained model's context: RoPE scaling, growing lengths, then optionally DSA.

    python -m experiments.tokenize --input='/data/books/**/*.txt' --tokenizer=/ckpt/llama \
        --output=/data/books_llama
    python -m experiments.train --config=experiments/configs/extend_hf.py:4k \
        --config.init_from=/ckpt/llama --config.task.path=/data/books_llama --workdir=/runs/ext4k
    python -m experiments.train --config=experiments/configs/extend_hf.py:16k \
        --config.init_from=/runs/ext4k --config.task.path=/data/books_llama --workdir=/runs/ext16k
    python -m experiments.train --config=experiments/configs/extend_hf.py:64k \
        --config.init_from=/runs/ext16k --config.task.path=/data/books_llama --workdir=/runs/ext64k
    python -m experiments.export --workdir=/runs/ext64k --out=/ckpt/llama_64k
    # DeepSeek Sparse Attention on top (as DeepSeek-V3.2 was made from V3.1):
    python -m experiments.train --config=experiments/configs/extend_hf.py:dsa_warmup \
        --config.init_from=/runs/ext64k --config.task.path=/data/books_llama --workdir=/runs/dsa_w
    python -m experiments.train --config=experiments/configs/extend_hf.py:dsa_sparse \
        --config.init_from=/runs/dsa_w --config.task.path=/data/books_llama --workdir=/runs/dsa

The first stage starts from a Hugging Face directory (`init_from`: config.json, safetensors,
tokenizer.json); each later stage's `init_from` is the previous stage's workdir, whose
`config.json` gives the model section (experiments/training/hf_bridge.py), and every stage
resumes from its own workdir when restarted. The task is language modelling on a token file
(`task.path`, made with the checkpoint's tokenizer by `experiments.tokenize`), every token
scored; after each stage the needle grid (`niah`) at the stage's length.

* Positions: YaRN as transformers computes it (`yarn_hf`, the default; the exported directory
  loads with the same scaling), `:STAGE,llama3` (Llama 3.1's scaling) or `:STAGE,theta` (a new
  RoPE base `NEW_THETA` for the checkpoint's "global" layers, no scaling). The factor is each
  stage's length over the checkpoint's original length (`rope_factor=0`, `AUTO_FACTOR`), the
  original length that of the checkpoint (`max_position_embeddings`) unless set.
* Lengths: `STAGES` (4K, 16K, 64K tokens: rows, steps, mesh for 8 devices per stage). Each
  stage warms the learning rate up over `warmup_steps` and decays it on a cosine to 10%.
* Memory: `model.param_dtype=bfloat16` with float32 master weights and AdamW moments
  (`optim.state_dtype`), block remat, the chunked loss where the config schema has it
  (`memory_settings`), FSDP over `data` and ring attention (zig-zag) over `seq`.
* `:dsa_warmup` converts every layer to DeepSeek Sparse Attention (`layer_pattern=("dsa",)`:
  the same attention weights plus a lightning indexer per layer, which keeps the RoPE base of
  the layers it replaces) and trains only the indexers (`trainable=indexer`) on the KL to the
  dense attention, the model frozen, lr 1e-3; `:dsa_sparse` then trains everything with each
  query attending to its `top_k` selected keys (the indexer on its KL over that set). Their
  rows are `DSA_LENGTH` tokens: the dense KL target is O(T^2) memory.

`:smoke` (after any stage) is the tiny run of the tests: rows of 1/16 of the stage's length
(256 tokens for the DSA stages), 2 steps, one device unless `--config.mesh` says otherwise.
"""

from experiments.configs import common

# stage -> (row length in tokens, rows per step, steps, mesh and FSDP for 8 devices)
STAGES = {
    "4k": dict(seq_len=4096, batch_size=8, num_steps=300, mesh="data:8"),
    "16k": dict(seq_len=16384, batch_size=2, num_steps=200, mesh="data:2,seq:4"),
    "64k": dict(seq_len=65536, batch_size=1, num_steps=100, mesh="seq:8"),
}
DSA_STAGES = ("dsa_warmup", "dsa_sparse")
SCALINGS = {"yarn": "yarn_hf", "llama3": "llama3", "theta": "none"}
AUTO_FACTOR = 0.0    # hf_bridge.AUTO_FACTOR: rope_factor = task.seq_len / original length
NEW_THETA = 5e6      # `:theta`: the new RoPE base of the "global" layers
DSA_LENGTH = 16384
DSA_OPTIONS = dict(index_heads=16, index_dim=64, top_k=2048)


def memory_settings(config) -> None:
  """Block remat, the automatic chunked loss and the tiled MLP: what a long row needs to fit
  (experiments/README.md, "Memory at long context")."""
  config.model.update(remat="block", mlp_chunk=4096)
  config.loss_chunk = -1


def get_config(variant: str | None = None):
  words = [w.strip() for w in (variant or "").split(",") if w.strip()]
  scalings = [w for w in words if w in SCALINGS]
  rest = ",".join(w for w in words if w not in SCALINGS)
  stage, smoke = common.parse_variant(rest, name="extend_hf.py",
                                      choices=tuple(STAGES) + DSA_STAGES, default="4k")
  if len(scalings) > 1:
    raise ValueError(f"extend_hf.py: at most one RoPE scaling of {tuple(SCALINGS)}, got "
                     f"{scalings}.")
  config = common.base_config()
  config.task = dict(name="tokens", path="", seq_len=DSA_LENGTH, tokenizer="bytes",
                     heldout_every=100)
  config.model.update(dtype="bfloat16", param_dtype="bfloat16")
  memory_settings(config)
  config.fsdp = True
  config.optim.update(lr=2e-5, warmup_steps=20, final_lr_ratio=0.1, weight_decay=0.0)
  config.checkpoint_every = config.eval_every = 50
  config.eval_after_train = True
  config.eval.update(tasks=("niah",), length_multiples=(1,), examples=4, batch_size=1)
  if stage in STAGES:
    settings = dict(STAGES[stage])
    config.task.seq_len = settings.pop("seq_len")
    config.update(settings)
    scaling = SCALINGS[scalings[0] if scalings else "yarn"]
    config.model.update(rope_scaling=scaling, rope_factor=AUTO_FACTOR)
    if scaling == "none":
      config.model.kinds["global"].rope_theta = NEW_THETA
  else:
    dsa_stage(config, stage)
  if smoke:  # model sizes are the checkpoint's: only the run shrinks
    config.update(batch_size=2, num_steps=2, log_every=2, eval_every=2, checkpoint_every=2,
                  eval_batches=1, progress=False, mesh="", fsdp=False)
    config.task.update(seq_len=config.task.seq_len // (16 if stage in STAGES else 64),
                       heldout_every=4)
    config.eval.update(depths=(0.0, 1.0), examples=2, batch_size=2)
    if stage in DSA_STAGES:
      config.model.kinds.dsa.options.update(index_heads=2, index_dim=8, top_k=16)
  return config


def dsa_stage(config, stage: str) -> None:
  """In place: DeepSeek's stage 1 (`dsa_warmup`: indexers only, dense attention, lr 1e-3) or
  stage 2 (`dsa_sparse`: top-k attention, everything trains) on rows of `DSA_LENGTH`."""
  options = dict(DSA_OPTIONS, stage="dense" if stage == "dsa_warmup" else "sparse")
  config.model.layer_pattern = ("dsa",)
  config.model.kinds = dict(dsa=dict(options=options))
  config.aux_losses = dict(indexer_kl=1.0)
  config.update(batch_size=8, mesh="data:8")
  if stage == "dsa_warmup":
    config.update(trainable="indexer", num_steps=200)
    config.optim.update(lr=1e-3, warmup_steps=20)
  else:
    config.num_steps = 300
    config.optim.update(lr=1e-5, warmup_steps=20)
