"""A small byte-level BPE tokenizer with a ChatML chat template, trained locally on the tasks' templates.

Why it looks the way it does:

- Byte-level, so any text round-trips and no input is out of vocabulary.
- Every digit is its own token (``Digits(individual_digits=True)``): sums are learned digit by digit.
- Merges are trained on template text only, so random words from the ``reverse`` task stay (mostly) one letter per
  token and the model can see the letters it must reverse.
- ChatML framing (``<|im_start|>role\\n...<|im_end|>``) like Qwen; ``<|im_end|>`` is the end-of-sequence token, and
  the assistant's content plus ``<|im_end|>`` sits in ``{% generation %}`` so ``return_assistant_tokens_mask``
  marks exactly the tokens a policy is trained on. There is no BOS token.
- An assistant message's OpenAI ``tool_calls`` render after its content in the Hermes format that
  ``rlft.envs.parse_tool_calls`` reads back: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlft.tiny.tasks import ARITHMETIC_TEMPLATE, REVERSE_TEMPLATE

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END]
# Upper bound for training; the template corpus is small, so BPE stops earlier when it runs out of pairs.
MAX_VOCAB_SIZE = 384

CHAT_TEMPLATE = """\
{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
            {{- message['content'] or '' }}
            {%- for call in message['tool_calls'] or [] %}
                {%- set arguments = call['function']['arguments'] %}
                {{- '<tool_call>{"name": "' + call['function']['name'] + '", "arguments": ' }}
                {{- (arguments if arguments is string else arguments | tojson) + '}</tool_call>' }}
            {%- endfor %}
            {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def template_corpus() -> list[str]:
    """The fixed text of the task templates and chat framing, with every variable part left out."""
    return [
        ARITHMETIC_TEMPLATE.format(a="", b=""),
        REVERSE_TEMPLATE.format(word=""),
        "system\nuser\nassistant\n",
    ]


def train_tokenizer() -> Tokenizer:
    """Train the byte-level BPE model on ``template_corpus``; deterministic (no randomness in BPE training)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MAX_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(template_corpus(), trainer=trainer)
    return tokenizer


def build_tokenizer(out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The tiny tokenizer as a transformers fast tokenizer; saved to ``out_dir`` when given.

    ``AutoTokenizer.from_pretrained(out_dir)`` loads it back offline, chat template included.
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(),
        eos_token=IM_END,
        pad_token=PAD,
        extra_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer
