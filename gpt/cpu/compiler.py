"""XLA compile options for the steps that do a model's dense work (train, eval, the matmul peak)."""
# XLA's CPU matmuls (those gpt/cpu/matmul.py's MKL kernel leaves to XLA: all of them without MKL)
# on oneDNN instead of its default YNNPACK fusions: the train step ran
# 1.11x as fast at both benchmark shapes (tools/xla_options_ab.py, one run each). Decoding's
# matrix-vector products ran 2.6x slower on it (GPT-2 small, 10.7 against 27.7 new tokens/s,
# `python -m experiments.bench --what=sample` with these options in XLA_FLAGS), so sampling
# keeps XLA's defaults.
ONEDNN_DOTS = {"xla_cpu_use_onednn": True,
               "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
# ... with reductions left to YNNPACK, which reads the 50,257-way logits once per max or sum
# where XLA's own emitter chains reduce-windows: 1.29x, 1.20x and 1.04x in three runs at the
# tiny benchmark shape, 1.01x at GPT-2 small (tools/xla_options_ab.py --variants=onednn,ours).
CPU_COMPILER_OPTIONS = {**ONEDNN_DOTS, "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}

