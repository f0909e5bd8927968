"""Templates: one rendering for training, evaluation and serving."""

from __future__ import annotations

from tuneline.formats import ALPACA_HEADER, render, render_prompt, to_messages

RECORD = {"instruction": "Which word is a fruit?", "input": "apple piano", "output": "apple"}


def test_alpaca_instruction():
    prompt, response = render(RECORD, "instruction", "alpaca")
    assert prompt == f"{ALPACA_HEADER}\n\n### Instruction:\nWhich word is a fruit?\n\napple piano\n\n### Response:\n"
    assert response == "apple"


def test_chatml_marks_the_end_of_the_answer():
    prompt, response = render(RECORD, "instruction", "chatml")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert response == "apple<|im_end|>"


def test_chat_record_and_serving_prompt_agree():
    chat = {"messages": [{"role": "user", "content": "Which word is a fruit?\n\napple piano"},
                         {"role": "assistant", "content": "apple"}]}
    for template in ("alpaca", "chatml"):
        trained_on = render(chat, "chat", template)[0]
        served = render_prompt(to_messages(RECORD, "instruction")[:-1], template)
        assert trained_on == served == render(RECORD, "instruction", template)[0]


def test_completion_is_raw():
    assert render({"prompt": "2+2=", "completion": "4"}, "completion", "alpaca") == ("2+2=", "4")
