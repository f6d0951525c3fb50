"""Architecture, exact parameter count and FLOPs per token of a config; nothing is allocated.

python -m experiments.summary --config=configs/gpt2.py:xl
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from experiments import common
from gpt import flops
from gpt.config import validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")
_DEVICES = flags.DEFINE_integer("devices", 0, "Devices to plan memory for (0: this machine's); "
                                "the mesh is train.mesh with -1 filled from this number.")

# (n_layer, d_model, n_head, vocab_size, max_len) -> what the paper reports.
PAPER = {
    (12, 768, 12, 40478, 512): ("GPT-1", 116_534_784, "117M"),
    (12, 768, 12, 50257, 1024): ("GPT-2 small", 124_439_808, "117M (paper), 124M (released)"),
    (24, 1024, 16, 50257, 1024): ("GPT-2 medium", 354_823_168, "345M (paper), 355M (released)"),
    (36, 1280, 20, 50257, 1024): ("GPT-2 large", 774_030_080, "762M (paper), 774M (released)"),
    (48, 1600, 25, 50257, 1024): ("GPT-2 xl", 1_557_611_200, "1542M (paper), 1558M (released)"),
}


def _memory_rows(config, cfg, n_params):
    import jax

    devices = _DEVICES.value or jax.device_count()
    data, fsdp = config.train.mesh.data, config.train.mesh.fsdp
    if config.train.parallelism != "mesh":
        data, fsdp = devices, 1  # replicated data parallelism
    data = devices // fsdp if data == -1 else data
    fsdp = devices // data if fsdp == -1 else fsdp
    batch = max(1, config.data.batch_size // (data * fsdp) // config.train.grad_accum_steps)
    memory = flops.memory_per_device(cfg, n_params, batch, config.data.seq_len, fsdp)
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    setting = (f"{config.train.parallelism}: data={data} x fsdp={fsdp} / {batch} x {config.data.seq_len} "
               f"/ {cfg.remat} / {cfg.dtype}")
    return [("memory per device (estimate)", gib(sum(memory.values()))),
            ("  mesh / micro-batch / remat / dtype", setting)] + [(f"  {k}", gib(v)) for k, v in memory.items()]


def main(argv):
    common.require_config(argv, _CONFIG.value, "configs/gpt2.py:xl")
    config = _CONFIG.value
    cfg = validate(config)
    shapes = flops.param_shapes(cfg)
    n_params = flops.count_params(shapes)
    seq_len = config.data.seq_len
    rows = [
        ("layers / d_model / heads / head dim", f"{cfg.n_layer} / {cfg.d_model} / {cfg.n_head} / {cfg.head_dim}"),
        ("d_ff / activation", f"{cfg.d_ff} / {cfg.activation}"),
        ("norm position / final LayerNorm", f"{cfg.norm_position} / {cfg.final_norm}"),
        ("vocabulary / context", f"{cfg.vocab_size:,} / {cfg.max_len:,}"),
        ("tied embeddings / residual init std", f"{cfg.tie_embeddings} / {cfg.residual_init_std:.5f}"),
        ("dropout embd / resid / attn", f"{cfg.embd_pdrop} / {cfg.resid_pdrop} / {cfg.attn_pdrop}"),
        ("parameters (exact)", f"{n_params:,}"),
        ("  token / position embeddings", f"{cfg.vocab_size * cfg.d_model:,} / {cfg.max_len * cfg.d_model:,}"),
        ("  per block", f"{flops.count_params(shapes['h_0']):,}"),
        (f"training FLOPs per token (T={seq_len})", f"{flops.flops_per_token(cfg, n_params, seq_len):,.0f}"),
        ("batch (sequences x tokens)", f"{config.data.batch_size} x {seq_len}"),
        ("optimizer", f"AdamW lr {config.optim.lr:g}, warmup {config.optim.warmup_steps}, "
                      f"{config.optim.schedule} to {config.optim.end_lr:g}, wd {config.optim.weight_decay:g}"),
    ]
    rows += _memory_rows(config, cfg, n_params)
    paper = PAPER.get((cfg.n_layer, cfg.d_model, cfg.n_head, cfg.vocab_size, cfg.max_len))
    if paper:
        name, exact, reported = paper
        rows.append(("paper model", f"{name}: reported {reported}; exact count "
                     f"{exact:,} ({'matches' if exact == n_params else 'DIFFERS'})"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    common.run_program(main)
