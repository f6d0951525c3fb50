"""Fields every experiment config has; gpt1.py and gpt2.py fill in the papers' values."""
import dataclasses

import ml_collections

from gpt.config import GPTConfig


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(
        {f.name: f.default for f in dataclasses.fields(GPTConfig)})

    c.data = ml_collections.ConfigDict()
    c.data.name = "pydoc"  # pydoc (offline default: CPython's documentation) | text:PATH | a TFDS name
    c.data.text_feature = ""  # TFDS datasets: the feature holding the text; "" = detect
    c.data.tokenizer = "bytes"  # bytes | gpt2 | bpe
    c.data.bpe_merges = 40000  # bpe only: merges learned on the corpus (GPT-1 used 40,000)
    c.data.bpe_train_chars = 100_000_000  # bpe only: learned from train's first N characters; 0 = all
    c.data.data_dir = ""  # prepared corpora and learned tokenizers; "" = ./data, and TFDS
    # datasets in TFDS's own data dir ($TFDS_DATA_DIR, else ~/tensorflow_datasets)
    c.data.batch_size = 8  # global, over all devices and hosts
    c.data.seq_len = 128
    c.data.num_workers = 0  # processes tokenizing train in parallel; 0 = in the main process. Same
    # batches either way, but a checkpoint resumes only with the number it was saved with
    c.data.prefetch = 2  # train batches a background thread makes ahead; 0 = on demand

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 6e-4
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"  # cosine | linear | constant (after warmup) | warmup_linear (GPT-1 fine-tuning)
    c.optim.end_lr = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0  # global norm; 0 disables

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000  # the lr schedule spans them: raising it on resume re-stretches the schedule
    c.train.epochs = 0.0  # > 0 sets steps from the corpus size (GPT-1: 100 epochs)
    c.train.grad_accum_steps = 1
    c.train.log_every = 50  # train metrics are means over the steps since the last log
    c.train.eval_every = 500  # and at the last step (the only evaluation if it exceeds steps)
    c.train.eval_steps = 20  # eval batches of data.batch_size rows (fewer if validation is short)
    c.train.eval_batch_size = 0  # rows per device the eval step takes at a time; 0 = the train
    # step's micro-batch, data.batch_size // (devices x train.grad_accum_steps)
    c.train.ckpt_every = 1000
    c.train.keep_ckpts = 3
    c.train.keep_best = True  # also keep the checkpoint with the lowest eval loss
    c.train.skip_nonfinite = False  # True: skip an update whose loss or gradient is not finite
    c.train.poison_step = 0  # testing aid: > 0 makes that step's loss NaN
    c.train.kernels = "auto"  # gpt/cpu's kernels where a step is lowered for CPU | none | a
    # comma-separated subset of attention, matmul, cross_entropy, adamw | -subset: all but those
    c.train.parallelism = "jit"  # jit (one device) | pmap (data parallel, local devices) | mesh (FSDP)
    c.train.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1})  # mesh only; -1: the rest
    c.train.seed = 0
    c.train.distributed = False  # True: jax.distributed.initialize() first (multi-host)
    c.train.num_processes = 0  # distributed by hand: with JAX_COORDINATOR_ADDRESS; 0 = detect
    c.train.process_id = 0
    c.train.peak_flops = 0.0  # per device, for MFU; 0 = the datasheet's (known GPUs and TPUs), else measured
    c.train.wandb = ""  # also log to this Weights & Biases project; "" = off (needs: pip install wandb)
    return c


# Devices each accelerator preset is sized for: one GPU; a TPU v4 host's 4 chips.
PRESET_DEVICES = {"gpu": 1, "tpu": 4}


def on_accelerator(c: ml_collections.ConfigDict, platform: str, rows_per_device: int):
    """`c` as it trains on `platform`: bfloat16 compute (parameters, LayerNorm statistics,
    softmax and the loss stay float32), the same global batch in micro-batches of
    `rows_per_device` per device, and no attention dropout, as nanoGPT pre-trains: the
    fused attention kernels have none (GPT-1 used 0.1; residual and embedding dropout stay).
    Sizes in docs/scaling.md; on another device count set train.grad_accum_steps to
    data.batch_size / (devices x rows_per_device)."""
    c.model.dtype = "bfloat16"
    c.model.attn_pdrop = 0.0
    devices = PRESET_DEVICES[platform]
    c.train.grad_accum_steps = c.data.batch_size // (devices * rows_per_device)
    c.train.parallelism = "mesh" if devices > 1 else "jit"  # FSDP over the host's chips
    return c
