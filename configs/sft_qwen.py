r"""SFT of Qwen2.5-0.5B on UltraChat dialogues (chat `messages` schema, the tokenizer's chat template).

Command:
  python -m jaxrlhf.train --config=configs/sft_qwen.py --workdir=/tmp/sft_qwen \
      [--config.data.path=/local/ultrachat.jsonl] [--config.model.path=/local/Qwen2.5-0.5B]

Expected result: on one 8-GPU H100 node (mesh fsdp=8), ~1 epoch of 200k UltraChat dialogues in about
an hour; the response-token NLL falls from ~1.5 to ~1.2 and <workdir>/hf loads in transformers.
"""

from jaxrlhf import config_defaults as d


def get_config():
    c = d.base("sft")
    c.model = d.model("Qwen/Qwen2.5-0.5B")
    c.tokenizer = "Qwen/Qwen2.5-0.5B"
    c.data = d.data(
        path="HuggingFaceH4/ultrachat_200k",
        split="train_sft",
        schema="messages",
        max_prompt_length=768,
        max_length=1024,
    )
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.batch_size = 64
    c.micro_batches = 2
    c.total_steps = 2500
    c.optim = d.optim(lr=2e-5, warmup_steps=100)
    return c
