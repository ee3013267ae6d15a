r"""A Hugging Face checkpoint on a long-context task: its model and tokenizer, a fine-tune, a grid.

    python -m experiments.evaluate --hf=/data/Llama-3.2-1B --config=experiments/configs/hf.py \
        --outdir=/tmp/llama_niah --lengths=2048,4096,8192
    python -m experiments.train --config=experiments/configs/hf.py:yarn \
        --config.init_from=/data/Llama-3.2-1B --workdir=/tmp/llama_yarn
    python -m experiments.export --workdir=/tmp/llama_yarn --out=/tmp/llama_yarn_hf

`init_from` is a local directory as `huggingface_hub.snapshot_download` leaves it (config.json,
safetensors, tokenizer.json); nothing downloads. The model section comes from the checkpoint
(`experiments/training/hf_bridge.py`: this config sets no architecture field; a parameter-free
field such as the RoPE scaling may be changed) and the task's tokenizer is the checkpoint's
own. The task is `niah`-style language modelling on real text: documents of the Python
standard library (8 MiB of it; or `--config.task.glob`), every 10th file held out, packed into rows of `task.seq_len` tokens, every
token scored; after training the needle grid (`eval.tasks=("niah",)`: a needle sentence with a
random value at 5 depths of real filler, exact match of the generated answer) at 1x and 2x the
training length.

Variants: `:yarn` extends the position range 4x with transformers' YaRN (`yarn_hf`, so the
exported directory loads in transformers with the same scaling; original length = the
checkpoint's training length unless set) and trains at 4x; `:smoke` the tiny run of the tests.
"""

from experiments.configs import common


def get_config(variant: str | None = None):
  config = common.base_config()
  config.task = dict(name="text", seq_len=2048, tokenizer="bytes", max_bytes=8 << 20,
                     heldout_every=10)
  config.batch_size = 4
  config.num_steps = 200
  config.optim.update(lr=2e-5, warmup_steps=20, weight_decay=0.0)
  config.lm_loss_weight = 1.0
  config.eval_every = 100
  config.eval_after_train = True
  config.eval.update(tasks=("niah",), length_multiples=(1, 2), examples=8, batch_size=4)
  yarn, smoke = common.parse_variant(variant, name="hf.py", choices=("yarn",))
  if yarn:
    config.model.update(rope_scaling="yarn_hf", rope_factor=4.0)
    config.task.seq_len *= 4
  if smoke:
    config.task.update(seq_len=64 * (4 if yarn else 1), max_bytes=200_000)
    config.batch_size = 2
    config.num_steps = 2
    config.log_every = config.eval_every = config.checkpoint_every = 1
    config.eval_batches = 1
    config.progress = False
    config.eval.update(length_multiples=(4,), depths=(0.0, 1.0), examples=2, batch_size=2)
  return config
