"""GPT-1's fine-tuning recipe (Radford et al., 2018, section 4.1) for any task; the files
beside this one pick the task.

Without init_from the model is GPT-1's architecture at random initialisation: the
paper's "no pre-training" ablation.

Sources as in configs/gpt1.py: "paper" (section 3.3 and 4.1), "release"
(openai/finetune-transformer-lm train.py's defaults, written for ROCStories) or "ours". With
init_from, the model and tokenizer are the pre-trained run's; only the dropout rates and the
keys below apply.
"""
import ml_collections

from configs import gpt1


def get_finetune_config(task: str) -> ml_collections.ConfigDict:
    c = gpt1.get_config()
    c.init_from = ""  # workdir of a pre-trained run (experiments.train or experiments.convert)
    c.task = ml_collections.ConfigDict()
    c.task.name = task  # a task of gpt/finetune/tasks.py, or jsonl:DIR
    c.task.format = ""  # jsonl tasks: classification | entailment | similarity | multiple_choice
    c.task.num_labels = 0  # jsonl tasks: classes (1: regression) or answers per example
    c.task.metrics = ()  # jsonl tasks: e.g. ("accuracy",), ("f1", "accuracy"), ("pearson",)
    c.task.train_split = ""  # "" = the task's own; TFDS split syntax, e.g. "train[:10%]"
    c.task.eval_split = ""

    c.finetune = ml_collections.ConfigDict()
    c.finetune.lm_coef = 0.5  # lambda: weight of the auxiliary language-modelling loss (paper, release)
    c.finetune.clf_pdrop = 0.1  # dropout on the classifier's input (paper, release)
    # model.*_pdrop 0.1 (from configs/gpt1.py): paper ("we reuse the hyperparameter settings
    # from unsupervised pre-training"), release

    c.data.batch_size = 32  # paper (release: 8 per GPU on 4 GPUs)
    c.data.seq_len = 512  # longest sequence (at most the model's context); batches are padded
    # to the task's longest sequence up to this, as the release's n_ctx = min(longest, 512)
    o = c.optim
    o.lr, o.schedule, o.end_lr = 6.25e-5, "warmup_linear", 0.0  # paper, release (its schedule)
    o.warmup_fraction = 0.002  # warmup over 0.2% of training (sets optim.warmup_steps; 0: none): paper, release
    o.weight_decay, o.grad_clip = 0.01, 1.0  # 0.01: paper (pre-training's), release (l2); 1.0: release
    # b1, b2, eps 0.9, 0.999, 1e-8 (from configs/gpt1.py): release
    c.train.epochs = 3.0  # paper, release (n_iter)
    c.train.log_every, c.train.eval_every, c.train.ckpt_every = 50, 1000, 1000  # ours
    # ours: the last model. The release predicts the test set with the parameters that scored
    # best on its held-out validation examples.
    c.train.keep_best = False
    return c
