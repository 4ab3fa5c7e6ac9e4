"""Chat templates found and rendered as transformers 5 finds and renders them: chat_template.jinja
over tokenizer_config.json, named templates (a list in the config or additional_chat_templates/*.jinja), the
named special tokens, tojson, {% generation %} and loop controls."""

import json
import shutil

import pytest

transformers = pytest.importorskip("transformers")

from medjax.data import DataError  # noqa: E402
from medjax.data.chat import ChatTemplate  # noqa: E402

# Uses what transformers hands a template: bos/eos/pad tokens, tojson, loop controls, {% generation %}.
RICH = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
    "[{{ m['role'] | upper }}] {{ m['content'] | tojson }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}{% endif %}"
    "\n{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}pad={{ pad_token }}"
)
TERSE = "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}|{% endfor %}"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": 'Dose of "aspirin"? <café>'},
    {"role": "assistant", "content": "81 mg."},
    {"role": "user", "content": "Why?"},
]


def _tokenizer_dir(world, tmp_path, **config_changes):
    d = tmp_path / "tok"
    shutil.copytree(world.tokenizer, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.update(config_changes)
    config = {k: v for k, v in config.items() if v is not None}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def _agree(d, name=None):
    hf = transformers.AutoTokenizer.from_pretrained(d)
    ours = ChatTemplate(d, name=name)
    for gen in (False, True):
        theirs = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen, chat_template=name)
        assert ours.render(MESSAGES, add_generation_prompt=gen) == theirs
    return ours


def test_jinja_file_wins_over_the_config(world, tmp_path):
    d = _tokenizer_dir(world, tmp_path, bos_token="<|im_start|>")
    (d / "chat_template.jinja").write_text(RICH)
    ours = _agree(d)
    assert ours.render(MESSAGES).startswith("<|im_start|>[USER] ")


def test_named_templates_from_a_list_in_the_config(world, tmp_path):
    d = _tokenizer_dir(
        world,
        tmp_path,
        bos_token="<|im_start|>",
        chat_template=[{"name": "default", "template": RICH}, {"name": "terse", "template": TERSE}],
    )
    _agree(d)
    assert _agree(d, name="terse").render(MESSAGES) == 's:Be brief.|u:Dose of "aspirin"? <café>|a:81 mg.|u:Why?|'
    with pytest.raises(DataError, match="no chat template named 'missing'.*default, terse"):
        ChatTemplate(d, name="missing")


def test_named_templates_from_files(world, tmp_path):
    d = _tokenizer_dir(world, tmp_path)
    (d / "chat_template.jinja").write_text(TERSE)
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "rich.jinja").write_text(RICH)
    _agree(d)
    _agree(d, name="rich")


def test_a_tokenizer_without_a_template_is_an_error(world, tmp_path):
    d = _tokenizer_dir(world, tmp_path, chat_template=None)
    with pytest.raises(DataError, match="has no chat template"):
        ChatTemplate(d)
