"""Record formats and prompt templates.

Every format is turned into one shape, a (prompt, response) pair of strings,
so that tokenize, evaluate and serving share one rendering. Only the response
carries loss; the prompt is masked.
"""

from __future__ import annotations

from typing import Any

# Field rules per format: name -> (required, type). Validate and tokenize both read these.
FIELDS: dict[str, dict[str, tuple[bool, type]]] = {
    "instruction": {"instruction": (True, str), "input": (False, str), "output": (True, str)},
    "chat": {"messages": (True, list)},
    "completion": {"prompt": (True, str), "completion": (True, str)},
    # DPO's pairs: `prompt` is the user's message, rendered with data.template like an instruction.
    "preference": {"prompt": (True, str), "chosen": (True, str), "rejected": (True, str)},
}
CHAT_ROLES = ("system", "user", "assistant")

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

# Chat template given to tokenizers that have none (the generated base model's, for one).
CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_SPECIAL = ["<|im_start|>", "<|im_end|>"]


def to_messages(record: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """The conversation a record stands for; the last message is the assistant's answer."""
    if fmt == "instruction":
        user = record["instruction"]
        if record.get("input"):
            user = f"{user}\n\n{record['input']}"
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    if fmt == "chat":
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if fmt == "preference":  # its answer is the chosen one: what SFT metrics and perplexity measure
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["chosen"]}]
    raise ValueError(f"format {fmt!r} has no conversation form")


def render_prompt(messages: list[dict[str, str]], template: str, tokenizer=None) -> str:
    """The generation prompt for a conversation that awaits the assistant's answer.

    Training (through `render`) and serving's chat endpoint both come here, so a
    served model sees exactly the prompts it was tuned on.
    """
    if template == "alpaca":
        header = ALPACA_HEADER
        body = ""
        for m in messages:
            if m["role"] == "system":
                header = m["content"]
            elif m["role"] == "user":
                body += f"### Instruction:\n{m['content']}\n\n"
            else:
                body += f"### Response:\n{m['content']}\n\n"
        return f"{header}\n\n{body}### Response:\n"
    if template == "chatml":
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + "<|im_start|>assistant\n"
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'tokenizer' needs a tokenizer with a chat_template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render(record: dict[str, Any], fmt: str, template: str, tokenizer=None) -> tuple[str, str]:
    """(prompt, response) for one record; only the response is trained on."""
    if fmt == "completion":
        return record["prompt"], record["completion"]
    messages = to_messages(record, fmt)
    response = messages[-1]["content"] + ("<|im_end|>" if template == "chatml" else "")
    return render_prompt(messages[:-1], template, tokenizer), response


def stop_strings(template: str) -> list[str]:
    """Text that ends an answer under a template, besides the tokenizer's EOS."""
    return ["<|im_end|>"] if template == "chatml" else []


def with_rejected_answer(record: dict[str, Any]) -> dict[str, Any]:
    """A preference record whose answer is the rejected one, to render or tokenize as its chosen is."""
    return {**record, "chosen": record["rejected"]}
