#!/usr/bin/env python3
"""transformers' own Llama 4 chat template (`processing_llama4.chat_template`)
rendered by `apply_chat_template` with and without tools, for
tests/it/hf_io.rs (`chat_template_with_tools_matches_apply_chat_template`):
a real template that uses `tojson(indent=4)`, `is defined`, `trim`, slicing
and `raise_exception`, on tool schemas with nested objects, a float, quotes
and non-ASCII text.

Writes tests/fixtures/hf/chat/llama4-tools.json: the template, the messages
and per case the extra variables and the expected text. Dicts are written
with sorted keys: anemone passes extra variables through serde_json, whose
maps are sorted, while Python keeps insertion order.

Run: /path/to/venv/bin/python scripts/gen_hf_chat_tools_fixture.py
(needs transformers; not used by CI)
"""
import json
import os

from transformers import AutoTokenizer
from transformers.models.llama4.processing_llama4 import chat_template

HERE = os.path.dirname(os.path.abspath(__file__))
HF = os.path.join(os.path.dirname(HERE), "tests", "fixtures", "hf")

TOOLS = [{"function": {"description": "Get the weather, \"now\" \u2600", "name": "get_weather",
                       "parameters": {"properties": {"city": {"type": "string"},
                                                     "days": {"maximum": 7.5, "type": "integer"}},
                                      "required": ["city"], "type": "object"}},
          "type": "function"}]
MESSAGES = [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "Weather in Paris?"}]


def main():
    tok = AutoTokenizer.from_pretrained(os.path.join(HF, "tokenizer"))
    cases = []
    for extra in [{}, {"tools": TOOLS}, {"tools": TOOLS, "tools_in_user_message": False}]:
        extra = dict(extra, date_string="01 Jan 2025")
        text = tok.apply_chat_template(MESSAGES, chat_template=chat_template, tokenize=False,
                                       add_generation_prompt=True, **extra)
        cases.append(dict(extra=extra, expected=text))
    path = os.path.join(HF, "chat", "llama4-tools.json")
    with open(path, "w") as f:
        json.dump(dict(script="scripts/gen_hf_chat_tools_fixture.py", template=chat_template,
                       messages=MESSAGES, cases=cases), f, indent=1, ensure_ascii=False)
    print(path, len(cases))


if __name__ == "__main__":
    main()
