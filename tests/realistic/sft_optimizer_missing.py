"""TRL's SFTTrainer on a PEFT model with a hand-built optimizer (LoRA+ style: a group per LoRA matrix).

The B group was meant to get the larger learning rate, but its filter looks for "lora_b" and peft spells it
`lora_B`: the group is empty, and the B weights get gradients the optimizer never applies. They start at zero, so
the adapter stays a no-op, and nothing is raised on either stack.
"""

import os
import tempfile

from datasets import Dataset
from peft import LoraConfig, get_peft_model
from torch.optim import AdamW
from trl import SFTConfig, SFTTrainer

from gradflow.setup.presets import build_preset, build_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "birds sing at dawn", "rain falls on the roof",
         "the sun is warm today", "fish swim in the sea", "trees grow tall", "snow covers the hills"]


def build(output_dir=None):
    output_dir = output_dir or os.environ.get("OUTPUT_DIR") or tempfile.mkdtemp(prefix="sft-opt-")
    model = get_peft_model(build_preset("tiny-llama", seed=0),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    lora_a = [p for n, p in model.named_parameters() if "lora_A" in n]
    lora_b = [p for n, p in model.named_parameters() if "lora_b" in n]
    optimizer = AdamW([{"params": lora_a, "lr": 1e-3}, {"params": lora_b, "lr": 1.6e-2}])
    args = SFTConfig(output_dir=output_dir, max_steps=3, per_device_train_batch_size=4, max_length=32,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                      processing_class=build_tokenizer(), optimizers=(optimizer, None))


if __name__ == "__main__":
    build().train()
