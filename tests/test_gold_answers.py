"""The gold-answer (LoRA fine-tuning) baseline's labels end with the tokenizer's real EOS id, whatever
the chat template writes after an assistant turn: checked with the project's template and with the
template llava-hf/llava-v1.6-mistral-7b-hf ships, on the real Mistral tokenizer."""

from __future__ import annotations

import functools
import warnings

import pytest

from sdrt_cli.backbone import Turn, load_backbone
from sdrt_cli.distill import GoldSource
from sdrt_cli.errors import SdrtError
from sdrt_plugins.backbones.llava_next import CHAT_TEMPLATE
from sdrt_plugins.datasets.synthetic_charts import SyntheticCharts

# The chat_template of llava-hf/llava-v1.6-mistral-7b-hf (its chat_template.json), verbatim as
# openvino.genai's tokenizer matches it in its chat-template fallback table ("tiny-random-llava-next,
# llava-v1.6-mistral (chat_template.json)").  An assistant turn ends with the literal text '<\s> ',
# not with the EOS token </s>.
LLAVA_V16_MISTRAL_TEMPLATE = "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '<\\s> '}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"  # noqa: E501


@functools.cache
def tiny_with_template(template: str):
    backbone = load_backbone("llava-next-tiny", seed=0)
    backbone.processor.chat_template = template
    return backbone


def gold_inputs(backbone, answer: str):
    data = SyntheticCharts(split="train", limit=1)
    example = next(iter(data))
    example.answers = [answer]
    encoded = backbone.encode_images(example.images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # jinja decoding the template's '\s'
        return GoldSource(data, {0: example}).prepare(backbone, 0, example, encoded.token_counts)


@pytest.mark.parametrize("answer", ["42", "Blue sky", "3.5%"])
def test_the_checkpoint_template_writes_no_eos_and_the_gold_labels_still_end_with_it(answer):
    backbone = tiny_with_template(LLAVA_V16_MISTRAL_TEMPLATE)
    eos = backbone.tokenizer.eos_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        rendered = backbone.render_chat([Turn("user", "q"), Turn("assistant", answer)], add_generation_prompt=False)
    # the premise: this template ends the turn with text that is not the EOS token
    assert rendered.endswith(answer + "<\\s> ")
    assert eos not in backbone.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    inputs = gold_inputs(backbone, answer)
    labels = inputs.labels["gold"]
    assert labels[-1] == eos and eos not in labels[:-1]
    assert backbone.tokenizer.decode(labels[:-1]).strip() == answer  # nothing of '<\s> ' is learned
    assert inputs.tails["gold"] == labels[:-1] and inputs.rows["gold"] == len(labels)


@pytest.mark.parametrize("answer", ["42", "Blue sky"])
def test_with_the_project_template_the_labels_are_the_templates_own_turn(answer):
    backbone = tiny_with_template(CHAT_TEMPLATE)
    inputs = gold_inputs(backbone, answer)
    data = SyntheticCharts(split="train", limit=1)
    example = next(iter(data))
    from sdrt_cli.traces import student_turns

    turns = student_turns(data, example)
    counts = backbone.encode_images(example.images).token_counts
    full = backbone.tokenize(backbone.render_chat(turns + [Turn("assistant", answer)], add_generation_prompt=False), counts)
    # this template already ends the turn with </s>: the labels are exactly its tokens after the prompt
    assert inputs.labels["gold"] == full[len(inputs.prompt_ids) :]
    assert full[-1] == backbone.tokenizer.eos_token_id


def test_a_template_that_drops_the_answer_is_refused_in_one_sentence():
    backbone = tiny_with_template(CHAT_TEMPLATE.replace("message['content'][0]['text']", "'ok'"))
    with pytest.raises(SdrtError, match="does not write the gold answer '42' after the question prompt"):
        gold_inputs(backbone, "42")
