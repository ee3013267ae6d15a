r"""Token-level vs block-level sparse attention at the same selected-key budget (results row 10).

    python -m experiments.train --config=experiments/configs/sparse.py:moba --workdir=/tmp/moba
    # :dense (default), :dsa (DeepSeek's sparse stage, from a dense run: see row 10), :moba, :nsa;
    # --config.task.name=mqar or text for the other tasks (`TASKS`); + ,smoke for the tiny run

A 2-layer byte-level decoder (d_model 64, 4 heads, 2 kv heads, MLP 128), layers L X: a local
layer (window 8) then the layer under test, at L = 128 tokens and a budget of k = L / 8 = 16
selected keys per query (`budget_kinds`):

* `:dense`  X = "dsa" in stage "dense": flash attention over every earlier key, the lightning
            indexer (4 heads x 32 dims) learning its KL alongside (detached: it cannot change
            the model), i.e. the dense model and DeepSeek's dense warm-up at once;
* `:dsa`    X = "dsa" in stage "sparse": top-16 keys per query (row 10 trains it from the
            dense run's checkpoint, as row 4);
* `:moba`   X = "moba": blocks of 4 keys, top 3 gated blocks + the query's own = 16 keys;
* `:nsa`    X = "nsa": selection blocks of 4, top 4 (the first and the own block forced) = 16
            keys, plus its compressed branch (blocks of 8 keys every 4: L / 4 compressed keys)
            and a window of 8 keys.

Tasks (`TASKS`, same model and steps): passkey (128 tokens, one 5-digit key), MQAR (128 tokens,
16 key-value pairs, vocabulary 256), text (the default corpus's held-out rows of 128 bytes).
"""

from experiments.configs import common
from experiments.configs import dsa

SETTINGS = ("dense", "dsa", "moba", "nsa")
LENGTH = 128
TASKS = {
    "passkey": dict(name="passkey", seq_len=LENGTH, digits=5, instruction="", tokenizer="bytes"),
    "mqar": dict(name="mqar", seq_len=LENGTH, num_kv_pairs=16, vocab_size=256),
    "text": None,  # experiments/configs/text.py's task at LENGTH tokens
}


def budget_kinds(length: int) -> dict:
  """The layer kinds at k = length / 8 selected keys: DSA top-k tokens; MoBA and NSA blocks of
  length / 32 keys, 4 of them (MoBA: 3 gated + own; NSA: top 4 with first and own forced)."""
  k, block = length // 8, max(length // 32, 1)
  return dict(
      dsa=dsa.dsa_kind(top_k=k),
      moba=dict(rope_theta=1e7, options=dict(block_size=block, top_k_blocks=k // block - 1)),
      nsa=dict(rope_theta=1e7, options=dict(block_len=2 * block, stride=block,
                                            select_block=block, top_n=k // block,
                                            initial_blocks=1, local_blocks=1, window=k // 2)))


def set_task(config, name: str) -> None:
  """`config.task` = `TASKS[name]` (text: text.py's task at the row's length)."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}.")
  if TASKS[name] is None:
    from experiments.configs import text  # pylint: disable=g-import-not-at-top
    config.task = text.get_config().task
    config.task.update(seq_len=LENGTH, max_bytes=4 << 20)
  else:
    config.task = dict(TASKS[name])
  config.model.vocab_size = 256


def get_config(variant: str | None = None):
  setting, smoke = common.parse_variant(variant, name="sparse.py", choices=SETTINGS,
                                        default="dense")
  config = common.base_config()
  set_task(config, "passkey")
  config.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
                      layer_pattern=("local", "dsa" if setting in ("dense", "dsa") else setting))
  config.model.kinds = dict(local=dict(window=8, rope_theta=1e4), **budget_kinds(LENGTH))
  if setting in ("dense", "dsa"):
    config.aux_losses = dict(indexer_kl=1.0)
  if setting == "dsa":
    dsa.sparse_stage(config)
  config.batch_size = 16
  config.num_steps = 400
  config.optim.update(lr=3e-3, warmup_steps=30)
  config.eval_every = 100
  config.checkpoint_every = 100
  config.eval.update(length_multiples=(1,), examples=16, batch_size=16)
  if smoke:
    common.smoke(config, steps=2, every=2, num_layers=2)
    config.model.num_kv_heads = 1
    config.model.kinds.dsa.options.update(index_heads=2, index_dim=8)
    config.eval.update(depths=(0.0, 1.0), examples=2, batch_size=2)
  return config
