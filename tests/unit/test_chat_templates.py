"""Published chat templates render as Hugging Face renders them.

The fixtures in tests/fixtures/chat_templates are the exact `chat_template` strings
of real checkpoints (sources in the README there). Every rendering is compared with
transformers' own `apply_chat_template(..., tokenize=False)`, given the same template
and the same special tokens.
"""
import json
import shutil
from pathlib import Path

import pytest

from llmesh.services.common.chat_template import ChatTemplate, special_tokens_of
from llmesh.services.common.errors import InvalidRequestError
from llmesh.services.common.tokenizer import TextTokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"

# bos / eos as each model's tokenizer_config.json sets them (None: null there)
MODELS = {
    "llama-3.1-8b-instruct": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "qwen2.5-7b-instruct": {"bos_token": None, "eos_token": "<|im_end|>"},
    "qwen3-8b": {"bos_token": None, "eos_token": "<|im_end|>"},
    "mistral-7b-instruct-v0.3": {"bos_token": "<s>", "eos_token": "</s>"},
}

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
CONVERSATIONS = {
    "system_user": [SYSTEM, {"role": "user", "content": "Hi"}],
    "multi_turn": [SYSTEM, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Name a prime, héllo 世界."}],
    "user_only": [{"role": "user", "content": "Hi"}],
}

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "City name, e.g. \"Zürich\""},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}


def source(name):
    return (FIXTURES / f"{name}.jinja").read_text()


def ours(name, messages, **kwargs):
    return ChatTemplate(source(name), special_tokens_of(MODELS[name])).render(messages, **kwargs)


@pytest.fixture(scope="session")
def hf_render(tiny_model_dir):
    """transformers' rendering of a template, with the given bos/eos as its special tokens."""
    from transformers import PreTrainedTokenizerFast

    def render(template, messages, special_tokens, **kwargs):
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tiny_model_dir / "tokenizer.json"),
                                      **special_tokens)
        tok.chat_template = template
        return tok.apply_chat_template(messages, tokenize=False, **kwargs)
    return render


def hf(hf_render, name, messages, **kwargs):
    return hf_render(source(name), messages, MODELS[name], **kwargs)


def test_fixtures_are_the_published_templates():
    # a cheap guard against an editor "fixing" whitespace: these are known texts
    assert {p.stem for p in FIXTURES.glob("*.jinja")} == set(MODELS)
    assert source("qwen2.5-7b-instruct").endswith("{%- endif %}\n")
    assert source("qwen3-8b").endswith("{%- endif %}\n{%- endif %}")
    assert "{%- set date_string = \"26 Jul 2024\" %}" in source("llama-3.1-8b-instruct")
    assert "{{- \"[AVAILABLE_TOOLS] [\" }}" in source("mistral-7b-instruct-v0.3")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_renders_like_transformers(hf_render, name, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    expected = hf(hf_render, name, messages, add_generation_prompt=add_generation_prompt)
    assert ours(name, messages, add_generation_prompt=add_generation_prompt) == expected


def test_rendering_leaves_the_callers_messages_alone():
    messages = json.loads(json.dumps(CONVERSATIONS["multi_turn"]))
    for name in MODELS:
        ours(name, messages, tools=[WEATHER_TOOL])
    assert messages == CONVERSATIONS["multi_turn"]


@pytest.mark.parametrize("template", [
    "{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content }}]\n  {% endif %}\n{% endfor %}\n",
    "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m.content }}{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
    "{{ messages | tojson(indent=2, sort_keys=True) }}{{ {'a': '<é>'} | tojson }}",
    "{{ dict(a=1) | tojson }}{{ strftime_now('%Y') | length }}{{ bos_token }}|{{ eos_token }}",
])
def test_environment_matches_transformers(hf_render, template):
    # trim/lstrip_blocks, loop controls, namespace, HF's tojson, the helpers, special tokens
    messages, tokens = CONVERSATIONS["multi_turn"], {"bos_token": "<s>", "eos_token": "</s>"}
    assert ChatTemplate(template, tokens).render(messages) == \
        hf_render(template, messages, tokens, add_generation_prompt=True)


def test_documented_formats():
    hi = [{"role": "user", "content": "Hi"}]
    assert "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" in ours("qwen2.5-7b-instruct", hi)
    assert ours("qwen2.5-7b-instruct", hi).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    assert ours("qwen3-8b", hi) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    llama = ours("llama-3.1-8b-instruct", hi)
    assert llama.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                            "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")
    assert "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>" in llama
    assert llama.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "Today Date: 01 Jan 2025\n" in ours("llama-3.1-8b-instruct", hi, date_string="01 Jan 2025")
    # v0.3 (v3 tokenizer): a space after [INST], none before [/INST]; answers end in </s>
    assert ours("mistral-7b-instruct-v0.3", hi) == "<s>[INST] Hi[/INST]"
    assert ours("mistral-7b-instruct-v0.3", CONVERSATIONS["multi_turn"]) == (
        "<s>[INST] Hi[/INST] Hello! How can I help?</s>"
        "[INST] You are a terse assistant.\n\nName a prime, héllo 世界.[/INST]")


