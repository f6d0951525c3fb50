"""GPT-1 fine-tuning on race: python -m experiments.finetune --config=configs/finetune/race.py --config.init_from=W --workdir=OUT"""
from configs.finetune.base import get_finetune_config


def get_config():
    return get_finetune_config("race")
