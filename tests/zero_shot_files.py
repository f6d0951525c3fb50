"""Tiny files in the benchmarks' release formats, laid out as `gpt.zero_shot.FILES` expects."""
import json
import os

WIKITEXT = (" \n = Robert Boulter = \n \n Robert Boulter is an English film , television and "
            "theatre actor . He had a guest @-@ starring role on the series The Bill in 2000 . \n"
            " \n = = Career = = \n \n In 2006 , Boulter starred in the play Citizenship ( by "
            "Mark Ravenhill ) on a 1 @,@ 000 @-@ seat stage at the <unk> Theatre . \n")
WIKITEXT_WORDS_AND_LINES = 63 + 8  # `wc -w` and `wc -l` of WIKITEXT
PTB = (" no it was n't black monday \n but while the new york stock exchange did n't fall "
       "apart friday as the dow plunged N points $ N million of it in the final hour \n")
PTB_WORDS_AND_LINES = 33 + 2
LM1B = ("The U.S. Centers for Disease Control said it 's too early , officials said .\n"
        "`` We do n't know yet , '' he said ( on Monday ) .\n")
LM1B_WORDS_AND_LINES = 30 + 2
# 202 bytes: the test split, the last 202 // 20 = 10, starts inside an "\u00e9" and so at "<b>"
ENWIK8 = "<page><title>Caf\u00e9</title>".encode() + b"x" * 165 + "\u00e9<b>Na\u00efve".encode()
ENWIK8_TEST = "<b>Na\u00efve"
TEXT8 = b" anarchism originated as a term of abuse first used against early working class" * 3
CBT = ("1 Once upon a time there lived a king who had three sons .\n"
       "2 `` Go , '' said the king , `` and find me the bird . ''\n"
       "3 The youngest son did n't wait .\n"
       "4 XXXXX rode off into the forest .\tHe\t\tHe|King|bird|Once\n"
       "\n"
       "1 The bird sang .\n"
       "2 Its song was sweet .\n"
       "3 The XXXXX listened .\tking\t\tbird|forest|king\n")
HELLASWAG = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
     "ctx_b": "he", "ctx": "A man is sitting on a roof. he", "split": "val",
     "split_type": "indomain", "label": 3, "source_id": "activitynet~v_-JhWjGDPHMY",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ind": 7, "activity_label": "Personal Care and Style",
     "ctx_a": "[header] How to dye your hair [title] Choose a color.", "ctx_b": "",
     "ctx": "[header] How to dye your hair [title] Choose a color. ", "split": "val",
     "split_type": "zeroshot", "label": "0", "source_id": "wikihow~1",
     "endings": ["[step] Pick a shade close to  your own.", "Eat it.", "Paint the dog.",
                 "[substeps] Wait a year."]},
]
LAMBADA = ["He looked at the old map and then at the sea. \"We sail at dawn,\" said the captain",
           "She opened the box and found a letter from her mother, the letter"]


def write(root) -> None:
    """Every benchmark's file under `root`."""
    from gpt.zero_shot import FILES

    contents = {
        "lambada": "".join(json.dumps({"text": t}) + "\n" for t in LAMBADA),
        "cbt_cn": CBT, "cbt_ne": CBT, "wikitext2": WIKITEXT, "wikitext103": WIKITEXT, "ptb": PTB,
        "enwik8": ENWIK8, "text8": TEXT8, "lm1b": LM1B,
        "hellaswag": "".join(json.dumps(item) + "\n" for item in HELLASWAG),
    }
    for name, content in contents.items():
        path = os.path.join(root, FILES[name])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content if isinstance(content, bytes) else content.encode("utf-8"))