@pytest.mark.parametrize("name", ["qwen2.5-7b-instruct", "qwen3-8b", "llama-3.1-8b-instruct",
                                  "mistral-7b-instruct-v0.3"])
def test_tools_render_like_transformers(hf_render, name):
    messages = CONVERSATIONS["multi_turn"]
    text = ours(name, messages, tools=[WEATHER_TOOL])
    assert text == hf(hf_render, name, messages, tools=[WEATHER_TOOL], add_generation_prompt=True)
    assert "get_weather" in text and "Zürich" in text  # tojson keeps non-ASCII, as HF's does
    if name.startswith("qwen"):
        assert "<tools>\n" + json.dumps(WEATHER_TOOL, ensure_ascii=False) + "\n</tools>" in text
    if name.startswith("llama"):
        assert "Environment: ipython\n" in text
        assert json.dumps(WEATHER_TOOL, ensure_ascii=False, indent=4) in text


@pytest.mark.parametrize("name", ["qwen2.5-7b-instruct", "qwen3-8b", "llama-3.1-8b-instruct"])
def test_tool_call_round_trip_renders_like_transformers(hf_render, name):
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                    "name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "{\"temp\": 21}"}]
    assert ours(name, messages) == hf(hf_render, name, messages, add_generation_prompt=True)


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_qwen3_enable_thinking(hf_render, enable_thinking):
    messages = CONVERSATIONS["multi_turn"]
    text = ours("qwen3-8b", messages, enable_thinking=enable_thinking)
    assert text == hf(hf_render, "qwen3-8b", messages, add_generation_prompt=True,
                      enable_thinking=enable_thinking)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") is (not enable_thinking)


def test_qwen3_reasoning_content_after_last_query(hf_render):
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "Add them."}]
    text = ours("qwen3-8b", messages, add_generation_prompt=False)
    assert text == hf(hf_render, "qwen3-8b", messages, add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\n<think>\nAdd them.\n</think>\n\n4<|im_end|>\n")


def test_mistral_refuses_non_alternating_roles():
    messages = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}]
    with pytest.raises(InvalidRequestError) as e:
        ours("mistral-7b-instruct-v0.3", messages)
    assert e.value.field == "messages"
    assert "conversation roles must alternate user/assistant/user/assistant/..." in str(e.value)


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}{{ messages[0].__init__.__globals__ }}",
    "{{ messages.append(1) }}",
    "{% set _ = messages[0].update({'role': 'system'}) %}ok",
    "{{ messages.pop() }}",
])
def test_sandbox_refuses_internals_and_mutation(template):
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(InvalidRequestError) as e:
        ChatTemplate(template).render(messages)
    assert e.value.field == "messages"
    assert messages == [{"role": "user", "content": "Hi"}]


def test_undefined_names_are_falsy():
    template = ("{% if tools %}T{% endif %}{% if documents %}D{% endif %}"
                "{% if some_flag_nobody_passed %}F{% endif %}{% if not custom_tools %}ok{% endif %}"
                "{{ messages[0].content }}")
    assert ChatTemplate(template).render([{"role": "user", "content": "Hi"}]) == "okHi"


def test_template_errors_are_request_errors():
    with pytest.raises(InvalidRequestError, match="failed on them"):
        ChatTemplate("{{ messages[5].content }}").render([{"role": "user", "content": "Hi"}])
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def test_text_tokenizer_uses_the_checkpoint_template(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer
    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "qwen3-template")
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = source("qwen3-8b")
    config_path.write_text(json.dumps(config))

    tok = TextTokenizer(model_dir)
    messages = CONVERSATIONS["multi_turn"]
    rendered = ChatTemplate(source("qwen3-8b"), special_tokens_of(config)).render(messages)
    assert rendered.startswith("<|im_start|>system\nYou are a terse assistant.<|im_end|>\n")
    assert tok.apply_chat_template(messages) == tok.encode(rendered, add_special_tokens=False)
    hf_ids = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(
        messages, add_generation_prompt=True)["input_ids"]
    assert tok.apply_chat_template(messages) == hf_ids


# Messages as OpenAI-style clients send them: None-valued keys, reasoning under
# another name (transformers normalizes both before rendering; so do we).
NORMALIZED_CASES = {
    # HF copies `reasoning` / `thinking` into `reasoning_content` (_alias_reasoning_fields)
    "reasoning_alias": ("qwen3-8b", [{"role": "user", "content": "2+2?"},
                                     {"role": "assistant", "content": "4", "reasoning": "Add."}]),
    # HF drops None-valued keys first (_normalize_chat_messages); `'tool_calls' in message`
    "none_valued_keys": ("llama-3.1-8b-instruct", [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "tool_calls": None},
        {"role": "user", "content": "Bye"}]),
}


@pytest.mark.parametrize("case", sorted(NORMALIZED_CASES))
def test_message_normalization_like_transformers(hf_render, case):
    name, messages = NORMALIZED_CASES[case]
    assert ours(name, messages) == hf(hf_render, name, messages, add_generation_prompt=True)


def test_generation_tag_compiles_like_transformers(hf_render):
    template = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
                "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert ChatTemplate(template).render(messages) == hf_render(template, messages, {})
