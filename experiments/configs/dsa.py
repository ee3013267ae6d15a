r"""DeepSeek Sparse Attention on passkey: dense model, indexer warm-up, sparse training.

    python -m experiments.train --config=experiments/configs/dsa.py --workdir=/tmp/dsa_dense
    python -m experiments.train --config=experiments/configs/dsa.py:warmup --workdir=/tmp/dsa_warmup \
        --config.init_from=/tmp/dsa_dense
    python -m experiments.train --config=experiments/configs/dsa.py:sparse --workdir=/tmp/dsa_sparse \
        --config.init_from=/tmp/dsa_warmup

The main passkey recipe (passkey.py: 4-layer byte-level decoder, d_model 64, rows of 256 tokens
packing documents of 112-256 tokens, 1000 steps) with its global layers replaced by DSA layers
(models/dsa.py: main attention + lightning indexer, 4 heads x 32 dims, top_k = 32, RoPE theta
1e7 as the globals had): pattern (dsa, local, local, dsa), passkey at 256 tokens = 8x top_k.

* (no variant) the dense model: stage "dense" (flash attention); everything trains, the
  model on the answer loss and, since the indexer reads a detached input, the indexer on its
  dense KL at the same time (it cannot change the model).
* `:warmup` (DeepSeek stage 1): stage "dense", only the indexer trains (`trainable=indexer`)
  on KL(p || softmax(I)) against the dense attention distribution; lr 1e-3.
* `:sparse` (DeepSeek stage 2): stage "sparse": each query attends to its top_k selected keys;
  everything trains: the model on the answer loss, the indexer on the KL restricted to the
  selected set (detached, so neither loss reaches the other's parameters).

Result (seed 0, experiments/results/README.md; indexer head weights with DeepSeek's d_I^-0.5): passkey exact match
at 256 tokens 0.99 dense, 0.99 after warm-up, 1.00 after 300 sparse steps (top-32 attention);
indexer recall 0.73 / 0.83 in layers 0 / 3. Where this differs from DeepSeek's recipe:
experiments/results/README.md.
`:smoke` (alone, or after a stage: `:warmup,smoke`, `:sparse,smoke`) is a tiny, fast run.
"""

from experiments.configs import common

VARIANTS = ("dense", "warmup", "sparse")


def dsa_kind(top_k: int, stage: str = "dense") -> dict:
  """The "dsa" layer kind of these recipes: RoPE theta 1e7 (as the global layers it replaces),
  indexer 4 heads x 32 dims, `top_k` keys per query in the sparse stage."""
  return dict(rope_theta=1e7, options=dict(index_heads=4, index_dim=32, top_k=top_k,
                                           stage=stage))


def sparse_stage(config) -> None:
  """DeepSeek stage 2 in place: the dsa layers attend to their top_k keys, lr 1e-3 after 10
  warm-up steps (the rest of the run, steps included, stays the caller's)."""
  config.model.kinds.dsa.options.stage = "sparse"
  config.optim.update(lr=1e-3, warmup_steps=10)


def get_config(variant: str | None = None):
  stage, smoke = common.parse_variant(variant, name="dsa.py", choices=VARIANTS,
                                      default="dense")

  config = common.base_config()
  config.task = dict(name="passkey", seq_len=256, digits=5, instruction="", min_len=112,
                     tokenizer="bytes")
  config.model.update(d_model=64, num_layers=4, num_heads=4, mlp_dim=128,
                      layer_pattern=("dsa", "local", "local"))
  config.model.kinds = dict(dsa=dsa_kind(top_k=32), local=dict(window=64, rope_theta=1e4))
  config.aux_losses = dict(indexer_kl=1.0)
  config.batch_size = 16
  config.num_steps = 1000
  config.optim.update(lr=3e-3, warmup_steps=50)
  config.eval_every = 250
  config.eval_after_train = True
  config.eval.update(length_multiples=(1,))
  if stage == "warmup":
    config.trainable = "indexer"
    config.num_steps = 150
    config.optim.update(lr=1e-3, warmup_steps=10)
  elif stage == "sparse":
    sparse_stage(config)
    config.num_steps = 300

  if smoke:
    common.smoke(config, steps=2, every=2, batch_size=2, num_layers=2)
    config.task.seq_len = 128
    config.model.kinds.dsa.options.update(index_heads=2, index_dim=8, top_k=16)
    config.model.kinds.local.window = 16
    config.eval_after_train = False
  return config
