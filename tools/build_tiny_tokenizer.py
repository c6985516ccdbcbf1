"""Build the tiny model's tokenizer shipped in compiler/assets/tiny/ (run once; the output is checked in).

A byte-level BPE with 512 entries trained on the bundled tiny datasets: every input can be encoded (byte
fallback), and the datasets' words become single tokens so a small model learns them quickly. Its chat
template is ChatML, the format Qwen models use, with <|im_end|> as end of turn.

    python tools/build_tiny_tokenizer.py
"""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ptcompile.tiny_data import corpus

OUT = Path(__file__).resolve().parent.parent / "compiler" / "assets" / "tiny"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def main() -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus()) + ["<|im_start|>user\nhi<|im_end|>\n"], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML,
        model_max_length=1024,
    )
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT)
    # Portable across transformers 4.x and 5.x: a plain fast-tokenizer class, the template inline.
    config_path = OUT / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHATML
    config["additional_special_tokens"] = config.pop("extra_special_tokens", ["<|im_start|>"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (OUT / "chat_template.jinja").unlink(missing_ok=True)
    print("wrote", sorted(p.name for p in OUT.iterdir()))


if __name__ == "__main__":
    main()
