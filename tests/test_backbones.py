import pytest
import torch
from PIL import Image

from sdrt_cli.backbone import Turn, load_backbone
from sdrt_cli.errors import SdrtError


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("llava-next-tiny", seed=0)


def chart(w=500, h=400):
    img = Image.new("RGB", (w, h), "white")
    for x in range(0, w, 40):
        img.paste((x % 255, 80, 160), (x, h // 3, x + 20, h))
    return img


def test_tokenize_matches_the_processor_with_realistic_image_token_counts(tiny):
    image = chart()
    text = tiny.render_chat([Turn("user", "Which bar is the tallest?", images=1)])
    assert text == "[INST] <image>\nWhich bar is the tallest? [/INST]"
    encoded = tiny.encode_images([image])
    ids = tiny.tokenize(text, encoded.token_counts)
    reference = tiny.processor(text=text, images=[image], return_tensors="pt")["input_ids"][0].tolist()
    assert ids == reference
    assert ids[0] == tiny.tokenizer.bos_token_id
    # LLaVA-1.6 anyres: a 500x400 image becomes thousands of tokens, as on the 7B model
    assert encoded.token_counts[0] > 2000


@pytest.mark.slow
def test_embed_and_lm_forward_match_the_transformers_forward(tiny):
    image = chart(640, 300)
    text = tiny.render_chat([Turn("user", "What is the title?", images=1)])
    inputs = tiny.processor(text=text, images=[image], return_tensors="pt")
    with torch.no_grad():
        reference = tiny.model(**inputs).logits
        encoded = tiny.encode_images([image])
        ids = torch.tensor([tiny.tokenize(text, encoded.token_counts)])
        embeds = tiny.embed(ids, [torch.cat(encoded.features)])
        mask = torch.ones_like(ids)
        pos = torch.arange(ids.shape[1])[None]
        out = tiny.lm_forward(embeds, mask, pos)
        logits = tiny.lm_logits(out.last_hidden)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    # the same forward split in two at a layer boundary (how training caches frozen layers)
    with torch.no_grad():
        lower = tiny.run_layers(embeds, mask, pos, 0, 2)
        upper = tiny.run_layers(lower, mask, pos, 2, len(tiny.decoder_layers))
        torch.testing.assert_close(tiny.lm_logits(tiny.final_norm(upper)), reference, rtol=1e-4, atol=1e-4)


def test_random_backbone_is_deterministic_from_seed():
    a = load_backbone("llava-next-tiny", seed=3)
    b = load_backbone("llava-next-tiny", seed=3)
    c = load_backbone("llava-next-tiny", seed=4)
    wa = a.model.lm_head.weight
    assert torch.equal(wa, b.model.lm_head.weight)
    assert not torch.equal(wa, c.model.lm_head.weight)
    assert a.identity() == b.identity()


def test_interface_reports_layers_sizes_and_early_vision_features(tiny):
    assert len(tiny.decoder_layers) == 4
    assert tiny.hidden_size == 64
    encoded = tiny.encode_images([chart(), chart(336, 336)], early_layer=tiny.vision_feature_default_layer)
    assert len(encoded.early) == 2
    assert encoded.early[0].shape[-1] == tiny.vision_hidden_size


@pytest.mark.slow
def test_saved_tiny_model_loads_through_the_pretrained_loader(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "model")
    tiny.processor.save_pretrained(tmp_path / "model")
    loaded = load_backbone("llava-next", model=str(tmp_path / "model"), dtype="fp32", device="cpu")
    assert loaded.name == "llava-next"
    assert loaded.identity().config_hash == tiny.identity().config_hash
    assert loaded.identity().tokenizer_hash == tiny.identity().tokenizer_hash
    # a local checkpoint is recorded by its absolute path (a later stage may run from elsewhere)
    assert loaded.record().options == {"model": str((tmp_path / "model").resolve())}
    image = chart()
    text = loaded.render_chat([Turn("user", "Why?", images=1)])
    assert text == tiny.render_chat([Turn("user", "Why?", images=1)])
    inputs = tiny.processor(text=text, images=[image], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).logits, tiny.model(**inputs).logits)


def test_missing_weights_give_one_sentence_and_never_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SdrtError, match="not on this machine.*huggingface-cli download"):
        load_backbone("llava-next", model="llava-hf/llava-v1.6-mistral-7b-hf")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(SdrtError, match="has no config.json"):
        load_backbone("llava-next", model=str(tmp_path))
