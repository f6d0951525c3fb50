"""GPT-1 fine-tuning on sst2: python -m experiments.finetune --config=configs/finetune/sst2.py --config.init_from=W --workdir=OUT"""
from configs.finetune.base import get_finetune_config


def get_config():
    return get_finetune_config("sst2")
