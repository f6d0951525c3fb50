"""GPT-1's fine-tuning recipe (Radford et al., 2018, section 4.1) for any task; the files
beside this one pick the task.

Without init_from the model is GPT-1's architecture at random initialisation: the
paper's "no pre-training" ablation.
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
    c.finetune.lm_coef = 0.5  # lambda: weight of the auxiliary language-modelling loss
    c.finetune.clf_pdrop = 0.1  # dropout on the classifier's input

    c.data.batch_size = 32
    c.data.seq_len = 512  # longest sequence (at most the model's context); batches are padded
    # to the task's longest sequence up to this
    o = c.optim
    o.lr, o.schedule, o.end_lr = 6.25e-5, "linear", 0.0
    o.warmup_fraction = 0.002  # warmup over 0.2% of training (sets optim.warmup_steps)
    o.weight_decay, o.grad_clip = 0.01, 1.0
    c.train.epochs = 3.0
    c.train.log_every, c.train.eval_every, c.train.ckpt_every = 50, 1000, 1000
    c.train.keep_best = False  # fine-tuning reports the last model, as the paper did
    return c
