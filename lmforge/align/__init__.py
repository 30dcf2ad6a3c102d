"""Stage 5, alignment: preference pairs, reward models, the DPO family and Constitutional AI.

    lmforge align pairs   --model M --task reasoning-gym:TASK --k 4 --out pairs.jsonl
    lmforge align reward  --config rm-smollm2-countdown
    lmforge align dpo     --config dpo-smollm2-countdown
    lmforge align cai     --config cai-smollm2

Every method is an objective in the one Trainer (lmforge.train); losses live in train/losses.py.
"""
